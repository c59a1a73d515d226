"""The init command: fresh adapters initialised as PEFT does (default/gaussian/PiSSA/OLoRA)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from adaptertool.api.arguments import DTYPE_CODES
from adaptertool.cli.app import (
    alpha_option,
    cli,
    emit,
    force_option,
    human_bytes,
    json_option,
    progress_enabled,
    quiet_option,
    shard_option,
)
from adaptertool.cli.sources import SourcePath


@cli.command("init")
@click.argument("base", type=SourcePath())
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--rank", type=int, default=16, show_default=True, help="LoRA rank r of every module.")
@alpha_option
@click.option("--targets", multiple=True, default=("all-linear",), show_default=True, metavar="NAME",
              help="all-linear (every Linear but the output head, as PEFT, experts included), experts (all experts), "
                   "or names matched as PEFT target_modules (repeatable; embeddings get an embedding LoRA).")
@click.option("--experts", type=click.Choice(["per-expert", "fused"]), default=None,
              help="Mixture-of-experts bases: a LoRA per expert Linear (target_modules), or PEFT target_parameters "
                   "LoRAs on the fused expert parameters [default: as the base stores its experts].")
@click.option("--rslora/--no-rslora", default=False, show_default=True, help="rsLoRA scaling alpha/sqrt(r) instead of alpha/r.")
@click.option("--dora/--no-dora", default=False, show_default=True,
              help="DoRA: also write the magnitude vectors (norms of the weights).")
@click.option("--method", type=click.Choice(["default", "gaussian", "pissa", "olora"]), default="default",
              show_default=True, help="PEFT's initialisation; pissa/olora also write --residual-base.")
@click.option("--pissa-niter", type=int, default=None,
              help="Fast PiSSA: randomized SVD with this many power iterations instead of the exact SVD.")
@click.option("--residual-base", type=click.Path(path_type=Path), default=None,
              help="pissa/olora: where to write the base minus the adapter's initial part (load the adapter on it).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random factors (default/gaussian, fast PiSSA).")
@click.option("--dtype", type=click.Choice(sorted(DTYPE_CODES)), default="fp32", show_default=True,
              help="dtype of the adapter's factors (the residual base keeps the base's).")
@shard_option
@force_option
@json_option
@quiet_option
def init_cmd(base: Path, out: Path, rank: int, alpha: float | None, targets: tuple[str, ...], experts: str | None,
             rslora: bool, dora: bool, method: str, pissa_niter: int | None, residual_base: Path | None, seed: int,
             dtype: str, max_shard_size: str, force: bool, as_json: bool, quiet: bool) -> None:
    """Write a fresh PEFT LoRA adapter for BASE, initialised as PEFT does.

    Example: adaptertool init ./SmolLM2-135M ./pissa-adapter --method pissa --rank 16 --residual-base ./SmolLM2-residual
    """
    from adaptertool.api.initializing import init

    report = init(base, out, rank=rank, alpha=alpha, targets=targets, experts=experts, rslora=rslora, dora=dora,
                  method=method, pissa_niter=pissa_niter, residual_base=residual_base, seed=seed, dtype=dtype,
                  max_shard_size=max_shard_size, force=force, progress=progress_enabled(quiet, as_json))
    emit(report, as_json, _init_text)


def _init_text(r: Any) -> str:
    lines = [
        *(f"note: {note}" for note in r.notes),
        (f"wrote {r.out}: {r.method} LoRA on {r.modules} modules ({', '.join(r.target_modules)}){_params(r)}, r={r.rank}, "
         f"alpha={r.alpha:g}, scaling {r.scaling:g}, {human_bytes(r.adapter_bytes)} in {r.seconds:.1f} s, "
         f"peak memory {human_bytes(r.peak_rss_bytes)}"),
    ]
    if r.residual_base is not None:
        lines.append(f"wrote residual base {r.residual_base} ({r.copied} tensors copied unchanged); residual + adapter "
                     f"reproduces the base to a relative error of {r.reconstruction_error:.4f} (rounding to the base's dtype)")
    return "\n".join(lines)


def _params(r: Any) -> str:
    if not r.parameters:
        return ""
    return f" and {r.parameters} fused expert parameters ({', '.join(r.target_parameters)})"

"""The combine command: several adapters into one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from adaptertool.api.arguments import DTYPE_CODES
from adaptertool.cli.app import (
    cli,
    emit,
    force_option,
    human_bytes,
    json_option,
    progress_enabled,
    quiet_option,
)
from adaptertool.cli.sources import SourcePath

# The names adaptertool.adapters.combine.METHODS accepts, listed here so that --help does not import torch.
_METHODS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_linear_svd", "dare_ties", "dare_ties_svd",
            "dare_svd", "magnitude_prune", "magnitude_prune_svd")


@cli.command("combine")
# OUT is the last positional, as in every command; -o/--out is kept as an alias, and with it every
# positional is an adapter. click fills ADAPTER... from the front and OUT from the back. OUT stays
# text until then: a Path would drop the trailing "/" that keeps "run:7/" from reading as weight 7.
@click.argument("adapters", nargs=-1, metavar="ADAPTER[:WEIGHT]...")
@click.argument("out", required=False, metavar="OUT")
@click.option("-o", "--out", "out_option", type=click.Path(path_type=Path), default=None,
              help="Output adapter folder, instead of the last positional argument (all positionals are then adapters).")
@click.option("--method", type=click.Choice(_METHODS), default="linear", show_default=True,
              help="linear/cat: exact weighted sum (stacked factors); svd and the ties/dare/magnitude_prune "
                   "family: weighted full deltas, re-factored at --rank.")
@click.option("--weights", default=None, metavar="W,W,...",
              help="One weight per adapter, comma-separated, instead of :WEIGHT suffixes [default: 1 each].")
@click.option("--density", type=float, default=None,
              help="ties, dare_*, magnitude_prune: fraction of each delta kept, in (0, 1].")
@click.option("--rank", type=int, default=None, help="Rank of the SVD methods [default: the largest input rank].")
@click.option("--majority-sign", type=click.Choice(["total", "frequency"]), default=None,
              help="ties, dare_ties: elect each entry's sign by summed value or by count [default: total].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the DARE masks and the randomized SVD.")
@click.option("--svd", type=click.Choice(["randomized", "exact"]), default="randomized", show_default=True,
              help="Randomized SVD (fast, seeded) or the exact full SVD (the optimum).")
@click.option("--dtype", type=click.Choice(sorted(DTYPE_CODES)), default="fp32", show_default=True,
              help="dtype of the LoRA factors.")
@force_option
@json_option
@quiet_option
def combine_cmd(adapters: tuple[str, ...], out: str | None, out_option: Path | None, method: str,
                weights: str | None, density: float | None, rank: int | None, majority_sign: str | None, seed: int,
                svd: str, dtype: str, force: bool, as_json: bool, quiet: bool) -> None:
    """Combine several adapters for one base into one LoRA adapter (weighted sum, TIES, DARE...).

    The last argument is OUT, the output adapter folder (or give it as -o OUT).

    Example: adaptertool combine ./sft:0.7 ./dpo:0.3 ./mixed --method svd --rank 16
    """
    from adaptertool.api.combining import adapter_weights, combine

    sources, out_path = _split_out(adapters, out, out_option)
    texts, weight_list = adapter_weights(sources, weights)
    paths = [SourcePath("adapter").convert(text, None, None) for text in texts]
    report = combine(paths, out_path, method=method, weights=weight_list, density=density, rank=rank,
                     majority_sign=majority_sign, seed=seed, svd=svd, dtype=dtype, force=force,
                     progress=progress_enabled(quiet, as_json))
    emit(report, as_json, _combine_text)


def _split_out(adapters: tuple[str, ...], out: str | None, out_option: Path | None) -> tuple[tuple[str, ...], Path]:
    """(adapter arguments, OUT) from the positionals and -o: with -o, the positional OUT is one more adapter."""
    if out_option is not None and out is not None:
        adapters, out = (*adapters, out), None
    if not adapters or (out is None and out_option is None):
        raise click.UsageError("give at least one ADAPTER and then OUT, e.g. combine ./a:0.7 ./b:0.3 ./mixed",
                               ctx=click.get_current_context())
    return adapters, out_option if out_option is not None else Path(str(out))


def _combine_text(r: Any) -> str:
    width = max((len(m.module) for m in r.modules), default=6)
    lines = [f"{'module':<{width}}  rank  inputs  rel.error"]
    for m in r.modules:
        lines.append(f"{m.module:<{width}}  {m.rank:>4}  {m.inputs:>6}  {m.rel_error:>9.4f}{' capped' if m.capped else ''}")
    weights = ", ".join(f"{a}:{w:g}" for a, w in zip(r.adapters, r.weights))
    saved = f"; modules_to_save: {', '.join(r.modules_to_save)}" if r.modules_to_save else ""
    lines += [
        f"total: {len(r.modules)} modules (r={r.rank}) from {weights}{saved}",
        f"  {r.method}: relative Frobenius error {r.rel_error:.4f} against the combined deltas, adapter {human_bytes(r.adapter_bytes)}",
        *(f"note: {note}" for note in r.notes),
        f"wrote {r.out} in {r.seconds:.1f} s, peak memory {human_bytes(r.peak_rss_bytes)}",
    ]
    return "\n".join(lines)

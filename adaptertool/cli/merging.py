"""Commands that fold adapters into models and back out: merge, subtract."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

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
    shard_option,
)
from adaptertool.cli.sources import SourcePath, WeightedSource

F = TypeVar("F", bound=Callable[..., Any])


def _merge_options(f: F) -> F:
    for option in reversed([
        click.option("--scale", type=float, default=1.0, show_default=True, help="Multiply every adapter's weight by this."),
        click.option("--dtype", type=click.Choice(["auto", *sorted(DTYPE_CODES)]), default="auto", show_default=True,
                     help="Output float dtype; auto keeps the base's."),
        click.option("--requantize/--no-requantize", default=False, show_default=True,
                     help="Quantised base (bitsandbytes 4-bit, FP8, MXFP4): write the result in the base's format and settings "
                          "again [default: write it dequantised]."),
        shard_option,
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True,
                     help="Where deltas are computed (the output is the same; cuda is faster on big ranks)."),
        force_option, json_option, quiet_option,
    ]):
        f = option(f)
    return f


def _merge_summary(verb: str) -> Callable[[Any], str]:
    def render(r: Any) -> str:
        cast = f"{r.cast} cast " + (f"to {r.dtype}" if r.dtype != "as base" else "or decoded")
        counts = [f"{r.merged} tensors changed", f"{r.replaced} replaced" if r.replaced else "",
                  f"{r.copied} copied" if r.copied else "", cast if r.cast else ""]
        return "\n".join([
            *(f"note: {note}" for note in r.notes),
            (f"{verb} {len(r.adapters)} adapter(s) into {r.out}: {', '.join(c for c in counts if c)}; "
             f"{len(r.files)} file(s) in {r.seconds:.1f} s, peak memory {human_bytes(r.peak_rss_bytes)}"),
        ])

    return render




@cli.command("merge")
@click.argument("base", type=SourcePath())
@click.argument("adapter", type=WeightedSource())
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--add", "extra", type=WeightedSource(), multiple=True, metavar="ADAPTER[:WEIGHT]", help="Another adapter to merge in the same pass (repeatable).")
@_merge_options
def merge_cmd(base: Path, adapter: tuple[Path, float], out: Path, extra: tuple[tuple[Path, float], ...],
              **options: Any) -> None:
    """Merge PEFT adapters into their base model, streamed tensor by tensor.

    ADAPTER may carry a weight as ADAPTER:WEIGHT. Supports LoRA (incl. rsLoRA, DoRA, embedding and
    Conv1D LoRA, lora_bias, rank/alpha patterns, modules_to_save), LoHa, LoKr, AdaLoRA and IA3.

    Example: adaptertool merge ./SmolLM2-135M ./my-lora ./merged --add ./style-lora:0.5
    """
    from adaptertool.api.merging import merge

    as_json, quiet = options.pop("as_json"), options.pop("quiet")
    emit(merge(base, adapter, out, add=extra, progress=progress_enabled(quiet, as_json), **options), as_json,
         _merge_summary("merged"))


@cli.command("subtract")
@click.argument("model", type=SourcePath())
@click.argument("adapter", type=WeightedSource())
@click.argument("out", type=click.Path(path_type=Path))
@_merge_options
def subtract_cmd(model: Path, adapter: tuple[Path, float], out: Path, **options: Any) -> None:
    """Take a merged adapter back out of a model: W - scale * delta.

    Works for additive adapters (LoRA, rsLoRA, LoHa, LoKr, AdaLoRA); DoRA, IA3 and modules_to_save
    cannot be undone without the original base and are refused.

    Example: adaptertool subtract ./merged ./my-lora ./base-again
    """
    from adaptertool.api.merging import subtract

    as_json, quiet = options.pop("as_json"), options.pop("quiet")
    emit(subtract(model, adapter, out, progress=progress_enabled(quiet, as_json), **options), as_json,
         _merge_summary("subtracted"))



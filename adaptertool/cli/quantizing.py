"""Commands that change how weights are stored: quantize (bitsandbytes 4-bit, FP8, MXFP4), dequantize (back)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from adaptertool.api.arguments import DTYPE_CODES
from adaptertool.api.quantizing import FORMATS, parse_block
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
from adaptertool.cli.sources import SourcePath
from adaptertool.errors import OptionError

BLOCKSIZES = ("32", "64", "128", "256", "512", "1024", "2048", "4096")


def _block(ctx: click.Context, param: click.Parameter, text: str) -> tuple[int, int]:
    try:
        return parse_block(text)
    except OptionError as err:  # a usage error (exit 2), as click's own checks
        raise click.BadParameter(str(err).removeprefix("--block "), ctx, param) from None


@cli.command("quantize")
@click.argument("base", type=SourcePath())
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--format", "--quant-type", "quant_type", type=click.Choice(FORMATS), default="nf4", show_default=True,
              help="nf4/fp4: bitsandbytes 4-bit (NF4 is QLoRA's NormalFloat); fp8-block: DeepSeek-V3's FP8 with a scale "
                   "per --block; fp8-channel: compressed-tensors FP8_DYNAMIC; mxfp4: gpt-oss's experts.")
@click.option("--blocksize", type=click.Choice(BLOCKSIZES), default="64", show_default=True,
              help="nf4/fp4: elements per absmax block.")
@click.option("--block", "block", default="128x128", show_default=True, metavar="ROWSxCOLS", callback=_block,
              help="fp8-block: weight rows and columns per scale.")
@click.option("--double-quant/--no-double-quant", default=True, show_default=True,
              help="Store the absmax values as 8-bit codes (bnb_4bit_use_double_quant).")
@click.option("--skip", multiple=True, metavar="MODULE",
              help="Leave modules matching MODULE unquantised (matched as llm_int8_skip_modules); repeatable.")
@click.option("--compute-dtype", type=click.Choice(["auto", *sorted(DTYPE_CODES)]), default="auto", show_default=True,
              help="bnb_4bit_compute_dtype for config.json; auto: the dtype the weights are quantised from.")
@click.option("--dtype", type=click.Choice(["auto", *sorted(DTYPE_CODES)]), default="auto", show_default=True,
              help="Cast float tensors to this dtype before quantising; auto keeps each tensor's.")
@shard_option
@force_option
@json_option
@quiet_option
def quantize_cmd(base: Path, out: Path, quant_type: str, blocksize: str, block: tuple[int, int], double_quant: bool,
                 skip: tuple[str, ...], compute_dtype: str, dtype: str, max_shard_size: str, force: bool, as_json: bool,
                 quiet: bool) -> None:
    """Quantise a checkpoint to a layout transformers and vLLM load: bitsandbytes 4-bit, FP8 or MXFP4.

    Example: adaptertool quantize ./SmolLM2-135M ./smollm2-nf4 --compute-dtype bf16
    """
    from adaptertool.api.quantizing import quantize

    report = quantize(base, out, format=quant_type, blocksize=blocksize, block=block, double_quant=double_quant,
                      skip=skip, compute_dtype=compute_dtype, dtype=dtype, max_shard_size=max_shard_size, force=force,
                      progress=progress_enabled(quiet, as_json))
    emit(report, as_json, _quantize_summary)


def _quantize_summary(r: Any) -> str:
    if r.block:
        how = f"block {r.block[0]}x{r.block[1]}"
    elif r.blocksize:
        how = f"blocksize {r.blocksize}{', double-quant' if r.double_quant else ''}"
    else:
        how = "per-row scales" if r.quant_type == "fp8-channel" else "32-element groups"
    line = (
        f"quantized {r.quantized} weights to {r.quant_type.upper()} ({how}) in {r.out}: "
        f"{r.copied} tensors copied, {r.cast} cast; {human_bytes(r.bytes_in)} -> {human_bytes(r.bytes_written)} "
        f"in {len(r.files)} file(s), {r.seconds:.1f} s, peak memory {human_bytes(r.peak_rss_bytes)}"
    )
    return line + (f"\nkept unquantised: {', '.join(r.kept)}" if r.kept else "")


@cli.command("dequantize")
@click.argument("qbase", type=SourcePath())
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--dtype", type=click.Choice(["auto", *sorted(DTYPE_CODES)]), default="auto", show_default=True,
              help="Output float dtype; auto: each weight's dtype before quantisation, other tensors kept.")
@shard_option
@force_option
@json_option
@quiet_option
def dequantize_cmd(qbase: Path, out: Path, dtype: str, max_shard_size: str, force: bool, as_json: bool, quiet: bool) -> None:
    """Expand a quantised checkpoint (bitsandbytes 4-bit, FP8, MXFP4) to plain weights, using its stored scales.

    Example: adaptertool dequantize ./smollm2-nf4 ./smollm2-bf16
    """
    from adaptertool.api.quantizing import dequantize

    report = dequantize(qbase, out, dtype=dtype, max_shard_size=max_shard_size, force=force,
                        progress=progress_enabled(quiet, as_json))
    emit(report, as_json, lambda r: (
        f"dequantized {r.dequantized} weights into {r.out}: {r.copied} tensors copied, {r.cast} cast; "
        f"{human_bytes(r.bytes_written)} in {len(r.files)} file(s), {r.seconds:.1f} s, "
        f"peak memory {human_bytes(r.peak_rss_bytes)}"
    ))
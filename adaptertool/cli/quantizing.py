"""Commands that change how weights are stored: quantize (bitsandbytes 4-bit, FP8, MXFP4), dequantize (back)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from adaptertool.cli.app import (
    DTYPE_CODES,
    cli,
    emit,
    force_option,
    human_bytes,
    json_option,
    progress_enabled,
    quiet_option,
    shard_bytes,
    shard_option,
)
from adaptertool.cli.sources import SourcePath
from adaptertool.io import torch_dtype

BLOCKSIZES = ("32", "64", "128", "256", "512", "1024", "2048", "4096")
FORMATS = ("nf4", "fp4", "fp8-block", "fp8-channel", "mxfp4")


@cli.command("quantize")
@click.argument("base", type=SourcePath())
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--format", "--quant-type", "quant_type", type=click.Choice(FORMATS), default="nf4", show_default=True,
              help="nf4/fp4: bitsandbytes 4-bit (NF4 is QLoRA's NormalFloat); fp8-block: DeepSeek-V3's FP8 with a scale "
                   "per --block; fp8-channel: compressed-tensors FP8_DYNAMIC; mxfp4: gpt-oss's experts.")
@click.option("--blocksize", type=click.Choice(BLOCKSIZES), default="64", show_default=True,
              help="nf4/fp4: elements per absmax block.")
@click.option("--block", "block", default="128x128", show_default=True, metavar="ROWSxCOLS",
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
def quantize_cmd(base: Path, out: Path, quant_type: str, blocksize: str, block: str, double_quant: bool,
                 skip: tuple[str, ...], compute_dtype: str, dtype: str, max_shard_size: str, force: bool, as_json: bool,
                 quiet: bool) -> None:
    """Quantise a checkpoint to a layout transformers and vLLM load: bitsandbytes 4-bit, FP8 or MXFP4.

    Example: adaptertool quantize ./SmolLM2-135M ./smollm2-nf4 --compute-dtype bf16
    """
    from adaptertool.ops.quantize import QuantConfig, quantize

    cfg = QuantConfig(
        source=base, out=out, quant_type=quant_type, blocksize=int(blocksize), block=_block(block),
        double_quant=double_quant, skip=skip,
        compute_dtype=None if compute_dtype == "auto" else torch_dtype(DTYPE_CODES[compute_dtype]),
        dtype=None if dtype == "auto" else torch_dtype(DTYPE_CODES[dtype]),
        max_shard_bytes=shard_bytes(max_shard_size), force=force,
    )
    emit(quantize(cfg, progress=progress_enabled(quiet, as_json)), as_json, _quantize_summary)


def _block(text: str) -> tuple[int, int]:
    rows, sep, cols = text.lower().partition("x")
    if not (sep and rows.isdigit() and cols.isdigit()):
        raise click.BadParameter(f"{text!r} is not ROWSxCOLS, such as 128x128", param_hint="--block")
    return int(rows), int(cols)


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
    from adaptertool.ops.dequantize import DequantConfig, dequantize

    cfg = DequantConfig(source=qbase, out=out, dtype=None if dtype == "auto" else torch_dtype(DTYPE_CODES[dtype]),
                        max_shard_bytes=shard_bytes(max_shard_size), force=force)
    emit(dequantize(cfg, progress=progress_enabled(quiet, as_json)), as_json, lambda r: (
        f"dequantized {r.dequantized} weights into {r.out}: {r.copied} tensors copied, {r.cast} cast; "
        f"{human_bytes(r.bytes_written)} in {len(r.files)} file(s), {r.seconds:.1f} s, "
        f"peak memory {human_bytes(r.peak_rss_bytes)}"
    ))
"""quantize and dequantize: bitsandbytes 4-bit, FP8 and MXFP4 checkpoints, and back."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from adaptertool.api.arguments import OutPath, Source, float_dtype, progress_on, shard_bytes
from adaptertool.errors import OptionError
from adaptertool.ops.sources import local_source

if TYPE_CHECKING:
    from adaptertool.ops.dequantize import DequantReport
    from adaptertool.ops.quantize import QuantReport

__all__ = ["FORMATS", "dequantize", "parse_block", "quantize"]

FORMATS = ("nf4", "fp4", "fp8-block", "fp8-channel", "mxfp4")


def quantize(base: Source, out: OutPath, *, format: str = "nf4", blocksize: int | str = 64,
             block: str | tuple[int, int] = "128x128", double_quant: bool = True, skip: Sequence[str] = (),
             compute_dtype: str = "auto", dtype: str = "auto", max_shard_size: str | int = "5GB", force: bool = False,
             progress: bool | None = None) -> QuantReport:
    """Quantise a checkpoint: bitsandbytes nf4/fp4, fp8-block, fp8-channel or mxfp4 (``adaptertool quantize``).

    Args:
        format: the CLI's --format.
        blocksize: nf4/fp4 elements per absmax block, a power of two from 32 to 4096.
        block: fp8-block rows and columns per scale, "ROWSxCOLS" or (rows, cols).
        skip: modules left unquantised (matched as llm_int8_skip_modules).
        compute_dtype, dtype: bf16, fp16, fp32 or auto, as the CLI's --compute-dtype and --dtype.

    Raises:
        InputError, OptionError, OutputError, HubError: see docs/api.md.
    """
    from adaptertool.ops.quantize import QuantConfig, quantize as run

    shown = progress_on(progress)
    try:
        size = int(blocksize)
    except (TypeError, ValueError):
        raise OptionError(f"--blocksize must be a power of two from 32 to 4096, not {blocksize!r}") from None
    cfg = QuantConfig(
        source=local_source(base, progress=shown), out=Path(out), quant_type=format, blocksize=size,
        block=parse_block(block) if isinstance(block, str) else tuple(block), double_quant=double_quant, skip=tuple(skip),
        compute_dtype=float_dtype("--compute-dtype", compute_dtype, auto=True),
        dtype=float_dtype("--dtype", dtype, auto=True), max_shard_bytes=shard_bytes(max_shard_size), force=force,
    )
    return run(cfg, progress=shown)


def parse_block(text: str) -> tuple[int, int]:
    """``ROWSxCOLS`` (e.g. 128x128) -> (rows, cols).

    Raises:
        OptionError: text of another shape.
    """
    rows, sep, cols = text.lower().partition("x")
    if not (sep and rows.isdigit() and cols.isdigit()):
        raise OptionError(f"--block {text!r} is not ROWSxCOLS, such as 128x128")
    return int(rows), int(cols)


def dequantize(qbase: Source, out: OutPath, *, dtype: str = "auto", max_shard_size: str | int = "5GB",
               force: bool = False, progress: bool | None = None) -> DequantReport:
    """Expand a quantised checkpoint to plain weights with its stored scales (``adaptertool dequantize``).

    Raises:
        InputError: also for a checkpoint that holds no quantised weights. OptionError, OutputError,
        HubError: see docs/api.md.
    """
    from adaptertool.ops.dequantize import DequantConfig, dequantize as run

    shown = progress_on(progress)
    cfg = DequantConfig(source=local_source(qbase, progress=shown), out=Path(out), dtype=float_dtype("--dtype", dtype, auto=True),
                        max_shard_bytes=shard_bytes(max_shard_size), force=force)
    return run(cfg, progress=shown)

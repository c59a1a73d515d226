"""dequantize: a quantised checkpoint (bitsandbytes 4-bit, FP8, MXFP4) -> plain weights.

Every quantised weight is expanded with the checkpoint's own tables or scales, straight to the
output dtype (rounded once); every other tensor is copied byte for byte, or cast with ``--dtype``;
config.json loses its quantization_config. The formats: :mod:`adaptertool.ops.quantized`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from adaptertool.errors import InputError
from adaptertool.io import DEFAULT_MAX_SHARD_BYTES, TensorSpec, cast_specs, dtype_code, open_checkpoint, staged_output, torch_dtype
from adaptertool.ops.measure import Stopwatch, peak_rss_bytes
from adaptertool.ops.model_files import write_model_files
from adaptertool.ops.quantize import check_sixteen_or_32_bit
from adaptertool.ops.quantized import open_quantized_view
from adaptertool.ops.stream import stream_checkpoint

__all__ = ["DequantConfig", "DequantReport", "dequantize"]


@dataclass(frozen=True, kw_only=True)
class DequantConfig:
    source: Path
    out: Path
    dtype: torch.dtype | None = None  # None: each weight's recorded dtype, other tensors kept
    max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES
    force: bool = False

    def __post_init__(self) -> None:
        check_sixteen_or_32_bit(self.dtype)


@dataclass(frozen=True, kw_only=True)
class DequantReport:
    out: str
    files: list[str]
    dequantized: int
    copied: int
    cast: int
    bytes_written: int
    side_files: list[str]
    seconds: float
    peak_rss_bytes: int


def dequantize(cfg: DequantConfig, *, progress: bool = False) -> DequantReport:
    """Expand every quantised weight of ``cfg.source`` (bitsandbytes 4-bit, FP8, MXFP4) into a plain checkpoint at ``cfg.out``."""
    clock = Stopwatch()
    with open_checkpoint(cfg.source) as stored:
        view = open_quantized_view(stored)
        if view is None:
            raise InputError(f"{cfg.source}: holds no quantised weights (bitsandbytes 4-bit, FP8 or MXFP4); "
                             "nothing to dequantize")
        specs = cast_specs(view.specs(), dtype_code(cfg.dtype) if cfg.dtype is not None else None)

        def expand(spec: TensorSpec) -> torch.Tensor | None:
            # Straight to the output dtype: a read at the view's dtype, then a cast, would round twice.
            return view.decode(spec.name, dtype=torch_dtype(spec.dtype)) if spec.name in view.quantized else None

        with staged_output(cfg.out, force=cfg.force, inputs=[cfg.source]) as tmp:
            written = stream_checkpoint(view, tmp, specs, max_shard_bytes=cfg.max_shard_bytes, metadata={"format": "pt"},
                                        produce=expand, desc="dequantize", progress=progress)
            side = write_model_files(stored.root, tmp, dtype=cfg.dtype, drop_quantization=True)
    return DequantReport(
        out=str(cfg.out), files=written.files, dequantized=len(view.quantized), copied=written.copied,
        cast=written.cast, bytes_written=written.bytes_written, side_files=side,
        seconds=clock.seconds, peak_rss_bytes=peak_rss_bytes(),
    )

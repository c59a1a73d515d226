"""reshard: rewrite a checkpoint with new shard sizes and, optionally, another float dtype.

Tensors whose dtype does not change are copied byte for byte; the rest are cast one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from adaptertool.io import DEFAULT_MAX_SHARD_BYTES, cast_specs, dtype_code, open_checkpoint, staged_output
from adaptertool.ops.measure import Stopwatch, peak_rss_bytes
from adaptertool.ops.model_files import write_model_files
from adaptertool.ops.options import check_float_dtype
from adaptertool.ops.stream import stream_checkpoint

if TYPE_CHECKING:  # torch is only needed (and imported by the reader) when a tensor is cast
    import torch

__all__ = ["ReshardConfig", "ReshardReport", "reshard"]

@dataclass(frozen=True, kw_only=True)
class ReshardConfig:
    source: Path
    out: Path
    max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES  # None: one file
    dtype: torch.dtype | None = None  # None: keep every tensor's dtype
    force: bool = False

    def __post_init__(self) -> None:
        check_float_dtype(self.dtype)


@dataclass(frozen=True, kw_only=True)
class ReshardReport:
    out: str
    files: list[str]
    tensors: int
    copied: int
    cast: int
    bytes_written: int
    side_files: list[str]
    seconds: float
    peak_rss_bytes: int


def reshard(cfg: ReshardConfig, *, progress: bool = False) -> ReshardReport:
    """Rewrite ``cfg.source`` into ``cfg.out``; see the module docstring."""
    clock = Stopwatch()
    with open_checkpoint(cfg.source) as source:
        specs = cast_specs(source.specs(), dtype_code(cfg.dtype) if cfg.dtype is not None else None)
        with staged_output(cfg.out, force=cfg.force, inputs=[cfg.source]) as tmp:
            done = stream_checkpoint(source, tmp, specs, max_shard_bytes=cfg.max_shard_bytes,
                                     metadata={**source.metadata, "format": "pt"},  # the user's, and format=pt for loaders
                                     desc="reshard", progress=progress)
            side = write_model_files(source.root, tmp, dtype=cfg.dtype)
    return ReshardReport(
        out=str(cfg.out), files=done.files, tensors=len(specs), copied=done.copied, cast=done.cast,
        bytes_written=done.bytes_written, side_files=side, seconds=clock.seconds, peak_rss_bytes=peak_rss_bytes(),
    )

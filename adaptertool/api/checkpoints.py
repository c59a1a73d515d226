"""Whole checkpoints: info, verify and reshard."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from adaptertool.api.arguments import OutPath, Source, float_dtype, progress_on, shard_bytes
from adaptertool.ops.sources import local_source

if TYPE_CHECKING:
    from adaptertool.ops.info import InfoReport
    from adaptertool.ops.reshard import ReshardReport
    from adaptertool.ops.verify import VerifyReport

__all__ = ["info", "reshard", "verify"]


def info(path: Source) -> InfoReport:
    """What a checkpoint or PEFT adapter holds, from headers alone (``adaptertool info``); never imports torch.

    Raises:
        InputError: a missing or malformed checkpoint. HubError: a Hub id that cannot be fetched.
    """
    from adaptertool.ops.info import info as run

    return run(local_source(path, progress=progress_on(None)))


def verify(path: Source, *, nan: bool = False, progress: bool | None = None) -> VerifyReport:
    """Check a checkpoint's headers, index, sizes and (``nan=True``) values (``adaptertool verify``).

    Problems found are in the report (``ok``, ``problems``, ``nonfinite``), not raised.

    Raises:
        InputError: a path that is not a checkpoint at all. HubError: a Hub id that cannot be fetched.
    """
    from adaptertool.ops.verify import verify as run

    shown = progress_on(progress)
    return run(local_source(path, progress=shown), nan=nan, progress=shown)


def reshard(source: Source, out: OutPath, *, max_shard_size: str | int = "5GB", dtype: str | None = None,
            force: bool = False, progress: bool | None = None) -> ReshardReport:
    """Rewrite a checkpoint with other shard sizes or float dtype (``adaptertool reshard``).

    Args:
        source: the checkpoint (the CLI's SOURCE), a path or Hub id.
        dtype: cast float tensors to bf16, fp16 or fp32; None keeps them.

    Raises:
        InputError, OptionError, OutputError, HubError: see docs/api.md.
    """
    from adaptertool.ops.reshard import ReshardConfig, reshard as run

    shown = progress_on(progress)
    cfg = ReshardConfig(source=local_source(source, progress=shown), out=Path(out), max_shard_bytes=shard_bytes(max_shard_size),
                        dtype=float_dtype("--dtype", dtype), force=force)
    return run(cfg, progress=shown)

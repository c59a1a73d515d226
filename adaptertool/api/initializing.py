"""init: a fresh PEFT adapter, initialised as PEFT does."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from adaptertool.api.arguments import OutPath, Source, float_dtype, progress_on, shard_bytes
from adaptertool.ops.sources import local_source

if TYPE_CHECKING:
    from adaptertool.ops.init import InitReport

__all__ = ["init"]


def init(base: Source, out: OutPath, *, rank: int = 16, alpha: float | None = None,
         targets: Sequence[str] = ("all-linear",), experts: str | None = None, rslora: bool = False, dora: bool = False,
         method: str = "default", pissa_niter: int | None = None, residual_base: OutPath | None = None, seed: int = 0,
         dtype: str = "fp32", max_shard_size: str | int = "5GB", force: bool = False,
         progress: bool | None = None) -> InitReport:
    """Write a fresh PEFT LoRA adapter for BASE (``adaptertool init``).

    The keyword arguments are the command's options: ``method`` is default, gaussian, pissa or olora
    (the last two also write ``residual_base``); ``alpha`` None means the rank (scaling 1).

    Raises:
        InputError, OptionError, OutputError, HubError: see docs/api.md.
    """
    from adaptertool.ops.init import InitConfig, init_adapter

    shown = progress_on(progress)
    cfg = InitConfig(
        base=local_source(base, progress=shown), out=Path(out), rank=rank, alpha=alpha, targets=tuple(targets),
        experts=experts, rslora=rslora, dora=dora, method=method, pissa_niter=pissa_niter,
        residual_base=None if residual_base is None else Path(residual_base), seed=seed,
        dtype=float_dtype("--dtype", dtype), max_shard_bytes=shard_bytes(max_shard_size), force=force,
    )
    return init_adapter(cfg, progress=shown)

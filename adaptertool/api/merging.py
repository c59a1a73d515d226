"""merge and subtract: fold adapters into a model, or take them back out."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from adaptertool.api.arguments import OutPath, Source, Weighted, float_dtype, progress_on, shard_bytes, weighted
from adaptertool.ops.sources import local_source

if TYPE_CHECKING:
    from adaptertool.ops.merge import MergeReport

__all__ = ["merge", "subtract"]


def merge(base: Source, adapter: Weighted, out: OutPath, *, add: Sequence[Weighted] = (), scale: float = 1.0,
          dtype: str = "auto", requantize: bool = False, max_shard_size: str | int = "5GB", device: str = "cpu",
          force: bool = False, progress: bool | None = None) -> MergeReport:
    """Merge PEFT adapters into their base model, streamed tensor by tensor (``adaptertool merge``).

    Args:
        base: the model folder or file, or a Hub id.
        adapter: a PEFT adapter folder or Hub id; with a weight as ``"ADAPTER:W"`` or ``(ADAPTER, W)``.
        out: the output folder.
        add: more adapters merged in the same pass, in order.
        scale: multiplies every adapter's weight.
        dtype: output float dtype, bf16, fp16 or fp32; auto keeps the base's.
        requantize: a quantised base is written in its own format again instead of dequantised.
        max_shard_size: largest shard, as text (5GB, 500MB, 2GiB) or bytes; 0: one file.
        device: where deltas are computed: cpu, cuda or auto.
        force: replace ``out`` if it exists (once the new one is complete).
        progress: draw progress bars; None: when stderr is a terminal or in a notebook.

    Returns:
        The MergeReport: files written, tensors changed, copied and cast.

    Raises:
        InputError, OptionError, OutputError, HubError: see docs/api.md.
    """
    return _merge(base, [adapter, *add], out, subtract=False, scale=scale, dtype=dtype, requantize=requantize,
                  max_shard_size=max_shard_size, device=device, force=force, progress=progress)


def subtract(model: Source, adapter: Weighted, out: OutPath, *, scale: float = 1.0, dtype: str = "auto",
             requantize: bool = False, max_shard_size: str | int = "5GB", device: str = "cpu", force: bool = False,
             progress: bool | None = None) -> MergeReport:
    """Take a merged adapter back out of a model, ``W - scale * delta`` (``adaptertool subtract``); the
    arguments are :func:`merge`'s.

    Raises:
        InputError: also for updates that cannot be undone (DoRA, IA3, modules_to_save).
    """
    return _merge(model, [adapter], out, subtract=True, scale=scale, dtype=dtype, requantize=requantize,
                  max_shard_size=max_shard_size, device=device, force=force, progress=progress)


def _merge(base: Source, adapters: list[Weighted], out: OutPath, *, subtract: bool, scale: float, dtype: str,
           requantize: bool, max_shard_size: str | int, device: str, force: bool, progress: bool | None) -> MergeReport:
    from adaptertool.ops.merge import MergeConfig, merge

    shown = progress_on(progress)
    cfg = MergeConfig(
        base=local_source(base, progress=shown), adapters=tuple(weighted(a, progress=shown) for a in adapters), out=Path(out),
        scale=scale, subtract=subtract, dtype=float_dtype("--dtype", dtype, auto=True),
        max_shard_bytes=shard_bytes(max_shard_size), device=device, force=force, requantize=requantize,
    )
    return merge(cfg, progress=shown)

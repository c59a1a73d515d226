"""extract: a LoRA adapter from a full fine-tune."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from adaptertool.api.arguments import OutPath, Source, float_dtype, progress_on
from adaptertool.ops.sources import local_source

if TYPE_CHECKING:
    from adaptertool.ops.extract import ExtractReport

__all__ = ["extract"]


def extract(base: Source, tuned: Source, out: OutPath, *, rank: int = 16, energy: float | None = None,
            auto_rank: bool = False, max_rank: int | None = None, targets: Sequence[str] = ("all-linear",),
            experts: str | None = None, svd: str = "randomized", niter: int = 6, oversample: int = 16,
            embeddings: str = "auto", norms: bool = True, report: OutPath | None = None, dtype: str = "fp32",
            device: str = "cpu", seed: int = 0, force: bool = False, progress: bool | None = None) -> ExtractReport:
    """A LoRA adapter approximating TUNED - BASE by truncated SVD (``adaptertool extract``).

    The keyword arguments are the command's options (``adaptertool extract -h``): ``rank`` is the fixed
    rule, ``energy`` or ``auto_rank`` a per-module one; ``report`` also writes the full report to that
    file (HTML for a name ending .html, else JSON); ``dtype`` is the factors' (bf16, fp16, fp32).

    Returns:
        The ExtractReport: per module rank, retained energy and relative error.

    Raises:
        InputError, OptionError, OutputError, HubError: see docs/api.md.
    """
    from adaptertool.ops.extract import ExtractConfig, extract as run

    shown = progress_on(progress)
    cfg = ExtractConfig(
        base=local_source(base, progress=shown), tuned=local_source(tuned, progress=shown), out=Path(out), rank=rank,
        energy=energy, auto_rank=auto_rank, max_rank=max_rank, targets=tuple(targets), experts=experts, svd=svd,
        niter=niter, oversample=oversample, embeddings=embeddings, norms=norms,
        report=None if report is None else Path(report), dtype=float_dtype("--dtype", dtype), device=device, seed=seed,
        force=force,
    )
    return run(cfg, progress=shown)

"""combine: several adapters for one base into one LoRA adapter."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from adaptertool.api.arguments import OutPath, Source, Weighted, float_dtype, progress_on, split_source
from adaptertool.errors import OptionError
from adaptertool.ops.sources import local_source

if TYPE_CHECKING:
    from adaptertool.ops.combine import CombineReport

__all__ = ["adapter_weights", "combine"]


def combine(adapters: Sequence[Weighted], out: OutPath, *, method: str = "linear",
            weights: str | Sequence[float] | None = None, density: float | None = None, rank: int | None = None,
            majority_sign: str | None = None, seed: int = 0, svd: str = "randomized", dtype: str = "fp32",
            force: bool = False, progress: bool | None = None) -> CombineReport:
    """Combine adapters into one LoRA adapter: weighted sums, SVD, TIES, DARE... (``adaptertool combine``).

    Args:
        adapters: each a path or Hub id, with its weight as ``"ADAPTER:W"`` or ``(ADAPTER, W)``.
        weights: one weight per adapter instead (a list, or the CLI's "0.7,0.3"); each adapter is
            then a path or Hub id as written, colons included.

    Raises:
        InputError, OptionError, OutputError, HubError: see docs/api.md.
    """
    from adaptertool.ops.combine import CombineConfig, combine as run

    shown = progress_on(progress)
    texts, weight_list = adapter_weights(adapters, weights)
    paths = tuple(local_source(text, kind="adapter", progress=shown) for text in texts)
    cfg = CombineConfig(adapters=paths, out=Path(out), weights=weight_list, method=method, density=density, rank=rank,
                        majority_sign=majority_sign, seed=seed, svd=svd, dtype=float_dtype("--dtype", dtype), force=force)
    return run(cfg, progress=shown)


def adapter_weights(adapters: Sequence[Weighted], weights: str | Sequence[float] | None,
                    ) -> tuple[list[Source], tuple[float, ...] | None]:
    """(the adapters, their weights) from ``ADAPTER:W`` suffixes or ``(ADAPTER, W)`` pairs, or from ``weights``;
    None where no weight is given anywhere (each then counts 1).

    Raises:
        OptionError: weights given both ways, or ``weights`` text that is not comma-separated numbers.
    """
    given = [split_source(a) for a in adapters]
    suffixed = any(w is not None for _, w in given)
    if weights is None:
        return [s for s, _ in given], tuple(1.0 if w is None else w for _, w in given) if suffixed else None
    if suffixed:
        raise OptionError("give weights either as ADAPTER:WEIGHT or with --weights, not both")
    # With --weights every argument is a path or Hub id as written, colons included.
    return list(adapters), _weights(weights)  # type: ignore[arg-type]


def _weights(weights: str | Sequence[float]) -> tuple[float, ...]:
    if not isinstance(weights, str):
        return tuple(weights)
    try:
        return tuple(float(w) for w in weights.split(","))
    except ValueError:
        raise OptionError(f"--weights must be comma-separated numbers, e.g. 0.7,0.3, not {weights!r}") from None

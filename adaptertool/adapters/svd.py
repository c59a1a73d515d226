"""Truncated SVD of weight deltas, for extracting LoRA adapters from full fine-tunes.

By Eckart-Young the best rank-r approximation of ``delta`` in Frobenius norm is the truncated SVD
``U_r S_r Vh_r``; as a PEFT LoRA with ``r == lora_alpha`` (scaling 1) it is ``B = U_r * S_r``,
``A = Vh_r``. The factors come from an exact SVD or, by default, from the randomized range finder
of Halko, Martinsson and Tropp, "Finding structure with randomness" (SIAM Review 2011,
arXiv:0909.4061), Algorithm 4.4 (subspace iteration) with oversampling: about ``2 (niter + 1)``
matmuls of the delta with a thin matrix instead of an ``O(out * in * min(out, in))`` full SVD.

Everything is computed in float32, on the delta's device; the caller casts the factors once.
Pure tensor maths: no files, no logging, no global random state (pass a ``torch.Generator``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adaptertool.errors import InputError, OptionError

__all__ = [
    "Factors",
    "RankPolicy",
    "break_even_rank",
    "choose_rank",
    "exact_svd",
    "factor_delta",
    "noise_edge",
    "noise_floor_energy",
    "randomized_svd",
    "rounding_noise_std",
]

# (same-size integer type, exponent bits, stored mantissa bits) of each IEEE format.
_LAYOUT = {torch.bfloat16: (torch.int16, 8, 7), torch.float16: (torch.int16, 5, 10),
           torch.float32: (torch.int32, 8, 23), torch.float64: (torch.int64, 11, 52)}
_CHUNK = 1 << 22  # elements per chunk when modelling rounding noise
_BLOCK_ROWS = 512  # rows per block when summing energies: bounded temporaries


@dataclass(frozen=True, kw_only=True)
class RankPolicy:
    """How many singular triplets to keep per module.

    One of: a fixed ``rank``; an ``energy`` target (smallest r with sum S_r^2 / ||delta||_F^2 >= energy);
    ``auto`` (count the singular values above the rounding-noise edge, see :func:`noise_edge`).
    ``max_rank`` caps every choice (for energy/auto it is also how many triplets are computed);
    every rank is further capped below the break-even point, where LoRA stops saving space.
    """

    rank: int = 16
    energy: float | None = None
    auto: bool = False
    max_rank: int | None = None  # None: ``rank`` for the fixed policy, 128 (mergekit's default) otherwise

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise OptionError(f"--rank must be a positive integer, not {self.rank}")
        if self.max_rank is not None and self.max_rank <= 0:
            raise OptionError(f"--max-rank must be a positive integer, not {self.max_rank}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise OptionError(f"--energy must lie in (0, 1], e.g. 0.9, not {self.energy}")
        if self.energy is not None and self.auto:
            raise OptionError("--energy and --auto-rank are two rank rules; choose one")

    @property
    def adaptive(self) -> bool:
        return self.energy is not None or self.auto

    @property
    def ceiling(self) -> int:
        """The most triplets any module may keep (before the break-even cap)."""
        if self.max_rank is not None:
            return self.max_rank if self.adaptive else min(self.rank, self.max_rank)
        return 128 if self.adaptive else self.rank


@dataclass(frozen=True, kw_only=True)
class Factors:
    """A rank-r approximation ``delta ~ b @ a`` and how good it is.

    ``b`` is (out, r) = U_r * S_r, ``a`` is (r, in) = Vh_r, both float32. ``rel_error`` is
    ||delta - b @ a||_F / ||delta||_F, measured on the factors returned, and ``retained`` is
    1 - rel_error^2, which equals sum S_r^2 / ||delta||_F^2 (the randomized factors too: U and Vh
    are orthonormal, so the residual's energy is ||delta||_F^2 - sum S_r^2).
    """

    b: torch.Tensor
    a: torch.Tensor
    # Every value computed (>= r of them), descending, float32 on the CPU: the exact SVD's whole
    # spectrum, or the randomized sketch's rank + oversample estimates (each a lower bound of the
    # true value: close for the top ones, increasingly low past the rank the sketch aimed at).
    singular_values: torch.Tensor
    rank: int
    retained: float
    rel_error: float
    delta_norm: float  # ||delta||_F
    capped: bool  # the policy wanted more than the caps allowed
    size_capped: bool = False  # ... and the binding cap was the break-even size, not max_rank
    # Relative error that the tuned side's rounding noise alone leaves after rank r (0 without noise_std).
    noise_floor: float = 0.0
    threshold: float | None = None  # the auto rule's cut: it kept the singular values above this


def break_even_rank(out_features: int, in_features: int, *, factor_bytes: int = 1, delta_bytes: int = 1) -> int:
    """The largest r whose factors are smaller than the dense delta, counted in bytes:
    r * (out + in) * factor_bytes < out * in * delta_bytes (at least 1).

    Bytes, not elements: float32 factors of a bf16 delta break even at half the element count's rank.
    """
    dense = out_features * in_features * delta_bytes
    # Never past full rank: there the factors are exact already (possible with narrower factors).
    return max(1, min(math.ceil(dense / ((out_features + in_features) * factor_bytes)) - 1, out_features, in_features))


def rounding_noise_std(tuned: torch.Tensor) -> float:
    """Per-element std of the rounding noise in a delta whose tuned side was stored as ``tuned``.

    Rounding to nearest leaves an error uniform in +-ulp/2 (variance ulp^2 / 12); the ulp depends
    only on a value's exponent field E: 2^(E - bias - mantissa bits), and 2^(1 - bias - mantissa
    bits) for zeros and subnormals (a stored 0 was rounded from something below the smallest normal,
    not from +-1/2^p). So a histogram of E gives the exact mean over the tensor, without float
    temporaries. The base is exact (it is what the adapter is added to), so only the tuned side's
    storage rounding counts.
    """
    layout = _LAYOUT.get(tuned.dtype)
    if layout is None:
        raise InputError(f"cannot model rounding noise of dtype {tuned.dtype}")
    view, exponent_bits, mantissa_bits = layout
    top = (1 << exponent_bits) - 1  # all ones: inf and NaN, left out
    counts = torch.zeros(top + 1, dtype=torch.float64)
    flat = tuned.detach().reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):  # in chunks: bounded integer temporaries
        field = (flat[start : start + _CHUNK].view(view) >> mantissa_bits) & top
        counts += torch.bincount(field.reshape(-1), minlength=top + 1).cpu().double()
    bias = (1 << (exponent_bits - 1)) - 1
    used = torch.nonzero(counts[:top]).reshape(-1)
    ulp_exponent = used.clamp(min=1).double() - bias - mantissa_bits
    total = float((counts[used] * torch.exp2(2 * ulp_exponent)).sum())
    return math.sqrt(total / max(1, flat.numel()) / 12.0)


def noise_edge(noise_std: float, out_features: int, in_features: int) -> float:
    """Largest singular value expected of pure i.i.d. noise: sigma * (sqrt(out) + sqrt(in)).

    The Marchenko-Pastur bulk edge (Bai-Yin); finite matrices overshoot it by O(n^(-2/3)), hence
    the small margin applied in :func:`choose_rank`.
    """
    return noise_std * (math.sqrt(out_features) + math.sqrt(in_features))


def noise_floor_energy(noise_std: float, out_features: int, in_features: int, rank: int) -> float:
    """Expected energy of i.i.d. noise left in the residual of a rank-r approximation.

    The residual is the delta projected off the kept left and right subspaces, which leaves
    (out - r)(in - r) of the out * in noise dimensions: sigma^2 (out - r)(in - r). (The SVD's subspaces
    lean towards the noise a little, so the true floor is slightly lower: an estimate.)
    """
    return noise_std**2 * max(0, out_features - rank) * max(0, in_features - rank)


def exact_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The optimal rank-``rank`` triplets (U_r, S_r, Vh_r) from a full thin SVD (float32)."""
    u, s, vh = _exact(delta, rank)
    return u, s[:rank], vh


def _exact(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r, every singular value, Vh_r) of the full thin SVD."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    return u[:, :rank], s, vh[:rank]


def randomized_svd(delta: torch.Tensor, rank: int, *, generator: torch.Generator, niter: int = 6,
                   oversample: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Approximate top-``rank`` triplets (U_r, S_r, Vh_r) by randomized subspace iteration (float32).

    Args:
        delta: (out, in) matrix, float32 (not modified).
        rank: triplets to return.
        generator: a CPU generator; the Gaussian test matrix is drawn on the CPU and moved, so a
            given seed gives the same factors on every device.
        niter: power (subspace) iterations; each sharpens a flat spectrum (reference table:
            +12 % excess error with 0, +0.1 % with 2 at rank 16).
        oversample: extra columns in the sketch beyond ``rank``.
    """
    u, s, vh = _randomized(delta, rank, generator=generator, niter=niter, oversample=oversample)
    return u, s[:rank], vh


def _randomized(delta: torch.Tensor, rank: int, *, generator: torch.Generator, niter: int,
                oversample: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r, the sketch's rank + oversample singular values, Vh_r) of :func:`randomized_svd`."""
    out_features, in_features = delta.shape
    width = min(rank + oversample, out_features, in_features)
    omega = torch.randn(in_features, width, generator=generator, dtype=torch.float32).to(delta.device)
    q = torch.linalg.qr(delta @ omega).Q  # (out, in) @ (in, k) -> (out, k)
    for _ in range(niter):
        # Re-orthonormalise after every product: without it the columns collapse onto the top
        # singular vector in float32 and the smaller triplets are lost.
        p = torch.linalg.qr(delta.T @ q).Q  # (in, out) @ (out, k) -> (in, k)
        q = torch.linalg.qr(delta @ p).Q
    small = q.T @ delta  # (k, out) @ (out, in) -> (k, in)
    u_small, s, vh = torch.linalg.svd(small, full_matrices=False)
    return (q @ u_small[:, :rank]), s, vh[:rank]


def choose_rank(singular_values: torch.Tensor, total_energy: float, policy: RankPolicy, *, cap: int,
                edge: float | None = None) -> tuple[int, bool]:
    """The rank ``policy`` picks from descending ``singular_values``, and whether ``cap`` cut it.

    ``total_energy`` is ||delta||_F^2; ``edge`` the noise edge (needed for ``policy.auto``). Never
    returns 0: a changed module keeps at least one triplet.
    """
    s = singular_values.double().cpu()
    if policy.auto:
        if edge is None:
            raise ValueError("auto rank needs the noise edge")
        wanted = int((s > _auto_threshold(s, edge)).sum())
    elif policy.energy is not None:
        kept = torch.cumsum(s.square(), 0) / total_energy if total_energy > 0 else torch.ones_like(s)
        reached = torch.nonzero(kept >= policy.energy - 1e-12)
        # Not reached within the computed triplets: the policy wants more than we computed (the cap).
        wanted = int(reached[0]) + 1 if len(reached) else cap + 1
    else:
        wanted = policy.rank
    return max(1, min(wanted, cap)), wanted > cap


def _auto_threshold(singular_values: torch.Tensor, edge: float) -> float:
    """The auto rule's cut: it keeps the descending ``singular_values`` above this.

    10 % above the noise ``edge``: finite matrices' largest noise singular value fluctuates around it
    (measured here on 576x1536 bf16 rounding noise: within 1 % of the edge). For float32 checkpoints
    the storage noise is below what a float32 SVD resolves: singular values under
    eps32 * s_max * sqrt(n) are numerically zero whatever the storage noise says.
    """
    s = singular_values
    resolution = float(s[0]) * torch.finfo(torch.float32).eps * len(s) ** 0.5 if len(s) else 0.0
    return max(1.1 * edge, resolution)


def factor_delta(delta: torch.Tensor, policy: RankPolicy, *, method: str = "randomized",
                 generator: torch.Generator | None = None, niter: int = 6, oversample: int = 16,
                 noise_std: float = 0.0, break_even: int | None = None) -> Factors:
    """Factor ``delta`` (out, in) into ``b @ a`` with the rank ``policy`` picks.

    Args:
        delta: float32 (out, in) difference tuned - base; not modified, must not be all zero.
        policy: the rank rule and caps.
        method: "randomized" (default) or "exact" (torch.linalg.svd, the optimum).
        generator: required for "randomized".
        niter, oversample: randomized SVD settings.
        noise_std: per-element rounding-noise std of the tuned side (see :func:`rounding_noise_std`):
            the edge for ``policy.auto``, and the reported ``noise_floor``.
        break_even: the largest rank worth storing (see :func:`break_even_rank`); default: by elements.

    Returns:
        :class:`Factors` with B = U_r * S_r (out, r) and A = Vh_r (r, in).
    """
    if delta.dim() != 2:
        raise ValueError(f"delta must be 2-D, got shape {list(delta.shape)}")
    out_features, in_features = delta.shape
    if break_even is None:
        break_even = break_even_rank(out_features, in_features)
    cap = min(policy.ceiling, break_even)
    total = _energy(delta)
    if total == 0.0:
        raise ValueError("delta is all zero; skip the module instead of factoring it")
    # Adaptive rules look one triplet past the cap so that "capped" can be told apart from "exactly cap".
    width = min(cap + 1, out_features, in_features) if policy.adaptive else cap
    u, computed, vh = _svd(delta, width, method, generator=generator, niter=niter, oversample=oversample)
    s = computed[:width]  # the rule sees the same values whatever else was computed
    edge = noise_edge(noise_std, out_features, in_features) if policy.auto else None
    rank, capped = choose_rank(s, total, policy, cap=cap, edge=edge)
    if not policy.adaptive:
        capped = policy.rank > cap
    b = u[:, :rank] * s[:rank]  # (out, r) * (r,) -> scale column i by S_i
    a = vh[:rank].contiguous()
    residual = _residual_energy(delta, b, a)
    floor = noise_floor_energy(noise_std, out_features, in_features, rank)
    return Factors(
        b=b,
        a=a,
        singular_values=computed.detach().cpu(),
        rank=rank,
        retained=max(0.0, 1.0 - residual / total),
        rel_error=math.sqrt(residual / total),
        delta_norm=math.sqrt(total),
        capped=capped,
        size_capped=capped and break_even < policy.ceiling,
        noise_floor=math.sqrt(min(floor, residual) / total),
        threshold=_auto_threshold(s.double().cpu(), edge) if edge is not None else None,
    )


def _svd(delta: torch.Tensor, width: int, method: str, *, generator: torch.Generator | None, niter: int,
         oversample: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_width, every singular value computed, Vh_width)."""
    if method == "exact" or (method == "randomized" and _sketch_too_wide(width + oversample, *delta.shape)):
        return _exact(delta, width)
    if method != "randomized":
        raise OptionError(f"--svd must be randomized or exact, not {method!r}")
    if generator is None:
        raise ValueError("randomized SVD needs an explicit torch.Generator")
    return _randomized(delta, width, generator=generator, niter=niter, oversample=oversample)


def _sketch_too_wide(columns: int, out_features: int, in_features: int) -> bool:
    """Whether the exact SVD is the cheaper one: measured on one core (576x576, 1536x576, 192x576),
    subspace iteration with 6 power iterations costs as much as the full SVD once its sketch spans
    about 30 % of the smaller side, and more beyond; there the exact SVD is also the optimum."""
    return 10 * columns >= 3 * min(out_features, in_features)


def _residual_energy(delta: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    """||delta - b @ a||_F^2, one row block at a time (memory: one block, not a second delta).

    In exact arithmetic it is ||delta||_F^2 - sum S_r^2, but that difference loses all precision when
    the approximation is nearly exact (float32 S: relative error floors at ~5e-4); one more
    (out, r) @ (r, in) product, as cheap as one sketch step, measures it directly.
    """
    energy = 0.0
    for start in range(0, delta.shape[0], _BLOCK_ROWS):
        rows = slice(start, start + _BLOCK_ROWS)
        block = torch.addmm(delta[rows], b[rows], a, alpha=-1.0)  # (rows, r) @ (r, in) -> (rows, in)
        energy += _energy(block)
    return energy


def _energy(matrix: torch.Tensor) -> float:
    """||matrix||_F^2 accumulated in float64, by row blocks.

    A float32 norm of a 4096x4096 matrix comes out 0.15 % low here (its accumulator loses the small
    terms): as large as the whole excess error that randomized SVD is allowed.
    """
    return sum(float(torch.linalg.vector_norm(matrix[start : start + _BLOCK_ROWS], dtype=torch.float64) ** 2)
               for start in range(0, matrix.shape[0], _BLOCK_ROWS))

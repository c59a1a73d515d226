"""Adapter algebra: several additive adapter updates of one module combined into one LoRA update.

Every module is handled in *factor space*: the matrix ``M = scaling * B @ A`` a LoRA stores, shape
``(out, in)`` for a Linear (also when ``fan_in_fan_out`` stores the base weight transposed) and
``(D, V)`` for an Embedding (whose table delta is ``M.T``). With adapter weights ``w_i``:

- exact methods keep every input's factors and stack them, so that ``B' @ A' = sum_i w_i M_i``
  (the combined adapter has ``lora_alpha == r``, scaling 1, and rank ``sum_i r_i``):
  ``cat`` puts ``w_i s_i`` on the A blocks, ``linear`` splits it as ``sign * sqrt(|w_i s_i|)`` on A
  and ``sqrt(|w_i s_i|)`` on B (balanced factors; PEFT's construction for one adapter);
- task-vector methods act on the full matrices ``tau_i = M_i`` (Ilharco et al. 2023, task
  arithmetic, https://arxiv.org/abs/2212.04089) and the result is re-factored by truncated SVD
  (:mod:`adaptertool.adapters.svd`):

  * sum:             ``sum_i w_i tau_i``
  * magnitude_prune: ``sum_i w_i trim(tau_i)``, ``trim`` keeping the ``density`` fraction of
                     largest-magnitude entries
  * ties (Yadav et al. 2023, https://arxiv.org/abs/2306.01708): ``t_i = w_i trim(tau_i)``; the
    elected sign ``g = sign(sum_i t_i)`` ("total") or ``sign(sum_i sign(t_i))`` ("frequency"),
    ``+1`` where that is 0; ``merged = sum_i t_i [sign(t_i) = g] / max(1, #{i: sign(t_i) = g})``
  * dare_linear (Yu et al. 2024, https://arxiv.org/abs/2311.03099): ``sum_i w_i drop(tau_i)``,
    ``drop`` keeping each entry with probability ``density`` and dividing survivors by ``density``
  * dare_ties: ties' election and disjoint mean over ``t_i = w_i drop(tau_i)``

Unlike PEFT's ``ties``, the sign is elected on the *weighted* task vectors, so a negative weight
(subtracting a task) votes with the sign it actually contributes.

Pure float32 tensor maths: no files, no global random state (DARE takes a ``torch.Generator``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "EXACT_METHODS",
    "METHODS",
    "LowRank",
    "combine_task_vectors",
    "dare_drop",
    "magnitude_trim",
    "stack_factors",
    "ties_merge",
]

# method name -> the task-vector operation applied before the SVD ("" for the exact methods).
# PEFT's "*_svd" names are accepted: every task-vector method here works on full deltas and
# re-factors them by SVD, so "ties" and "ties_svd" are the same computation.
METHODS: dict[str, str] = {
    "linear": "", "cat": "",
    "svd": "sum",
    "ties": "ties", "ties_svd": "ties",
    "dare_linear": "dare_linear", "dare_linear_svd": "dare_linear", "dare_svd": "dare_linear",
    "dare_ties": "dare_ties", "dare_ties_svd": "dare_ties",
    "magnitude_prune": "magnitude_prune", "magnitude_prune_svd": "magnitude_prune",
}
EXACT_METHODS = ("linear", "cat")
_OPERATIONS = ("sum", "ties", "dare_linear", "dare_ties", "magnitude_prune")


@dataclass(frozen=True)
class LowRank:
    """One input's update in factor space: ``M = coefficient * b @ a``, ``b: (out, r)``, ``a: (r, in)``."""

    b: torch.Tensor
    a: torch.Tensor
    coefficient: float


def stack_factors(parts: Sequence[LowRank], weights: Sequence[float], *, balanced: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(B', A')`` with ``B' @ A' = sum_i w_i c_i b_i @ a_i`` exactly (up to float32 rounding).

    ``A' = cat_i(alpha_i a_i)`` along the rank axis, ``B' = cat_i(beta_i b_i)``, where
    ``alpha_i beta_i = w_i c_i``: ``alpha_i = w_i c_i, beta_i = 1`` (``cat``), or with ``balanced``
    ``alpha_i = sign(w_i c_i) sqrt(|w_i c_i|)``, ``beta_i = sqrt(|w_i c_i|)`` (``linear``). The rank
    is ``sum_i r_i``: each block's product is one input's weighted update, and block products add.

    Returns:
        ``B' (out, sum r_i)`` and ``A' (sum r_i, in)``, float32.
    """
    if len(parts) != len(weights) or not parts:
        raise ValueError("stack_factors needs one weight per part, and at least one part")
    a_blocks, b_blocks = [], []
    for part, weight in zip(parts, weights):
        factor = weight * part.coefficient
        if balanced:
            root = math.sqrt(abs(factor))
            # A float32 multiplier, as PEFT's torch.tensor(weights): one adapter then matches it bit for bit.
            a_blocks.append(part.a.float() * torch.tensor(math.copysign(root, factor), dtype=torch.float32))
            b_blocks.append(part.b.float() * torch.tensor(root, dtype=torch.float32))
        else:
            a_blocks.append(part.a.float() * torch.tensor(factor, dtype=torch.float32))
            b_blocks.append(part.b.float())
    return torch.cat(b_blocks, dim=1), torch.cat(a_blocks, dim=0)  # (out, sum r) and (sum r, in)


def magnitude_trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """``tau`` with all but its ``k = max(1, floor(density * numel + 1/2))`` largest-magnitude entries zeroed.

    Entries tied with the k-th largest magnitude are all kept (a threshold, not an arbitrary pick),
    so the result does not depend on sort stability. ``density`` in (0, 1]; 1 returns a copy.
    """
    _check_density(density)
    flat = tau.float().reshape(-1)
    k = max(1, min(flat.numel(), math.floor(density * flat.numel() + 0.5)))
    if k == flat.numel():
        return tau.float().clone()
    magnitude = flat.abs()
    threshold = torch.kthvalue(magnitude, flat.numel() - k + 1).values  # the k-th largest magnitude
    return torch.where(magnitude >= threshold, flat, torch.zeros_like(flat)).reshape(tau.shape)


def dare_drop(tau: torch.Tensor, density: float, *, generator: torch.Generator) -> torch.Tensor:
    """DARE's drop-and-rescale: each entry kept with probability ``density``, survivors divided by it.

    ``E[dare_drop(tau)] = tau``. The uniform draws come from ``generator`` on the CPU (one float32
    per entry, in row-major order), so a seed gives the same mask on every run and device.
    """
    _check_density(density)
    keep = torch.rand(tau.shape, generator=generator, dtype=torch.float32) < density
    return torch.where(keep.to(tau.device), tau.float() / density, torch.zeros((), device=tau.device))


def ties_merge(terms: Sequence[torch.Tensor], *, majority_sign: str = "total") -> torch.Tensor:
    """TIES' sign election and disjoint mean over already weighted and trimmed terms ``t_i``.

    ``g = sign(sum_i t_i)`` ("total") or ``sign(sum_i sign(t_i))`` ("frequency"), +1 where 0;
    ``result = sum_i t_i [sign(t_i) = g] / max(1, #{i: sign(t_i) = g})``. Zeros never agree with
    ``g``, so entries every input trimmed stay 0. Memory: two accumulators, not a stack of terms.
    """
    if majority_sign not in ("total", "frequency"):
        raise ValueError(f"majority_sign must be total or frequency, not {majority_sign!r}")
    if not terms:
        raise ValueError("ties_merge needs at least one term")
    vote = torch.zeros_like(terms[0], dtype=torch.float32)
    for term in terms:
        vote += term if majority_sign == "total" else torch.sign(term)
    elected = torch.where(vote >= 0, 1.0, -1.0)
    total = torch.zeros_like(vote)
    count = torch.zeros_like(vote)
    for term in terms:
        agree = torch.sign(term) == elected
        total += torch.where(agree, term, 0.0)
        count += agree
    return total / count.clamp_min(1.0)


def combine_task_vectors(taus: Sequence[torch.Tensor], weights: Sequence[float], *, operation: str,
                         density: float = 1.0, majority_sign: str = "total",
                         generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """One task-vector ``operation`` (see the module docstring) over same-shaped ``taus``, in float32.

    Args:
        taus: the inputs' full updates in factor space (not modified).
        weights: one per input; may be negative.
        operation: sum, ties, dare_linear, dare_ties or magnitude_prune.
        density: kept fraction for trim/drop, in (0, 1].
        majority_sign: "total" or "frequency" (ties, dare_ties).
        generators: one per input, for the DARE masks.
    """
    if operation not in _OPERATIONS:
        raise ValueError(f"unknown task-vector operation {operation!r}")
    if len(taus) != len(weights) or not taus:
        raise ValueError("combine_task_vectors needs one weight per task vector, and at least one")
    if operation.startswith("dare") and (generators is None or len(generators) != len(taus)):
        raise ValueError("DARE needs one torch.Generator per task vector")
    terms = []
    for i, (tau, weight) in enumerate(zip(taus, weights)):
        if operation in ("ties", "magnitude_prune"):
            tau = magnitude_trim(tau, density)
        elif operation.startswith("dare"):
            tau = dare_drop(tau, density, generator=generators[i])  # type: ignore[index]
        terms.append(tau.float() * weight)
    if operation in ("ties", "dare_ties"):
        return ties_merge(terms, majority_sign=majority_sign)
    result = terms[0]
    for term in terms[1:]:
        result += term
    return result


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must lie in (0, 1], not {density}")

"""LoRA-family update maths: LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685), rsLoRA
(Kalajdzievski 2023, https://arxiv.org/abs/2312.03732), DoRA (Liu et al. 2024,
https://arxiv.org/abs/2402.09353) and AdaLoRA (Zhang et al. 2023, https://arxiv.org/abs/2303.10512).

A LoRA module adds ``delta = scaling * B @ A`` to a frozen weight, with ``A: (r, in)``,
``B: (out, r)`` and ``scaling = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``). Deltas are computed in
float32, in the same operation order as PEFT, so that a float32 merge matches PEFT bit for bit.
"""

from __future__ import annotations

import math

import torch

__all__ = ["adalora_delta", "dora_rescale_", "embedding_delta", "linear_delta", "lora_scaling", "merge_linear_into"]

# Elements per row block in merge_linear_into: 1 MiB of float32, so each block stays in cache;
# but never fewer rows than _MIN_BLOCK_ROWS (see there).
_BLOCK_ELEMS = 1 << 18
_MIN_BLOCK_ROWS = 64


def lora_scaling(alpha: float, rank: int, *, rslora: bool) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def linear_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, *, fan_in_fan_out: bool = False) -> torch.Tensor:
    """``(B @ A) * scaling`` in float32: ``(out, r) @ (r, in) -> (out, in)``.

    With ``fan_in_fan_out`` (GPT-2's Conv1D stores weights as ``(in, out)``) the result is transposed.
    """
    delta = (lora_b.float() @ lora_a.float()).mul_(scaling)  # in place: one (out, in) buffer, not two
    return delta.T if fan_in_fan_out else delta


def merge_linear_into(out: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                      scaling: float, *, scale: float = 1.0) -> torch.Tensor:
    """``out = round(float32(W) + scale * ((B @ A) * scaling))`` for a Linear stored ``(out, in)``.

    The same float32 operations as :func:`linear_delta` plus an add, run on blocks of rows that
    stay in cache (product, scaling, add, rounding) instead of five passes over memory. Each
    block's product is ``B[rows] @ A``: element for element the same dot products as the whole
    ``B @ A``. Blocks keep at least 64 rows: with two threads, MKL multiplies 16-row blocks of a
    (4096, 14336) product with another kernel, off by an ulp here and there (measured); from 32
    rows on, every shape tried matched the whole product bit for bit.

    Args:
        out: the result, shaped like ``weight``, in the output dtype; written in place.
    """
    rows, cols = weight.shape
    lora_a, lora_b = lora_a.float(), lora_b.float()
    step = max(_MIN_BLOCK_ROWS, _BLOCK_ELEMS // cols)
    block = torch.empty(min(step, rows), cols)
    delta = torch.empty(min(step, rows), cols)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        part = torch.mm(lora_b[start:stop], lora_a, out=delta[: stop - start])  # (rows, r) @ (r, in)
        work = block[: stop - start].copy_(weight[start:stop])
        work.add_(part.mul_(scaling), alpha=scale)
        out[start:stop].copy_(work)
    return out


def embedding_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Embedding LoRA in float32: ``A: (r, V)``, ``B: (D, r)``; ``(B @ A).T -> (V, D)``, as the table."""
    return (lora_b.float() @ lora_a.float()).mul_(scaling).T


def adalora_delta(lora_a: torch.Tensor, lora_e: torch.Tensor, lora_b: torch.Tensor, scaling: float, *,
                  fan_in_fan_out: bool = False) -> torch.Tensor:
    """AdaLoRA's SVD-form update in float32: ``B @ (A * E) * scaling / (r + 1e-5)``.

    ``A: (r, in)``, ``E: (r, 1)`` (the singular values), ``B: (out, r)``. PEFT divides by its
    ``ranknum`` buffer, a float32 holding the loaded rank, which is not saved: it is ``A.shape[0]``.
    """
    ranknum = torch.tensor([float(lora_a.shape[0])]) + 1e-5
    delta = lora_b.float() @ (lora_a.float() * lora_e.float())
    return (delta.T if fan_in_fan_out else delta) * scaling / ranknum


def dora_rescale_(weight: torch.Tensor, magnitude: torch.Tensor, *, dim: int) -> torch.Tensor:
    """DoRA's merge, in place on ``weight`` (float32, already ``W + delta``): ``m / ||W + delta|| * (W + delta)``.

    ``dim`` is the axis the norm runs over: 1 (over inputs, one norm per output row) for a Linear
    stored ``(out, in)``; 0 for a ``(in, out)`` Conv1D weight or an embedding table ``(V, D)``,
    whose magnitude has one entry per column.
    """
    norm = torch.linalg.norm(weight.T if dim == 0 else weight, dim=1)
    factor = magnitude.float() / norm
    return weight.mul_(factor.view(1, -1) if dim == 0 else factor.view(-1, 1))

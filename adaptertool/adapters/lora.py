"""LoRA merge arithmetic (Hu et al. 2021, https://arxiv.org/abs/2106.09685) and rsLoRA scaling
(Kalajdzievski 2023, https://arxiv.org/abs/2312.03732).

A LoRA module adds ``delta = scaling * B @ A`` to a frozen weight, with ``A: (r, in)``,
``B: (out, r)`` and ``scaling = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``). Everything here computes
in float32 and rounds once, at the end, to the output dtype.
"""

from __future__ import annotations

import math

import torch

__all__ = ["add_delta", "embedding_delta", "linear_delta", "lora_scaling"]


def lora_scaling(alpha: float, rank: int, *, rslora: bool) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def linear_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, *, fan_in_fan_out: bool = False) -> torch.Tensor:
    """``scaling * B @ A`` in float32: ``(out, r) @ (r, in) -> (out, in)``.

    With ``fan_in_fan_out`` (GPT-2's Conv1D stores weights as ``(in, out)``) the result is transposed.
    """
    delta = lora_b.float() @ lora_a.float()
    return (delta.T if fan_in_fan_out else delta) * scaling


def embedding_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Embedding LoRA in float32: ``A: (r, V)``, ``B: (D, r)``; ``(B @ A).T -> (V, D)``, as the table."""
    return (lora_b.float() @ lora_a.float()).T * scaling


def add_delta(weight: torch.Tensor, delta: torch.Tensor, *, scale: float = 1.0, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``float32(weight) + scale * delta``, rounded once to ``dtype`` (default: the weight's dtype)."""
    # Multiplying by +-1 is exact, so merge and unmerge round exactly as a plain add/subtract.
    return (weight.float() + scale * delta).to(dtype or weight.dtype)

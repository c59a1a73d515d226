"""(IA)^3 (Liu et al. 2022, https://arxiv.org/abs/2205.05638): learned vectors that rescale a
layer's weights instead of adding to them.

``ia3_l`` is ``(out, 1)`` (rescales output rows, and the bias) or, on feed-forward modules,
``(1, in)`` (rescales input columns); merging is ``W * l`` broadcast as stored.
"""

from __future__ import annotations

import torch

__all__ = ["ia3_scale_"]


def ia3_scale_(weight: torch.Tensor, ia3_l: torch.Tensor, *, fan_in_fan_out: bool = False) -> torch.Tensor:
    """``W * l`` in place on a float32 ``weight``; ``l`` is transposed for ``(in, out)`` Conv1D weights."""
    scale = ia3_l.float()
    return weight.mul_(scale.T if fan_in_fan_out else scale)

"""LyCORIS-family updates: LoHa (Hyeon-Woo et al. 2022, FedPara, https://arxiv.org/abs/2108.06098)
and LoKr (Yeh et al. 2024, https://arxiv.org/abs/2309.14859), as PEFT defines them for Linear layers.

Both are computed in float32 with ``scaling = alpha / r`` (PEFT >= 0.14 also scales LoKr; older
PEFT did not, so old LoKr adapters with alpha != r merged differently there).
"""

from __future__ import annotations

import torch

__all__ = ["loha_delta", "lokr_delta"]


def loha_delta(w1_a: torch.Tensor, w1_b: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """LoHa: the Hadamard product of two low-rank products, ``((w1a @ w1b) * (w2a @ w2b)) * scaling``.

    ``w*_a: (out, r)``, ``w*_b: (r, in)`` -> ``(out, in)``.
    """
    # PEFT multiplies by a float32 tensor holding the scaling; the same here keeps bit equality.
    return ((w1_a.float() @ w1_b.float()) * (w2_a.float() @ w2_b.float())) * torch.tensor(scaling)


def lokr_delta(w1: torch.Tensor, w2: torch.Tensor, scaling: float) -> torch.Tensor:
    """LoKr: ``kron(w1, w2) * scaling``; ``w1: (a, b)``, ``w2: (c, d)`` -> ``(a*c, b*d)``.

    Factored forms are multiplied out by the caller (``w1 = w1_a @ w1_b``, likewise ``w2``).
    """
    return torch.kron(w1.float(), w2.float().contiguous()) * scaling

"""Fresh LoRA factors, initialised as PEFT 0.21 initialises them.

A Linear LoRA adds ``scaling * B @ A`` to ``W`` (``A: (r, in)``, ``B: (out, r)``); an embedding
LoRA adds ``scaling * (B @ A).T`` (``A: (r, V)``, ``B: (D, r)``).

- default (LoRA, Hu et al. 2021, https://arxiv.org/abs/2106.09685): ``A ~ kaiming_uniform(a=sqrt(5))``,
  nn.Linear's own reset, i.e. ``U(-1/sqrt(in), 1/sqrt(in))``; ``B = 0``.
- gaussian: ``A ~ N(0, (1/r)^2)`` (standard deviation ``1/r``); ``B = 0``.
- embeddings, whatever the method (PEFT resets every embedding LoRA this way): ``A = 0``, ``B ~ N(0, 1)``.
- PiSSA (Meng et al. 2024, https://arxiv.org/abs/2404.02948): ``W = U S Vh``,
  ``S_r' = S[:r] / scaling``, ``A = diag(sqrt(S_r')) Vh[:r]``, ``B = U[:, :r] diag(sqrt(S_r'))``,
  so that ``scaling * B @ A = U_r S_r Vh_r``; fast PiSSA takes the triplets from a randomized SVD.
- OLoRA (Buyukakyuz 2024, https://arxiv.org/abs/2406.01775): ``W = Q R``, ``B = Q[:, :r]``,
  ``A = R[:r]`` (no division by the scaling, as in PEFT).

PiSSA and OLoRA move ``scaling * B @ A`` out of the base: the residual ``W - (scaling * B) @ A``
(PEFT's operation order) replaces ``W``, so residual + adapter is the original model.

Everything is float32; inputs are never modified. Pure tensor maths: no files, no global random
state (pass a ``torch.Generator``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adaptertool.adapters.svd import exact_svd, randomized_svd
from adaptertool.errors import OptionError

__all__ = [
    "InitFactors",
    "default_factors",
    "dora_magnitude",
    "embedding_factors",
    "gaussian_factors",
    "olora_factors",
    "pissa_factors",
]


@dataclass(frozen=True)
class InitFactors:
    """Initial factors and, for PiSSA/OLoRA, the residual weight that replaces the base's (float32)."""

    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    residual: torch.Tensor | None = None  # (out, in) = W - (scaling * b) @ a; None: the base is unchanged


def default_factors(out_features: int, in_features: int, rank: int, *, generator: torch.Generator) -> InitFactors:
    """PEFT's ``init_lora_weights=True`` for a Linear: A as nn.Linear's reset (kaiming-uniform, a=sqrt(5)), B = 0."""
    a = torch.empty(rank, in_features)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return InitFactors(a=a, b=torch.zeros(out_features, rank))


def gaussian_factors(out_features: int, in_features: int, rank: int, *, generator: torch.Generator) -> InitFactors:
    """PEFT's ``init_lora_weights="gaussian"``: A ~ N(0, std=1/r), B = 0."""
    a = torch.empty(rank, in_features)
    torch.nn.init.normal_(a, std=1.0 / rank, generator=generator)
    return InitFactors(a=a, b=torch.zeros(out_features, rank))


def embedding_factors(vocab: int, dim: int, rank: int, *, generator: torch.Generator) -> InitFactors:
    """PEFT's embedding LoRA init: ``lora_embedding_A (r, V) = 0``, ``lora_embedding_B (D, r) ~ N(0, 1)``."""
    b = torch.empty(dim, rank)
    torch.nn.init.normal_(b, generator=generator)
    return InitFactors(a=torch.zeros(rank, vocab), b=b)


def pissa_factors(weight: torch.Tensor, rank: int, scaling: float, *, niter: int | None = None,
                  generator: torch.Generator | None = None) -> InitFactors:
    """PiSSA's principal-singular-vector init of ``weight`` (out, in) and its residual.

    Args:
        weight: the base weight (any float dtype; read as float32, not modified).
        rank: r, at most ``min(out, in)``.
        scaling: the adapter's ``alpha / r`` (or ``alpha / sqrt(r)``).
        niter: None for the exact SVD (PEFT's ``"pissa"``); otherwise fast PiSSA (PEFT's
            ``"pissa_niter_N"``): a randomized SVD with ``niter`` power iterations (it also
            oversamples, so it is closer to the exact triplets than torch.svd_lowrank with q=r).
        generator: required with ``niter``.
    """
    w = _matrix(weight, rank)
    if niter is None:
        u, s, vh = exact_svd(w, rank)
    else:
        if generator is None:
            raise ValueError("fast PiSSA needs an explicit torch.Generator")
        u, s, vh = randomized_svd(w, rank, generator=generator, niter=niter)
    root = torch.sqrt(s / scaling)  # sqrt(S_r / scaling): each factor carries half of the singular value
    a = root[:, None] * vh  # diag(root) @ Vh_r: (r, in)
    b = u * root  # U_r @ diag(root): (out, r)
    return InitFactors(a=a.contiguous(), b=b.contiguous(), residual=w - (scaling * b) @ a)


def olora_factors(weight: torch.Tensor, rank: int, scaling: float) -> InitFactors:
    """OLoRA's orthonormal init: ``Q, R = qr(W)``, ``B = Q[:, :r]``, ``A = R[:r]``, residual ``W - (scaling * B) @ A``.

    ``weight`` (out, in) is read as float32 and not modified; ``rank`` is at most ``min(out, in)``.
    """
    w = _matrix(weight, rank)
    q, r = torch.linalg.qr(w)  # reduced: (out, k), (k, in) with k = min(out, in)
    b = q[:, :rank].contiguous()
    a = r[:rank].contiguous()
    return InitFactors(a=a, b=b, residual=w - (scaling * b) @ a)


def dora_magnitude(weight: torch.Tensor, delta: torch.Tensor, *, dim: int) -> torch.Tensor:
    """DoRA's initial magnitude vector: ``|| float32(W) + delta ||_2`` along ``dim``.

    ``dim`` 1 (over inputs, one entry per output row) for a Linear ``(out, in)``; 0 for an
    embedding table ``(V, D)`` (one entry per embedding dimension), as PEFT's DoRA layers compute it.
    """
    return torch.linalg.norm(weight.float() + delta, dim=dim)


def _matrix(weight: torch.Tensor, rank: int) -> torch.Tensor:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {list(weight.shape)}")
    if not 0 < rank <= min(weight.shape):
        raise OptionError(f"rank {rank} must lie in [1, {min(weight.shape)}] for a {list(weight.shape)} weight")
    return weight.float()  # a copy for any non-float32 input; never written to below

"""Rotary position embeddings' tables for the training decoder: inverse frequencies (default, linear,
llama3 and Phi-3's LongRoPE scaling) and the cos / sin tables per position, with Gemma 3's second set
for its sliding-window layers. The rotation itself is :func:`adaptertool.training.fused.rope`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from adaptertool.training.model import DecoderConfig

__all__ = ["longrope_frequencies", "rope_frequencies", "rotary_tables"]


def rope_frequencies(config: DecoderConfig, device: torch.device | None = None) -> torch.Tensor:
    """RoPE's inverse frequencies ``theta^(-2i/d)``, (head_dim/2,) float32, with linear or llama3 scaling.

    llama3 (Llama 3.1): wavelengths ``2 pi / f`` longer than ``original_max / low_freq_factor`` are
    divided by ``factor``, those shorter than ``original_max / high_freq_factor`` kept, and the
    band between blends the two with ``s = (original_max / wavelength - low) / (high - low)``.
    """
    dim = config.rotary_dim or config.head_dim
    freqs = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        return freqs / float(scaling["factor"])
    if scaling.get("rope_type") != "llama3":
        return freqs
    factor, low, high = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling.get("original_max_position_embeddings", config.max_position_embeddings))
    wavelength = 2 * torch.pi / freqs
    scaled = torch.where(wavelength > original / low, freqs / factor, freqs)
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(medium, blended, scaled)


def rotary_tables(config: DecoderConfig, position_ids: torch.Tensor,
                  dtype: torch.dtype) -> dict[bool, tuple[torch.Tensor, torch.Tensor]]:
    """{sliding?: (cos, sin)}, each (B|1, 1, T, rotary dim) in ``dtype``; the two differ only for Gemma 3.

    LongRoPE picks its long factors when the largest position id reaches past the pretraining
    length, as transformers does (one device sync, for that RoPE type only).
    """
    T = position_ids.shape[-1]
    positions = position_ids.view(-1, 1, T, 1).float()
    device = position_ids.device

    def table(freqs: torch.Tensor, factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        angles = torch.cat((positions * freqs,) * 2, dim=-1)  # (B|1, 1, T, rotary dim)
        cos, sin = angles.cos(), angles.sin()
        if factor != 1.0:
            cos, sin = cos * factor, sin * factor
        return cos.to(dtype), sin.to(dtype)

    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "longrope":
        long = int(position_ids.max()) + 1 > int(scaling["original_max_position_embeddings"])
        full = table(*longrope_frequencies(scaling, dim=config.rotary_dim or config.head_dim, theta=config.rope_theta,
                                           max_position_embeddings=config.max_position_embeddings, long=long, device=device))
    else:
        full = table(rope_frequencies(config, device))
    if config.local_rope_theta is None:
        return {False: full, True: full}
    local = replace(config, rope_theta=config.local_rope_theta, rope_scaling=None)
    return {False: full, True: table(rope_frequencies(local, device))}


def longrope_frequencies(scaling: Mapping[str, Any], *, dim: int, theta: float, max_position_embeddings: int,
                         long: bool, device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """LongRoPE's ``(inverse frequencies (dim/2,) float32, attention factor)``: ``1 / (factor_i theta^(2i/dim))``
    with the long or short factors, and the factor cos and sin are multiplied by."""
    factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32, device=device)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    freqs = 1.0 / (factors * theta**exponents)
    original = int(scaling["original_max_position_embeddings"])
    attention = scaling.get("attention_factor")
    if attention is None:
        factor = scaling.get("factor") or max_position_embeddings / original
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return freqs, float(attention)

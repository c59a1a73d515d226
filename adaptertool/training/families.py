"""What Gemma 2, Gemma 3 (text) and Phi-3 / Phi-4 add to the Llama-family decoder of :mod:`.model`.

Gemma 2 (https://arxiv.org/abs/2408.00118) and Gemma 3 (https://arxiv.org/abs/2503.19786):

    x = embed(ids) * sqrt(C)              (the normaliser cast to the embedding dtype first)
    x = x + norm(attn(norm(x)));  x = x + norm(geglu_mlp(norm(x)))
    logits = cap_f * tanh(lm_head(norm(x)) / cap_f)          (Gemma 2; Gemma 3 when configured)

every norm ``(1 + w) * rmsnorm(x)`` in float32; the MLP ``down(gelu_tanh(gate(x)) * up(x))``;
attention scores scaled by ``query_pre_attn_scalar^-1/2``, soft-capped in Gemma 2 as
``cap_a * tanh(scores / cap_a)`` before the mask; sliding-window and global blocks alternate
(``layer_types``, else every ``sliding_window_pattern``-th block is global: 2 for Gemma 2, 6 for
Gemma 3). Gemma 3 adds per-head q/k norms and gives the sliding blocks their own RoPE base
(``rope_local_base_freq``; transformers 5 nests ``rope_parameters`` by block kind), the global
blocks keeping ``rope_theta`` and any scaling. The head is the embedding (tied).

Phi-3 / Phi-4 (https://arxiv.org/abs/2404.14219): Llama blocks with q/k/v in one ``qkv_proj``
(rows q, then k, then v) and gate/up in one ``gate_up_proj`` (gate rows first), so LoRA trains on
the fused modules under PEFT's names; RoPE on the first ``partial_rotary_factor`` of each head
only; a sliding window on every block when ``sliding_window`` is set; LongRoPE
(https://arxiv.org/abs/2402.13753; its tables are :mod:`.rope`'s) per-frequency divisors,
``short_factor`` while the batch's positions stay within ``original_max_position_embeddings`` and
``long_factor`` past it (transformers picks by the largest position id), with cos and sin scaled
by ``sqrt(1 + ln(factor) / ln(original))``, ``factor = max_position_embeddings / original``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from adaptertool.errors import InputError

__all__ = ["FAMILY_ARCHITECTURES", "family_settings", "softcapped_attention"]

_GEMMA2, _GEMMA3, _PHI3 = "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM"
FAMILY_ARCHITECTURES = (_GEMMA2, _GEMMA3, _PHI3)
_LAYER_TYPES = ("sliding_attention", "full_attention")


def family_settings(config: Mapping[str, Any], architecture: str, *, source: str) -> dict[str, Any]:
    """The :class:`~adaptertool.training.model.DecoderConfig` fields these families set their own way
    (over those read for the Llama family); ``{}`` for other architectures.

    Raises:
        AdapterToolError: a setting transformers' model of the family has and train does not.
    """
    if architecture in (_GEMMA2, _GEMMA3):
        return _gemma(config, architecture, source)
    if architecture == _PHI3:
        return _phi3(config, source)
    return {}


def _gemma(config: Mapping[str, Any], architecture: str, source: str) -> dict[str, Any]:
    # transformers reads hidden_activation (hub configs also carry hidden_act); absent means gelu_pytorch_tanh
    activation = config.get("hidden_activation") or "gelu_pytorch_tanh"
    if activation != "gelu_pytorch_tanh":
        raise InputError(f"{source}: hidden_activation {activation!r} is not supported; train's Gemma MLP is "
                         "GeGLU with the tanh-approximated GELU (gelu_pytorch_tanh)")
    if config.get("use_bidirectional_attention"):
        raise InputError(f"{source}: use_bidirectional_attention is set (an embedding model); train trains causal LMs")
    gemma2 = architecture == _GEMMA2
    layers = int(config["num_hidden_layers"])
    types = config.get("layer_types") or [
        "full_attention" if (i + 1) % int(config.get("sliding_window_pattern") or (2 if gemma2 else 6)) == 0
        else "sliding_attention" for i in range(layers)
    ]
    if len(types) != layers or any(kind not in _LAYER_TYPES for kind in types):
        raise InputError(f"{source}: layer_types must give one of {', '.join(_LAYER_TYPES)} per layer")
    window = config.get("sliding_window", 4096)  # the default of both configs
    settings: dict[str, Any] = {
        "activation": "gelu_tanh", "gemma_norms": True, "embed_scale": True,
        "head_dim": int(config.get("head_dim") or 256),
        "attention_scale": float(config.get("query_pre_attn_scalar", 256)) ** -0.5,
        # transformers' Gemma 3 attention never passes attn_logit_softcapping on (Gemma 3 dropped it)
        "attn_logit_softcapping": _cap(config.get("attn_logit_softcapping", 50.0)) if gemma2 else None,
        "final_logit_softcapping": _cap(config.get("final_logit_softcapping", 30.0 if gemma2 else None)),
        "qk_norm": not gemma2, "tie_word_embeddings": bool(config.get("tie_word_embeddings", True)),
        "sliding_window": int(window) if window else None,
        "sliding_layers": tuple(i for i, kind in enumerate(types) if kind == "sliding_attention"),
    }
    if not gemma2:
        settings.update(_gemma3_rope(config, source))
    return settings


def _gemma3_rope(config: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Global blocks' theta and scaling, sliding blocks' theta: nested (transformers 5) or v4's flat fields."""
    nested = config.get("rope_parameters") or {}
    if "full_attention" in nested or "sliding_attention" in nested:
        full, local = dict(nested.get("full_attention") or {}), dict(nested.get("sliding_attention") or {})
    else:  # v4: rope_scaling (if any) applies to the global blocks only
        full = dict(config.get("rope_scaling") or nested)
        full.setdefault("rope_theta", config.get("rope_theta", 1_000_000.0))
        local = {"rope_theta": config.get("rope_local_base_freq", 10_000.0)}
    if local.get("rope_type", local.get("type", "default")) != "default":
        raise InputError(f"{source}: scaled RoPE on the sliding-window layers is not supported by train")
    theta = float(full.pop("rope_theta", 1_000_000.0))
    kind = full.pop("rope_type", full.pop("type", "default"))
    return {"rope_theta": theta, "rope_scaling": None if kind == "default" else {**full, "rope_type": kind},
            "local_rope_theta": float(local.get("rope_theta", 10_000.0))}


def _phi3(config: Mapping[str, Any], source: str) -> dict[str, Any]:
    # as Phi3Config: rope_scaling wins over rope_parameters; "su" and "yarn" are old names of longrope
    rope = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    theta = float(rope.pop("rope_theta", config.get("rope_theta", 10_000.0)))
    partial = float(rope.pop("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
    kind = rope.pop("rope_type", rope.pop("type", "default"))
    kind = "longrope" if kind in ("su", "yarn") else kind
    if kind not in ("default", "longrope"):
        raise InputError(f"{source}: Phi-3 rope_type {kind!r} is not supported; train supports default and longrope")
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // int(config["num_attention_heads"]))
    rotary_dim = int(head_dim * partial)
    settings: dict[str, Any] = {"fused_projections": True, "rotary_dim": rotary_dim, "rope_theta": theta, "rope_scaling": None}
    window = config.get("sliding_window")
    layers = int(config["num_hidden_layers"])
    settings.update(sliding_window=int(window) if window else None, sliding_layers=tuple(range(layers)) if window else ())
    if kind == "longrope":
        for key in ("short_factor", "long_factor"):
            if len(rope.get(key) or ()) != rotary_dim // 2:
                raise InputError(f"{source}: rope_scaling {key} must list {rotary_dim // 2} numbers (rotary dims / 2)")
        # Phi-3 keeps the pretraining length beside rope_scaling, not in it; transformers reads it from
        # there only (Phi3Config's default: 4096), and LongRoPE's factor from max_position_embeddings
        original = int(config.get("original_max_position_embeddings") or 4096)
        settings["rope_scaling"] = {**rope, "rope_type": "longrope", "original_max_position_embeddings": original}
        settings["max_position_embeddings"] = int(config.get("max_position_embeddings") or 4096)
    return settings


def _cap(value: Any) -> float | None:
    return None if value is None else float(value)


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *,
                         scale: float, softcap: float) -> torch.Tensor:
    """``softmax(cap tanh(q k^T scale / cap) + mask) v`` (Gemma 2), the softmax in float32 as transformers'.

    ``scaled_dot_product_attention`` cannot cap its scores, so this builds them: (B, H, T, T) per
    block, kept for the backward as the tanh and the probabilities (what plain autograd saves here
    anyway). q (B, H, T, D); k, v (B, H_kv, T, D); mask bool (B|1, 1, T, T), True = may attend, or
    None for causal.
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.tanh((q @ k.transpose(-1, -2)).mul_(scale).div_(softcap)) * softcap  # (B, H, T, T), transformers' order
    if mask is None:
        T = q.shape[-2]
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    probs = torch.softmax(scores.float().masked_fill(~mask, float("-inf")), dim=-1).to(q.dtype)
    return probs @ v

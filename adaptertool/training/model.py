"""A Llama-family decoder for training adapters, driven by config.json (Llama/SmolLM, Mistral, Qwen2, Qwen3;
Gemma 2, Gemma 3 and Phi-3 with what :mod:`adaptertool.training.families` describes).

    x = embed(ids)                                          (B, T, C)
    for each block:  x = x + attn(rmsnorm(x));  x = x + mlp(rmsnorm(x))
    logits = lm_head(rmsnorm(x))                            (B, T, V), returned in float32

attn: q/k/v projections (Qwen2: with biases), Qwen3's per-head RMSNorm of q and k, rotary position
embeddings (default, linear or llama3 frequency scaling), grouped-query attention through
``scaled_dot_product_attention`` with a causal mask (plus padding and Mistral/Qwen's sliding window
when they apply). mlp: SwiGLU, ``down(silu(gate(x)) * up(x))``, or in Qwen3-MoE, Qwen2-MoE, Mixtral
and OLMoE a routed mixture of such experts (:mod:`adaptertool.training.moe`; OLMoE normalises q and k
over all heads). Module names mirror transformers'
(``model.layers.3.self_attn.q_proj``) so adapter keys are PEFT's without translation.

Every base weight is frozen; the only trainable tensors are the LoRA layers that
:func:`adaptertool.training.weights.load_decoder` adds. Compute runs in the parameters' dtype.
RMSNorm, RoPE, SwiGLU and the output layer's cross-entropy are hand-written forward/backward
pairs (:mod:`adaptertool.training.fused`): the same gradients with fewer saved activations and
fewer passes over memory than plain autograd (:meth:`Decoder.loss_sum` never materialises the
(B, T, vocab) logits).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from adaptertool.adapters.peft_keys import PEFT_PREFIX, split_adapter_key
from adaptertool.errors import InputError, OptionError
from adaptertool.training.distributed import full_tensor, shard_like
from adaptertool.training.families import FAMILY_ARCHITECTURES, family_settings, softcapped_attention
from adaptertool.training.fused import geglu, head_cross_entropy, rms_norm, rope, swiglu
from adaptertool.training.lora import ALL_LINEAR, FrozenLinear, LoraSpec, lora_modules
from adaptertool.training.moe import (
    MOE_ARCHITECTURES,
    MoeSpec,
    RouterStats,
    SparseMoe,
    adapter_config_fields,
    moe_fields,
    param_lora_tensors,
)
from adaptertool.training.rope import rotary_tables

__all__ = ["SUPPORTED_ARCHITECTURES", "Decoder", "DecoderConfig"]

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           *MOE_ARCHITECTURES, *FAMILY_ARCHITECTURES)
_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
# scaled_dot_product_attention shares k/v heads itself from torch 2.5 (enable_gqa); before, k and v are copied
_NATIVE_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


@dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """The sizes and switches of a decoder, read from a transformers config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # rope_type "linear"/"llama3" and its factors; None: plain RoPE
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q/k/v (Qwen2 always; Llama/Qwen3 with attention_bias)
    o_proj_bias: bool = False  # Llama/Qwen3's attention_bias also covers o_proj; Qwen2's does not exist
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k, before RoPE
    qk_norm_whole: bool = False  # OLMoE: RMSNorm over all heads of q (and of k) at once, before RoPE
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()  # blocks that attend within sliding_window only
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | None = None  # the first one where config.json lists several
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # Gemma 2/3 and Phi-3 (adaptertool.training.families); the defaults are the Llama family's
    activation: str = "silu"  # the MLP's gate: "silu" (SwiGLU) or "gelu_tanh" (Gemma's GeGLU)
    gemma_norms: bool = False  # (1 + w) RMSNorms in float32, also after attention and the MLP
    embed_scale: bool = False  # embeddings times sqrt(hidden_size)
    attention_scale: float | None = None  # None: head_dim^-1/2; Gemma: query_pre_attn_scalar^-1/2
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    local_rope_theta: float | None = None  # Gemma 3: plain RoPE of this base in the sliding-window blocks
    rotary_dim: int | None = None  # RoPE on the first rotary_dim of each head (None: all of it)
    fused_projections: bool = False  # Phi-3: qkv_proj and gate_up_proj
    moe: MoeSpec | None = None  # mixture-of-experts blocks (train/moe.py); None: a dense decoder

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise InputError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}; is config.json right?")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in _ROPE_TYPES:
            raise InputError(f"rope_type {rope_type!r} is not supported; train supports {', '.join(_ROPE_TYPES)}")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], *, source: str = "config.json") -> DecoderConfig:
        """Read a transformers config dict (v4 ``rope_theta``/``rope_scaling`` or v5 ``rope_parameters``).

        Raises:
            AdapterToolError: an unsupported architecture, activation or RoPE type, or a missing size.
        """
        architectures = config.get("architectures") or []
        architecture = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
        if architecture is None:
            raise InputError(f"{source}: architecture {', '.join(architectures) or '(none)'} is not supported by train; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        try:
            settings = family_settings(config, architecture, source=source)  # over the fields read below
            if "activation" not in settings and config.get("hidden_act", "silu") not in ("silu", "swish"):
                raise InputError(f"{source}: hidden_act {config['hidden_act']!r} is not supported; train's MLP is SwiGLU (silu)")
            if "rotary_dim" not in settings and config.get("partial_rotary_factor", 1.0) != 1.0:
                raise InputError(f"{source}: partial_rotary_factor is supported by train for Phi3ForCausalLM only")
            heads = int(config["num_attention_heads"])
            rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
            theta = float(rope.pop("rope_theta", config.get("rope_theta", 10000.0)))
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            eos = config.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            window, sliding = _sliding(config, architecture)
            bias = bool(config.get("attention_bias", False))
            fields = dict(
                architecture=architecture, vocab_size=int(config["vocab_size"]), hidden_size=int(config["hidden_size"]),
                intermediate_size=int(config["intermediate_size"]), num_hidden_layers=int(config["num_hidden_layers"]),
                num_attention_heads=heads, num_key_value_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // heads),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=theta,
                rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                attention_bias=architecture == "Qwen2ForCausalLM" or bias,
                o_proj_bias=architecture != "Qwen2ForCausalLM" and bias, mlp_bias=bool(config.get("mlp_bias", False)),
                qk_norm=architecture == "Qwen3ForCausalLM", sliding_window=window, sliding_layers=sliding,
                max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
                bos_token_id=config.get("bos_token_id"), eos_token_id=eos_ids[0] if eos_ids else None,
                eos_token_ids=eos_ids, pad_token_id=config.get("pad_token_id"),
            )
            decoder = cls(**{**fields, **settings})
            moe = moe_fields(config, architecture, source=source) if architecture in MOE_ARCHITECTURES else {}
            return replace(decoder, **moe)
        except KeyError as err:
            raise InputError(f"{source}: lacks {err.args[0]!r}; is it a complete transformers config.json?") from err
        except (TypeError, ValueError) as err:
            raise InputError(f"{source}: invalid value ({err}); is it a transformers config.json?") from err


def _sliding(config: Mapping[str, Any], architecture: str) -> tuple[int | None, tuple[int, ...]]:
    """(window, blocks using it) as transformers decides: Mistral everywhere; Qwen by layer_types."""
    layers = int(config["num_hidden_layers"])
    window = config.get("sliding_window")
    if architecture in ("LlamaForCausalLM", "MistralForCausalLM"):
        return (int(window), tuple(range(layers))) if architecture == "MistralForCausalLM" and window else (None, ())
    if not config.get("use_sliding_window", False) or not window:
        return None, ()
    types = config.get("layer_types") or [
        "sliding_attention" if i >= int(config.get("max_window_layers", 28)) else "full_attention" for i in range(layers)
    ]
    return int(window), tuple(i for i, kind in enumerate(types) if kind == "sliding_attention")


class RMSNorm(nn.Module):
    """``w * x / sqrt(mean(x^2) + eps)``, normalised in float32 and cast back before the scale, as
    transformers; ``offset``: Gemma's ``(1 + w)``, in float32 until the one cast."""

    def __init__(self, size: int, eps: float, *, offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, offset=self.offset)


def _norm(config: DecoderConfig, size: int) -> RMSNorm:
    return RMSNorm(size, config.rms_norm_eps, offset=config.gemma_norms)


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        c, d = config.hidden_size, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.fused = config.fused_projections
        if self.fused:  # Phi-3: the rows of q, then k, then v
            self.qkv_proj = _linear(c, (self.n_head + 2 * self.n_kv_head) * d, config.attention_bias)
        else:
            self.q_proj = _linear(c, self.n_head * d, config.attention_bias)
            self.k_proj = _linear(c, self.n_kv_head * d, config.attention_bias)
            self.v_proj = _linear(c, self.n_kv_head * d, config.attention_bias)
        self.o_proj = _linear(self.n_head * d, c, config.o_proj_bias)
        whole, norm = config.qk_norm_whole, config.qk_norm or config.qk_norm_whole
        self.q_norm = _norm(config, d * (self.n_head if whole else 1)) if norm else None
        self.k_norm = _norm(config, d * (self.n_kv_head if whole else 1)) if norm else None
        self.norm_whole = whole
        self.scale = config.attention_scale  # None: scaled_dot_product_attention's 1 / sqrt(head_dim)
        self.softcap = config.attn_logit_softcapping
        self.rotary_dim = config.rotary_dim or d

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self._project(x)
        if self.norm_whole and self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        if not self.norm_whole and self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        gqa: dict[str, bool] = {}
        if self.n_kv_head != self.n_head:  # GQA: each k/v head serves n_head / n_kv_head query heads
            if _NATIVE_GQA:
                gqa["enable_gqa"] = True
            else:
                k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
                v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        if self.softcap is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale, **gqa)
        else:  # Gemma 2 caps the scores, which scaled_dot_product_attention cannot
            y = softcapped_attention(q, k, v, mask, scale=self.scale or self.head_dim**-0.5, softcap=self.softcap)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.fused:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = self.qkv_proj(x).split([self.n_head * self.head_dim] + [self.n_kv_head * self.head_dim] * 2, dim=-1)
        return q, k, v

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rotary_dim == self.head_dim:
            return rope(x, cos, sin)
        # partial rotary (Phi-4-mini): each head's trailing dims pass unrotated
        return torch.cat((rope(x[..., : self.rotary_dim], cos, sin), x[..., self.rotary_dim :]), dim=-1)


class MLP(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        c, hidden = config.hidden_size, config.intermediate_size
        self.fused = config.fused_projections
        if self.fused:  # Phi-3: the rows of gate, then up
            self.gate_up_proj = _linear(c, 2 * hidden, config.mlp_bias)
        else:
            self.gate_proj = _linear(c, hidden, config.mlp_bias)
            self.up_proj = _linear(c, hidden, config.mlp_bias)
        self.down_proj = _linear(hidden, c, config.mlp_bias)
        self.gated = geglu if config.activation == "gelu_tanh" else swiglu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # gate_up_proj's halves are views that nothing else holds: the gated unit's backward may
        # work in them, as in separate gate and up outputs
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1) if self.fused else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(self.gated(gate, up))


class Block(nn.Module):
    def __init__(self, config: DecoderConfig, index: int) -> None:
        super().__init__()
        self.sliding = index in config.sliding_layers
        self.input_layernorm = _norm(config, config.hidden_size)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = _norm(config, config.hidden_size)
        sparse = config.moe is not None and index in config.moe.sparse_layers
        self.ffn = config.moe.block_name if sparse and config.moe is not None else "mlp"  # Mixtral: block_sparse_moe
        self.add_module(self.ffn, SparseMoe(config, index) if sparse else MLP(config))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                routing: RouterStats | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        ffn, h = getattr(self, self.ffn), self.post_attention_layernorm(x)
        return x + (ffn(h, routing) if isinstance(ffn, SparseMoe) else ffn(h))


class SandwichBlock(Block):
    """Gemma 2/3: attention's and the MLP's outputs are normalised too before they join the residual
    stream; ``post_attention_layernorm`` normalises attention's output here, not the MLP's input."""

    def __init__(self, config: DecoderConfig, index: int) -> None:
        super().__init__(config, index)
        self.pre_feedforward_layernorm = _norm(config, config.hidden_size)
        self.post_feedforward_layernorm = _norm(config, config.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                routing: RouterStats | None = None) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class _Trunk(nn.Module):
    """transformers' ``model`` submodule: embeddings, blocks and the final norm."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        block = SandwichBlock if config.gemma_norms else Block
        self.layers = nn.ModuleList(block(config, i) for i in range(config.num_hidden_layers))
        self.norm = _norm(config, config.hidden_size)


class Decoder(nn.Module):
    """The decoder; build it with :func:`adaptertool.training.weights.load_decoder`, which loads the weights.

    Constructing one directly allocates placeholder weights: do it under ``torch.device("meta")``.
    """

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.model = _Trunk(config)
        self.lm_head = _linear(config.hidden_size, config.vocab_size, False)
        self.gradient_checkpointing = False
        self.lora: LoraSpec | None = None  # set when LoRA layers are added

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, T, vocab)`` in float32 for ``input_ids`` ``(B, T)``.

        Args:
            attention_mask: ``(B, T)`` bool, True for real tokens; left or right padding. Padded
                positions' logits are meaningless (they attend only to themselves).
            position_ids: ``(B, T)`` or ``(T,)``; default ``0..T-1`` for every row (as transformers).
        """
        logits = self.lm_head(self._hidden(input_ids, attention_mask, position_ids)).float()
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def loss_sum(self, input_ids: torch.Tensor, targets: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, ignore_index: int = -100, chunk_tokens: int = 512,
                 aux_weight: float = 0.0) -> torch.Tensor:
        """Summed cross-entropy ``sum_t -log softmax(logits_t)[targets_t]`` over ``targets != ignore_index``,
        plus ``aux_weight * router_aux_loss_coef * aux`` for a MoE decoder (:mod:`~adaptertool.training.moe`).

        The same value and gradients as ``F.cross_entropy(forward(...), targets, reduction="sum")``
        (float32), without the ``(B, T, vocab)`` logits: the output layer runs only on positions
        with a target, ``chunk_tokens`` at a time (see :func:`~adaptertool.training.fused.head_cross_entropy`).

        Args:
            targets: ``(B, T)`` int64, aligned with the positions: ``targets[:, t]`` is the token
                position t predicts (the next one), ``ignore_index`` where there is none.
            chunk_tokens: rows of logits at a time. 512 rows of SmolLM2's 49,152-word head (a
                100 MB buffer) multiply ~15 % faster on the CPU than 256-row pieces (measured).
        """
        moe = self.config.moe
        routing = None
        if moe is not None and aux_weight and moe.router_aux_loss_coef:
            real = None if attention_mask is None else attention_mask.reshape(-1).float()
            routing = RouterStats(real, experts=moe.experts)
        hidden = self._hidden(input_ids, attention_mask, position_ids, routing)  # (B, T, C)
        keep = targets != ignore_index
        assert self.lm_head.weight is not None  # the output embedding is never 4-bit
        loss = head_cross_entropy(hidden[keep], self.lm_head.weight, targets[keep], chunk_tokens,
                                  softcap=self.config.final_logit_softcapping)
        if routing is None or moe is None:
            return loss
        return loss + (aux_weight * moe.router_aux_loss_coef) * routing.loss()

    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None, routing: RouterStats | None = None) -> torch.Tensor:
        """The final normalised hidden states ``(B, T, C)``; MoE layers add their router statistics to ``routing``."""
        T = input_ids.shape[1]
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        if self.config.embed_scale:  # Gemma: sqrt(C) rounded to the embedding dtype first, as transformers
            x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)
        ropes = rotary_tables(self.config, position_ids, x.dtype)
        masks = _attention_masks(attention_mask, T, self.config.sliding_window, input_ids.device)
        for block in self.model.layers:
            mask = masks[block.sliding]
            cos, sin = ropes[block.sliding]
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, mask, routing, use_reentrant=False)  # recompute in backward
            else:
                x = block(x, cos, sin, mask, routing)
        return self.model.norm(x)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA tensors under PEFT's saved names, as whole float32 CPU copies (under FSDP2 a
        collective: every process must call it)."""
        state = {}
        for name, module in lora_modules(self):
            prefix = f"{PEFT_PREFIX}{name}."
            parts = {"lora_A.weight": module.lora_A, "lora_B.weight": module.lora_B,
                     "lora_magnitude_vector": module.lora_magnitude_vector}
            for key, param in parts.items():
                if param is not None:
                    state[prefix + key] = full_tensor(param.detach()).to("cpu", torch.float32, copy=True)
        for key, param in param_lora_tensors(self):  # --experts fused
            state[key] = full_tensor(param.detach()).to("cpu", torch.float32, copy=True)
        return state

    def load_adapter_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy an :meth:`adapter_state_dict` (or a PEFT file's tensors) into the LoRA layers.

        Raises:
            AdapterToolError: keys or shapes that do not match this model's LoRA layers.
        """
        params = {}
        for name, module in lora_modules(self):
            params[(name, "lora_A")], params[(name, "lora_B")] = module.lora_A, module.lora_B
            if module.lora_magnitude_vector is not None:
                params[(name, "lora_magnitude_vector")] = module.lora_magnitude_vector
        params |= {split_adapter_key(key): param for key, param in param_lora_tensors(self)}
        given = {split_adapter_key(key): (key, tensor) for key, tensor in state.items()}
        missing = sorted(f"{PEFT_PREFIX}{m}.{p}" for m, p in params if (m, p) not in given)
        unexpected = sorted(key for part, (key, _) in given.items() if part not in params)
        if missing or unexpected:
            what = f"lacks {missing[0]}" if missing else f"has {unexpected[0]}, which this model has no LoRA layer for"
            raise InputError(f"adapter state {what}; was it saved with the same targets, rank and DoRA setting?")
        with torch.no_grad():
            for part, param in params.items():
                key, tensor = given[part]
                if tuple(tensor.shape) != tuple(param.shape):
                    raise InputError(f"adapter tensor {key} has shape {list(tensor.shape)} but the model needs "
                                     f"{list(param.shape)}; was it saved with the same rank?")
                param.copy_(shard_like(tensor, param))

    def adapter_config(self, *, base_model_name_or_path: str) -> dict[str, Any]:
        """A PEFT LoRA adapter_config.json for this model's LoRA layers (keys PEFT >= 0.13 knows)."""
        if self.lora is None:
            raise OptionError("the model has no LoRA layers; load it with a LoraSpec")
        spec = self.lora
        names = [name for name, _ in lora_modules(self)]
        # PEFT saves all-linear expanded to the wrapped modules' short names; explicit targets as given
        targets = sorted({n.rsplit(".", 1)[-1] for n in names}) if ALL_LINEAR in spec.targets else sorted(spec.targets)
        return {  # a MoE decoder's target_modules: the wrapped names; its fused experts: target_parameters
            "alpha_pattern": {}, "base_model_name_or_path": base_model_name_or_path, "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layers_pattern": None,
            "layers_to_transform": None, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
            "modules_to_save": None, "peft_type": "LORA", "r": spec.rank, "rank_pattern": {}, "revision": None,
            "target_modules": targets, "task_type": "CAUSAL_LM", "use_dora": spec.dora, "use_rslora": spec.rslora,
            **(adapter_config_fields(self) if self.config.moe is not None else {}),
        }

    def linear_names(self) -> list[str]:
        """Names of the block Linear layers (LoRA's candidates; MoE: routers, experts, shared experts), in module order."""
        return [name for i, block in enumerate(self.model.layers)
                for name in [f"model.layers.{i}.self_attn.{leaf}" for leaf in self._attention_leaves()]
                + [n for n, m in block.get_submodule(block.ffn).named_modules(prefix=f"model.layers.{i}.{block.ffn}")
                   if isinstance(m, FrozenLinear)]]

    def _attention_leaves(self) -> tuple[str, ...]:
        return ("qkv_proj", "o_proj") if self.config.fused_projections else _ATTENTION


def _linear(in_features: int, out_features: int, bias: bool) -> FrozenLinear:
    # placeholder weights (meta tensors under load_decoder), replaced when the checkpoint is read
    return FrozenLinear(torch.empty(out_features, in_features), torch.empty(out_features) if bias else None)


def _attention_masks(attention_mask: torch.Tensor | None, T: int, window: int | None,
                     device: torch.device) -> dict[bool, torch.Tensor | None]:
    """{sliding?: bool mask (B|1, 1, T, T), True = may attend}; None where ``is_causal`` attention suffices."""
    banded = window is not None and window < T
    if attention_mask is None and not banded:
        return {False: None, True: None}
    i = torch.arange(T, device=device)
    distance = i.view(-1, 1) - i.view(1, -1)  # (T, T): query position minus key position
    keep = torch.ones(1, 1, 1, T, dtype=torch.bool, device=device) if attention_mask is None \
        else attention_mask.view(-1, 1, 1, T).bool()
    # a query always sees itself: a padded row with no real key would otherwise softmax over nothing (NaN)
    full = ((distance >= 0) & keep) | (distance == 0)
    sliding = ((distance >= 0) & (distance < window) & keep) | (distance == 0) if banded else full
    return {False: None if attention_mask is None else full, True: sliding}

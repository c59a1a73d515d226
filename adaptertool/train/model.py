"""A Llama-family decoder for training adapters, driven by config.json (Llama/SmolLM, Mistral, Qwen2, Qwen3).

    x = embed(ids)                                          (B, T, C)
    for each block:  x = x + attn(rmsnorm(x));  x = x + mlp(rmsnorm(x))
    logits = lm_head(rmsnorm(x))                            (B, T, V), returned in float32

attn: q/k/v projections (Qwen2: with biases), Qwen3's per-head RMSNorm of q and k, rotary position
embeddings (default, linear or llama3 frequency scaling), grouped-query attention through
``scaled_dot_product_attention`` with a causal mask (plus padding and Mistral/Qwen's sliding window
when they apply). mlp: SwiGLU, ``down(silu(gate(x)) * up(x))``. Module names mirror transformers'
(``model.layers.3.self_attn.q_proj``) so adapter keys are PEFT's without translation.

Every base weight is frozen; the only trainable tensors are the LoRA layers that
:func:`adaptertool.train.weights.load_decoder` adds. Compute runs in the parameters' dtype.
RMSNorm, RoPE, SwiGLU and the output layer's cross-entropy are hand-written forward/backward
pairs (:mod:`adaptertool.train.fused`): the same gradients with fewer saved activations and
fewer passes over memory than plain autograd (:meth:`Decoder.loss_sum` never materialises the
(B, T, vocab) logits).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from adaptertool.adapters.peft_keys import PEFT_PREFIX, split_adapter_key
from adaptertool.errors import AdapterToolError
from adaptertool.train.distributed import full_tensor, shard_like
from adaptertool.train.fused import head_cross_entropy, rms_norm, rope, swiglu
from adaptertool.train.lora import ALL_LINEAR, FrozenLinear, LoraSpec, lora_modules

__all__ = ["SUPPORTED_ARCHITECTURES", "Decoder", "DecoderConfig"]

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
_ROPE_TYPES = ("default", "linear", "llama3")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
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
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()  # blocks that attend within sliding_window only
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | None = None  # the first one where config.json lists several
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise AdapterToolError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                                   f"num_key_value_heads {self.num_key_value_heads}; is config.json right?")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in _ROPE_TYPES:
            raise AdapterToolError(f"rope_type {rope_type!r} is not supported; train supports {', '.join(_ROPE_TYPES)}")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], *, source: str = "config.json") -> DecoderConfig:
        """Read a transformers config dict (v4 ``rope_theta``/``rope_scaling`` or v5 ``rope_parameters``).

        Raises:
            AdapterToolError: an unsupported architecture, activation or RoPE type, or a missing size.
        """
        architectures = config.get("architectures") or []
        architecture = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
        if architecture is None:
            raise AdapterToolError(f"{source}: architecture {', '.join(architectures) or '(none)'} is not supported by train; "
                                   f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if config.get("hidden_act", "silu") not in ("silu", "swish"):
            raise AdapterToolError(f"{source}: hidden_act {config['hidden_act']!r} is not supported; train's MLP is SwiGLU (silu)")
        if config.get("partial_rotary_factor", 1.0) != 1.0:
            raise AdapterToolError(f"{source}: partial_rotary_factor is not supported by train")
        try:
            heads = int(config["num_attention_heads"])
            rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
            theta = float(rope.pop("rope_theta", config.get("rope_theta", 10000.0)))
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            eos = config.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            window, sliding = _sliding(config, architecture)
            bias = bool(config.get("attention_bias", False))
            return cls(
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
        except KeyError as err:
            raise AdapterToolError(f"{source}: lacks {err.args[0]!r}; is it a complete transformers config.json?") from err
        except (TypeError, ValueError) as err:
            raise AdapterToolError(f"{source}: invalid value ({err}); is it a transformers config.json?") from err


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
    """``w * x / sqrt(mean(x^2) + eps)``, normalised in float32 and cast back before the scale, as transformers."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_frequencies(config: DecoderConfig, device: torch.device | None = None) -> torch.Tensor:
    """RoPE's inverse frequencies ``theta^(-2i/d)``, (head_dim/2,) float32, with linear or llama3 scaling.

    llama3 (Llama 3.1): wavelengths ``2 pi / f`` longer than ``original_max / low_freq_factor`` are
    divided by ``factor``, those shorter than ``original_max / high_freq_factor`` kept, and the
    band between blends the two with ``s = (original_max / wavelength - low) / (high - low)``.
    """
    dim = config.head_dim
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


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        c, d = config.hidden_size, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.q_proj = _linear(c, self.n_head * d, config.attention_bias)
        self.k_proj = _linear(c, self.n_kv_head * d, config.attention_bias)
        self.v_proj = _linear(c, self.n_kv_head * d, config.attention_bias)
        self.o_proj = _linear(self.n_head * d, c, config.o_proj_bias)
        self.q_norm = RMSNorm(d, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(d, config.rms_norm_eps) if config.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        gqa: dict[str, bool] = {}
        if self.n_kv_head != self.n_head:  # GQA: each k/v head serves n_head / n_kv_head query heads
            if _NATIVE_GQA:
                gqa["enable_gqa"] = True
            else:
                k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
                v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, **gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        c, hidden = config.hidden_size, config.intermediate_size
        self.gate_proj = _linear(c, hidden, config.mlp_bias)
        self.up_proj = _linear(c, hidden, config.mlp_bias)
        self.down_proj = _linear(hidden, c, config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: DecoderConfig, index: int) -> None:
        super().__init__()
        self.sliding = index in config.sliding_layers
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Trunk(nn.Module):
    """transformers' ``model`` submodule: embeddings, blocks and the final norm."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Decoder(nn.Module):
    """The decoder; build it with :func:`adaptertool.train.weights.load_decoder`, which loads the weights.

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
        return self.lm_head(self._hidden(input_ids, attention_mask, position_ids)).float()

    def loss_sum(self, input_ids: torch.Tensor, targets: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, ignore_index: int = -100, chunk_tokens: int = 512) -> torch.Tensor:
        """Summed cross-entropy ``sum_t -log softmax(logits_t)[targets_t]`` over ``targets != ignore_index``.

        The same value and gradients as ``F.cross_entropy(forward(...), targets, reduction="sum")``
        (float32), without the ``(B, T, vocab)`` logits: the output layer runs only on positions
        with a target, ``chunk_tokens`` at a time (see :func:`~adaptertool.train.fused.head_cross_entropy`).

        Args:
            targets: ``(B, T)`` int64, aligned with the positions: ``targets[:, t]`` is the token
                position t predicts (the next one), ``ignore_index`` where there is none.
            chunk_tokens: rows of logits at a time. 512 rows of SmolLM2's 49,152-word head (a
                100 MB buffer) multiply ~15 % faster on the CPU than 256-row pieces (measured).
        """
        hidden = self._hidden(input_ids, attention_mask, position_ids)  # (B, T, C)
        keep = targets != ignore_index
        assert self.lm_head.weight is not None  # the output embedding is never 4-bit
        return head_cross_entropy(hidden[keep], self.lm_head.weight, targets[keep], chunk_tokens)

    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None) -> torch.Tensor:
        """The final normalised hidden states ``(B, T, C)``."""
        T = input_ids.shape[1]
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)
        freqs = position_ids.view(-1, 1, T, 1).float() * rope_frequencies(self.config, input_ids.device)  # (B|1, 1, T, D/2)
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        masks = _attention_masks(attention_mask, T, self.config.sliding_window, input_ids.device)
        for block in self.model.layers:
            mask = masks[block.sliding]
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)  # recompute in backward
            else:
                x = block(x, cos, sin, mask)
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
        given = {split_adapter_key(key): (key, tensor) for key, tensor in state.items()}
        missing = sorted(f"{PEFT_PREFIX}{m}.{p}" for m, p in params if (m, p) not in given)
        unexpected = sorted(key for part, (key, _) in given.items() if part not in params)
        if missing or unexpected:
            what = f"lacks {missing[0]}" if missing else f"has {unexpected[0]}, which this model has no LoRA layer for"
            raise AdapterToolError(f"adapter state {what}; was it saved with the same targets, rank and DoRA setting?")
        with torch.no_grad():
            for part, param in params.items():
                key, tensor = given[part]
                if tuple(tensor.shape) != tuple(param.shape):
                    raise AdapterToolError(f"adapter tensor {key} has shape {list(tensor.shape)} but the model needs "
                                           f"{list(param.shape)}; was it saved with the same rank?")
                param.copy_(shard_like(tensor, param))

    def adapter_config(self, *, base_model_name_or_path: str) -> dict[str, Any]:
        """A PEFT LoRA adapter_config.json for this model's LoRA layers (keys PEFT >= 0.13 knows)."""
        if self.lora is None:
            raise AdapterToolError("the model has no LoRA layers; load it with a LoraSpec")
        spec = self.lora
        names = [name for name, _ in lora_modules(self)]
        # PEFT saves all-linear expanded to the wrapped modules' short names; explicit targets as given
        targets = sorted({n.rsplit(".", 1)[-1] for n in names}) if ALL_LINEAR in spec.targets else sorted(spec.targets)
        return {
            "alpha_pattern": {}, "base_model_name_or_path": base_model_name_or_path, "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layers_pattern": None,
            "layers_to_transform": None, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
            "modules_to_save": None, "peft_type": "LORA", "r": spec.rank, "rank_pattern": {}, "revision": None,
            "target_modules": targets, "task_type": "CAUSAL_LM", "use_dora": spec.dora, "use_rslora": spec.rslora,
        }

    def linear_names(self) -> list[str]:
        """Names of the block Linear layers (LoRA's candidates), in module order."""
        return [f"model.layers.{i}.{group}.{leaf}" for i in range(self.config.num_hidden_layers)
                for group, leaves in (("self_attn", _ATTENTION), ("mlp", _MLP)) for leaf in leaves]


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

"""PEFT LoRA modules in llama.cpp's GGUF adapter form: tensor names, factor layout and scaling.

Scaling. llama.cpp (src/llama-adapter.h, src/llama-graph.cpp) adds ``scale * B @ (A @ x)`` to each
adapted matmul, with one ``adapter.lora.alpha`` (float32) for the whole file and ``scale = alpha / r``,
r being that module's rank as its lora_b's shape gives it, or ``scale = 1`` where the stored alpha
is 0. PEFT's scaling is per module: ``alpha_m / r``, or ``alpha_m / sqrt(r)`` with rsLoRA
(Kalajdzievski 2023, https://arxiv.org/abs/2312.03732), alpha_m coming from alpha_pattern where an
entry matches. The file therefore keeps the config's lora_alpha and each B is multiplied by
``fold = peft_scaling / llama_scale``: exactly 1 for a plain LoRA (whose factors are then written
bit for bit as llama.cpp's convert_lora_to_gguf.py writes them), sqrt(r) for rsLoRA, alpha_m / alpha
for an alpha_pattern entry. llama.cpp's own converter ignores rsLoRA and alpha_pattern, so it loads
such adapters at the wrong strength. rank_pattern needs nothing: llama.cpp reads each rank from
the tensors.

Layout. ``<base tensor>.lora_a`` holds A ``(r, in)`` and ``.lora_b`` holds B ``(out, r)``, row-major
as numpy and torch order them (ggml lists the dimensions reversed). A token-embedding LoRA is
applied to looked-up rows, ``B @ A[:, token]``, so its lora_a is stored as ``A.T``, ``(V, r)``.

Rotary order. llama.cpp's ``llama`` architecture rotates adjacent pairs of each head's dimensions,
transformers' Llama the first and second halves, so llama.cpp's converter reorders the rows of
q_proj and k_proj within each head. Reordering the rows of ``B @ A`` is reordering B's rows, which
is all a LoRA needs. Qwen2 and Qwen3 rotate halves in llama.cpp as well (its NEOX mode) and keep
their order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from adaptertool.errors import InputError

__all__ = ["SUPPORTED_ARCHITECTURES", "GgufBase", "GgufTarget", "gguf_factors", "gguf_target", "scale_fold"]

# transformers' architecture class -> (llama.cpp's general.architecture, whether q/k rows are reordered).
# Each maps its Linear layers to llama.cpp's tensors one to one, as llama.cpp's converter does.
_ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", False),
}
SUPPORTED_ARCHITECTURES = tuple(_ARCHITECTURES)

# A decoder layer's Linear modules -> llama.cpp's tensor in block N (blk.N.<name>.weight).
_LAYER_TENSORS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_LAYER_MODULE = re.compile(r"model\.layers\.(\d+)\.(self_attn\.\w+|mlp\.\w+)")


@dataclass(frozen=True, kw_only=True)
class GgufBase:
    """What mapping an adapter needs from its base model's config.json."""

    architecture: str  # llama.cpp's general.architecture
    reorder_qk: bool  # q/k rows reordered per head (see the module docstring)
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool  # tie_word_embeddings: llama.cpp's output layer is then token_embd.weight itself

    @classmethod
    def from_config(cls, config: dict[str, Any], *, source: str) -> GgufBase:
        """Read a transformers config.json; ``source`` names it in errors.

        Raises:
            AdapterToolError: an architecture llama.cpp's mapping is not known for here, or a
                missing or non-positive size.
        """
        names = config.get("architectures") or []
        hf_arch = names[0] if isinstance(names, list) and names else None
        if hf_arch not in _ARCHITECTURES:
            raise InputError(f"{source}: architecture {hf_arch or '(none given)'} is not supported by --to gguf; "
                             f"it supports {', '.join(SUPPORTED_ARCHITECTURES)}")
        heads = _size(config, "num_attention_heads", source)
        hidden = _size(config, "hidden_size", source)
        return cls(
            architecture=_ARCHITECTURES[hf_arch][0], reorder_qk=_ARCHITECTURES[hf_arch][1],
            layers=_size(config, "num_hidden_layers", source), hidden=hidden,
            intermediate=_size(config, "intermediate_size", source), heads=heads,
            # transformers' defaults where a config leaves these out (or, for head_dim, null)
            kv_heads=_size(config, "num_key_value_heads", source, default=heads),
            head_dim=_size(config, "head_dim", source, default=hidden // heads),
            vocab=_size(config, "vocab_size", source), tied=bool(config.get("tie_word_embeddings", False)),
        )


@dataclass(frozen=True)
class GgufTarget:
    """The llama.cpp tensor one adapted module maps to."""

    tensor: str  # e.g. blk.0.attn_q.weight; the adapter's tensors add .lora_a / .lora_b
    shape: tuple[int, int]  # the base weight as transformers stores it: (out, in), or (V, D) for embed_tokens
    reorder_heads: int  # heads whose rows B reorders (q_proj, k_proj under llama); 0: none
    embedding: bool


def gguf_target(module: str, base: GgufBase) -> GgufTarget:
    """Map a PEFT module path (``model.layers.0.self_attn.q_proj``) to its llama.cpp tensor.

    Raises:
        AdapterToolError: a module llama.cpp's model has no tensor for, a layer past the base's
            last, or lm_head / embed_tokens of a base with tied embeddings.
    """
    q_rows, kv_rows = base.heads * base.head_dim, base.kv_heads * base.head_dim
    if module == "model.embed_tokens":
        if base.tied:
            raise InputError(f"module {module}: the base ties its embeddings to lm_head, and llama.cpp would apply "
                             "this LoRA to its output layer too (one tensor, token_embd.weight); merge the adapter instead")
        return GgufTarget("token_embd.weight", (base.vocab, base.hidden), 0, True)
    if module == "lm_head":
        if base.tied:
            raise InputError(f"module {module}: the base ties lm_head to embed_tokens (tie_word_embeddings), so "
                             "llama.cpp's model has no output.weight to adapt; merge the adapter instead")
        return GgufTarget("output.weight", (base.vocab, base.hidden), 0, False)
    found = _LAYER_MODULE.fullmatch(module)
    if found is None or found.group(2) not in _LAYER_TENSORS:
        raise InputError(f"module {module} has no tensor in llama.cpp's {base.architecture} model; --to gguf maps "
                         "the attention and MLP projections, embed_tokens and lm_head")
    layer, part = int(found.group(1)), found.group(2)
    if layer >= base.layers:
        raise InputError(f"module {module} is in layer {layer} but the base has {base.layers} layers; "
                         "is it the right base?")
    shapes = {
        "self_attn.q_proj": (q_rows, base.hidden), "self_attn.k_proj": (kv_rows, base.hidden),
        "self_attn.v_proj": (kv_rows, base.hidden), "self_attn.o_proj": (base.hidden, q_rows),
        "mlp.gate_proj": (base.intermediate, base.hidden), "mlp.up_proj": (base.intermediate, base.hidden),
        "mlp.down_proj": (base.hidden, base.intermediate),
    }
    heads = {"self_attn.q_proj": base.heads, "self_attn.k_proj": base.kv_heads}.get(part, 0) if base.reorder_qk else 0
    return GgufTarget(f"blk.{layer}.{_LAYER_TENSORS[part]}.weight", shapes[part], heads, False)


def scale_fold(scaling: float, alpha: float, rank: int) -> float:
    """The factor B is multiplied by so that llama.cpp's scale gives PEFT's ``scaling``.

    llama.cpp applies ``alpha / r`` in float32 (the file stores alpha as float32), or 1 where the
    stored alpha is 0; PEFT's scaling multiplies float32 tensors too. Where the two agree in float32
    the factor is exactly 1 and B is written unchanged; else it is ``scaling / (alpha / r)``.
    """
    stored = torch.tensor(alpha, dtype=torch.float32)
    applied = float(stored / rank) if stored != 0 else 1.0
    return 1.0 if float(torch.tensor(scaling, dtype=torch.float32)) == applied else scaling / applied


def gguf_factors(lora_a: torch.Tensor, lora_b: torch.Tensor, *, target: GgufTarget,
                 fold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 ``(lora_a, lora_b)`` llama.cpp reads for one PEFT LoRA module.

    Args:
        lora_a: A, ``(r, in)`` (an embedding's lora_embedding_A: ``(r, V)``).
        lora_b: B, ``(out, r)`` (an embedding's lora_embedding_B: ``(D, r)``).
        target: where the module goes (:func:`gguf_target`).
        fold: multiplied into B (:func:`scale_fold`).

    Returns:
        New tensors: lora_a ``(r, in)`` (embedding: ``(V, r)``) and lora_b ``(out, r)`` with B's rows
        reordered per head for q/k under the llama architecture.
    """
    a = lora_a.float()
    b = lora_b.float() * fold
    if target.reorder_heads:
        rank, heads = b.shape[1], target.reorder_heads
        # (out, r) -> (heads, 2 halves, head_dim/2, r) -> interleave the halves -> (out, r)
        b = b.reshape(heads, 2, -1, rank).transpose(1, 2).reshape(b.shape)
    return (a.T if target.embedding else a).contiguous(), b.contiguous()


def _size(config: dict[str, Any], key: str, source: str, *, default: int | None = None) -> int:
    value = config.get(key)
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InputError(f"{source}: {key} must be a positive whole number, got {value!r}; is it a model's config.json?")
    return value

"""PEFT's on-disk tensor names, mapped to one internal scheme: (module path, part).

PEFT saves ``base_model.model.<module>.<part>[.<adapter name>][.weight|.bias]``, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``; hub adapters sometimes keep the
adapter name (``lora_A.default.weight``). Internally the maths sees ``("model.layers.0.self_attn.q_proj",
"lora_A")``: the part without ``.weight``, but with ``.bias`` where it is one (``lora_B.bias``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["ADAPTER_PARTS", "PEFT_PREFIX", "LoraKeys", "full_tensor_name", "lora_keys", "module_order",
           "split_adapter_key"]

PEFT_PREFIX = "base_model.model."

# Every adapter-owned parameter name PEFT writes, across the families we read.
ADAPTER_PARTS = frozenset({
    "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_E",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "ia3_l",
})


def split_adapter_key(key: str) -> tuple[str, str] | None:
    """``(module path, part)`` of an adapter tensor key, or None for a full tensor (modules_to_save)."""
    tokens = key.removeprefix(PEFT_PREFIX).split(".")
    for i, token in enumerate(tokens):
        if token in ADAPTER_PARTS:
            is_bias = len(tokens) > i + 1 and tokens[-1] == "bias"
            return ".".join(tokens[:i]), f"{token}.bias" if is_bias else token
    return None


@dataclass(frozen=True)
class LoraKeys:
    """The full on-disk keys of one LoRA module's tensors, as PEFT saves them."""

    a: str
    b: str
    bias: str  # lora_B.bias (lora_bias)
    magnitude: str  # DoRA's lora_magnitude_vector


def lora_keys(module: str, *, embedding: bool) -> LoraKeys:
    """The keys a LoRA on ``module`` is saved under; ``embedding`` for an nn.Embedding's LoRA."""
    key = PEFT_PREFIX + module
    # PEFT stores the embedding factors as bare parameters (lora_embedding_A), without ".weight".
    a, b = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
    return LoraKeys(f"{key}.{a}", f"{key}.{b}", f"{key}.lora_B.bias", f"{key}.lora_magnitude_vector")


def full_tensor_name(key: str) -> str:
    """The model tensor a full copy in an adapter stands for.

    PEFT saves modules_to_save copies as ``base_model.model.lm_head.weight`` and, when it trains
    embeddings, the LoRA layer's own ``...embed_tokens.base_layer.weight``; hub files sometimes keep
    ``modules_to_save.default``. All name the plain model tensor.
    """
    tokens = key.removeprefix(PEFT_PREFIX).split(".")
    return ".".join(t for t in tokens if t not in ("base_layer", "modules_to_save", "default"))


_DIGITS = re.compile(r"(\d+)")


def module_order(name: str) -> tuple[str | int, ...]:
    """Sort key for module and tensor paths that orders layer numbers by value: ``layers.2`` before ``layers.10``.

    Plain string order puts ``layers.10`` between ``layers.1`` and ``layers.2``; reports sort with
    this key so that they read in model order.
    """
    # split() with a group alternates text and digit runs, so two keys compare text with text and
    # numbers with numbers at every position.
    return tuple(int(chunk) if i % 2 else chunk for i, chunk in enumerate(_DIGITS.split(name)))

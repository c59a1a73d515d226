"""PEFT's on-disk tensor names, mapped to one internal scheme: (module path, part).

PEFT saves ``base_model.model.<module>.<part>[.<adapter name>][.weight|.bias]``, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``; hub adapters sometimes keep the
adapter name (``lora_A.default.weight``). Internally the maths sees ``("model.layers.0.self_attn.q_proj",
"lora_A.weight")``.
"""

from __future__ import annotations

__all__ = ["PEFT_PREFIX", "ADAPTER_PARTS", "split_adapter_key"]

PEFT_PREFIX = "base_model.model."

# Every adapter-owned parameter name PEFT writes, across the families we read.
ADAPTER_PARTS = frozenset({
    "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_E",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "ia3_l",
})


def split_adapter_key(key: str) -> tuple[str, str] | None:
    """``(module path, part)`` of an adapter tensor key, or None for a full tensor (modules_to_save).

    The part keeps a trailing ``.weight``/``.bias`` and drops any adapter name between them.
    """
    tokens = key.removeprefix(PEFT_PREFIX).split(".")
    for i, token in enumerate(tokens):
        if token in ADAPTER_PARTS:
            tail = tokens[-1] if len(tokens) > i + 1 and tokens[-1] in ("weight", "bias") else None
            part = token if tail is None else f"{token}.{tail}"
            return ".".join(tokens[:i]), part
    return None

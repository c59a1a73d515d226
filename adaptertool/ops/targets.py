"""What a checkpoint's tensors are to the commands that write adapters: which modules are
embeddings or output heads, which a ``--targets`` list names, the PEFT task type, and per-module seeds."""

from __future__ import annotations

import zlib

from adaptertool.io import TensorSource, read_json

__all__ = ["EMBEDDINGS", "HEADS", "is_embedding", "is_head", "module_seed", "targeted", "task_type"]

# nn.Embedding modules of transformers' models (LoRA'd as lora_embedding_A/B), by short name.
EMBEDDINGS = frozenset({"embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings",
                        "token_type_embeddings", "embed_positions", "shared"})
# Output heads: Linear layers for PEFT, but "all-linear" leaves them out.
HEADS = frozenset({"lm_head", "embed_out"})


def is_embedding(module: str) -> bool:
    """An input embedding module (``model.embed_tokens``), by its short name."""
    return module.rpartition(".")[2] in EMBEDDINGS


def is_head(module: str) -> bool:
    return module.rpartition(".")[2] in HEADS


def targeted(module: str, targets: tuple[str, ...]) -> bool:
    """Whether a ``--targets`` list names ``module``, as PEFT matches a target_modules list: the full
    name, or a suffix starting at a dot. "all-linear" names every module but embeddings and heads."""
    if "all-linear" in targets and not (is_embedding(module) or is_head(module)):
        return True
    return any(module == t or module.endswith("." + t) for t in targets if t != "all-linear")


def task_type(base: TensorSource) -> str | None:
    """PEFT's task_type for a base whose config.json names a causal LM, else None."""
    if base.root is None or not (base.root / "config.json").is_file():
        return None
    architectures = read_json(base.root / "config.json").get("architectures") or []
    return "CAUSAL_LM" if any(str(a).endswith("ForCausalLM") for a in architectures) else None


def module_seed(seed: int, module: str, stream: str | None = None) -> int:
    """A seed for one module's random draws that depends only on (seed, module, stream), not on which
    other modules come before it; crc32 because Python's str hash is salted per process. ``stream``
    tells apart independent draws for the same module (combine's "svd" and "dare0"...)."""
    key = module if stream is None else f"{module}:{stream}"
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (1 << 63)

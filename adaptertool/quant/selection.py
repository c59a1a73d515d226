"""Which weights a 4-bit checkpoint quantises, decided from tensor names, shapes and config.json alone.

transformers + bitsandbytes quantise every ``nn.Linear`` except the output embedding (``lm_head``),
tied weights and the model's last module, or except the modules listed in
``llm_int8_skip_modules`` when that is set. Headers do not say which 2-D tensor is a Linear and
which an embedding, so we quantise only what is certainly a Linear: 2-D float ``*.weight`` tensors
inside the numbered transformer blocks (``model.layers.7.mlp.up_proj.weight``), except those whose
module path names an embedding. Linear-looking weights left outside the blocks (a pooler, a
classifier head) would be read as 4-bit by the loader unless the config lists them, so when there
are any, or when the user skips modules, ``llm_int8_skip_modules`` lists them; otherwise it stays
null, exactly as transformers writes it (decoder LMs: SmolLM2's files are then transformers' own).

Known difference: for a ``BertModel`` (all-MiniLM-L6-v2) transformers 5.24 quantises the pooler,
because its "last module" rule looks at the last *parameter*, ``pooler.dense.bias``, which names
no module; we keep the pooler in 16/32-bit and list it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from adaptertool.errors import InputError, OptionError

__all__ = ["Selection", "matches_module", "select_weights"]

_FLOATS = {"float32", "float16", "bfloat16", "float64"}
# Module-path parts that mark an nn.Embedding (never quantised) rather than a Linear.
_EMBEDDING_PARTS = ("embed", "wte", "wpe")
_EMBEDDING_NAMES = {"shared", "relative_attention_bias"}
# Output-embedding modules: transformers skips them by default, so a skip list must name them too.
_OUTPUT_EMBEDDINGS = {"lm_head", "embed_out", "output"}
# Architectures whose Linear layers are transformers' Conv1D: stored (in, out) and transposed
# before quantising, which this version does not do.
_CONV1D_MODELS = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}


@dataclass(frozen=True, kw_only=True)
class Selection:
    """The plan for one checkpoint.

    Attributes:
        quantize: weight keys to quantise, in the order given.
        kept: module names of Linear-looking 2-D weights left unquantised (outside blocks or skipped).
        skip_modules: the config's ``llm_int8_skip_modules``: None (transformers' default) or a list.
    """

    quantize: list[str]
    kept: list[str]
    skip_modules: list[str] | None


def select_weights(tensors: Mapping[str, tuple[str, tuple[int, ...]]], config: Mapping[str, Any], *,
                   skip: Sequence[str] = (), source: str = "model") -> Selection:
    """Choose the weights to quantise.

    Args:
        tensors: ``{name: (torch dtype name, shape)}`` of every tensor of the checkpoint.
        config: the model's config.json.
        skip: module patterns to leave unquantised, matched as transformers matches
            ``llm_int8_skip_modules`` (see :func:`matches_module`).
        source: names the model in error messages.

    Raises:
        AdapterToolError: a Conv1D architecture, or nothing to quantise.
    """
    model_type = config.get("model_type")
    if model_type in _CONV1D_MODELS:
        raise InputError(f"{source}: {model_type} stores its Linear layers transposed (Conv1D); quantising it is not supported yet")
    vocab = _vocab_size(config)
    quantize: list[str] = []
    kept: dict[str, bool] = {}  # module -> is an output embedding (skipped by transformers by default)
    skipped_by_user = False
    for name, (dtype, shape) in tensors.items():
        if not (name.endswith(".weight") and len(shape) == 2 and dtype in _FLOATS):
            continue
        module = name.removesuffix(".weight")
        parts = module.split(".")
        output_embedding = parts[-1] in _OUTPUT_EMBEDDINGS or (shape[0] == vocab and not _is_embedding(parts))
        if not any(p.isdigit() for p in parts):  # outside the blocks: never quantised
            if output_embedding or not _is_embedding(parts):  # input embeddings are not Linear: ignore them
                kept[module] = output_embedding
        elif not _is_embedding(parts):
            if skip and matches_module(module, skip):
                skipped_by_user = True
            else:
                quantize.append(name)
    if not quantize:
        what = "every candidate was skipped" if skipped_by_user else "it has no 2-D Linear weights inside numbered blocks"
        raise InputError(f"{source}: nothing to quantise: {what}")
    return Selection(quantize=quantize, kept=list(kept), skip_modules=_skip_list(kept, skip, tensors, config))


def matches_module(module: str, patterns: Sequence[str]) -> bool:
    """Whether transformers would skip ``module`` for ``llm_int8_skip_modules=patterns``.

    transformers tests each Linear's own name: a pattern matches it from the start up to a module
    boundary (also as a regex), or as a plain suffix. So "model.layers.1" skips every Linear of
    block 1 but not of block 11, "up_proj" skips every up_proj, and r".*\\.mlp" every Linear under
    an ``mlp``; a bare "mlp" matches nothing (no Linear's name starts or ends with it).
    """
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    for pattern in patterns:
        try:
            if re.match(rf"(?:{pattern}){boundary}", module) or module.endswith(pattern):
                return True
        except re.error as err:
            raise OptionError(f"skip pattern {pattern!r} is not a valid regular expression ({err})") from err
    return False


def _is_embedding(parts: list[str]) -> bool:
    return any(any(marker in p for marker in _EMBEDDING_PARTS) for p in parts) or any(p in _EMBEDDING_NAMES for p in parts)


def _vocab_size(config: Mapping[str, Any]) -> int | None:
    for scope in (config, config.get("text_config") or {}):
        if isinstance(scope, Mapping) and isinstance(scope.get("vocab_size"), int):
            return scope["vocab_size"]
    return None


def _skip_list(kept: Mapping[str, bool], skip: Sequence[str], tensors: Mapping[str, Any],
               config: Mapping[str, Any]) -> list[str] | None:
    # transformers' default skips cover output embeddings; anything else left in 16-bit must be
    # named, and a list replaces the defaults, so it must name the output embedding too.
    if not skip and all(kept.values()):
        return None
    modules = set(kept) | set(skip)
    if config.get("tie_word_embeddings") is True and "lm_head.weight" not in tensors:
        modules.add("lm_head")  # tied: not stored, but transformers builds it as a Linear
    return sorted(modules)

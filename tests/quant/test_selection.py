"""Which weights get quantised, from names, shapes and config.json alone.

Oracle for pattern matching: transformers 5.24's ``should_convert_module``. The default rules are
checked on the tiny Llama's and MiniLM's real tensor names; the slow tests compare whole
checkpoints with what transformers itself saves.
"""

from __future__ import annotations

import pytest
import torch

from adaptertool import AdapterToolError
from adaptertool.ops.examples import TINY
from adaptertool.quant import matches_module, select_weights

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _llama(tied: bool) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, object]]:
    shape = TINY if not tied else type(TINY)(**{**TINY.__dict__, "tied": True})
    return {s.name: ("bfloat16", s.shape) for s in shape.specs(torch.bfloat16)}, shape.config(torch.bfloat16)


MINILM = {
    "embeddings.position_ids": ("int64", (1, 512)),
    "embeddings.word_embeddings.weight": ("float32", (30522, 384)),
    "embeddings.position_embeddings.weight": ("float32", (512, 384)),
    "embeddings.token_type_embeddings.weight": ("float32", (2, 384)),
    "embeddings.LayerNorm.weight": ("float32", (384,)),
    "encoder.layer.0.attention.self.query.weight": ("float32", (384, 384)),
    "encoder.layer.0.attention.self.query.bias": ("float32", (384,)),
    "encoder.layer.0.intermediate.dense.weight": ("float32", (1536, 384)),
    "encoder.layer.0.output.LayerNorm.weight": ("float32", (384,)),
    "pooler.dense.weight": ("float32", (384, 384)),
}


@pytest.mark.parametrize("tied", [False, True], ids=["lm_head", "tied"])
def test_llama_quantises_every_block_linear_and_keeps_default_skips(tied: bool) -> None:
    tensors, config = _llama(tied)
    selection = select_weights(tensors, config)
    expected = [f"model.layers.{i}.{part}.{name}.weight" for i in range(TINY.layers)
                for part, name in [("self_attn", n) if "proj" in n and n[0] in "qkvo" else ("mlp", n) for n in LINEARS]]
    assert selection.quantize == expected
    assert selection.kept == ([] if tied else ["lm_head"])
    assert selection.skip_modules is None  # exactly transformers' default: output embedding, tied weights


def test_minilm_lists_the_pooler_it_keeps() -> None:
    selection = select_weights(MINILM, {"model_type": "bert", "vocab_size": 30522})
    assert selection.quantize == ["encoder.layer.0.attention.self.query.weight", "encoder.layer.0.intermediate.dense.weight"]
    assert selection.kept == ["pooler.dense"]
    assert selection.skip_modules == ["pooler.dense"]  # a loader must not take it for a 4-bit Linear


@pytest.mark.parametrize("tied", [False, True], ids=["lm_head", "tied"])
def test_user_skips_replace_the_defaults_so_the_list_names_lm_head(tied: bool) -> None:
    tensors, config = _llama(tied)
    config["tie_word_embeddings"] = tied
    selection = select_weights(tensors, config, skip=["down_proj", "model.layers.1"])
    assert selection.skip_modules == ["down_proj", "lm_head", "model.layers.1"]
    assert all(".layers.0." in n and "down_proj" not in n for n in selection.quantize)
    assert len(selection.quantize) == len(LINEARS) - 1


@pytest.mark.parametrize("pattern", ["mlp", "down_proj", "model.layers.1", "model.layers.1.mlp", r".*\.mlp",
                                     "layers.1", r"model\.layers\.[01]\.self_attn", "proj", "model.layers.11"])
def test_patterns_match_as_transformers_matches_them(pattern: str) -> None:
    utils = pytest.importorskip("transformers.quantizers.quantizers_utils")
    modules = [n.removesuffix(".weight") for n in _llama(False)[0] if n.endswith("proj.weight")]
    modules += ["model.layers.11.mlp.up_proj"]
    for module in modules:
        assert matches_module(module, [pattern]) == (not utils.should_convert_module(module, [pattern])), module


def test_refusals() -> None:
    tensors, config = _llama(False)
    with pytest.raises(AdapterToolError, match="Conv1D"):
        select_weights({"h.0.attn.c_attn.weight": ("float32", (8, 24))}, {"model_type": "gpt2"}, source="m")
    with pytest.raises(AdapterToolError, match="every candidate was skipped"):
        select_weights(tensors, config, skip=["model.layers"])
    with pytest.raises(AdapterToolError, match="no 2-D Linear weights inside numbered blocks"):
        select_weights({"lm_head.weight": ("float32", (8, 8))}, {})
    with pytest.raises(AdapterToolError, match="not a valid regular expression"):
        select_weights(tensors, config, skip=["(unclosed"])

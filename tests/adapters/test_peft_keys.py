"""PEFT key names: the sort key reports list modules by."""

from __future__ import annotations

from adaptertool.adapters.peft_keys import module_order


def test_module_order_puts_layer_numbers_in_value_order() -> None:
    names = ["model.layers.10.mlp.up_proj", "lm_head", "model.layers.2.self_attn.q_proj", "model.layers.2.mlp.up_proj",
             "model.layers.1.self_attn.v_proj", "model.embed_tokens", "h.0.attn.c_attn", "h.0"]
    assert sorted(names, key=module_order) == [
        "h.0", "h.0.attn.c_attn", "lm_head", "model.embed_tokens", "model.layers.1.self_attn.v_proj",
        "model.layers.2.mlp.up_proj", "model.layers.2.self_attn.q_proj", "model.layers.10.mlp.up_proj",
    ]
    # A number never meets text at the same position, so mixed names compare without a TypeError.
    assert sorted(["x.a", "x.1", "x10", "x2"], key=module_order) == ["x2", "x10", "x.1", "x.a"]

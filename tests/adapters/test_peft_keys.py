"""PEFT key names: the sort key reports list modules by, and the keys a LoRA module is saved under."""

from __future__ import annotations

import pytest
import torch

from adaptertool.adapters.peft_keys import lora_keys, module_order, split_adapter_key


def test_module_order_puts_layer_numbers_in_value_order() -> None:
    names = ["model.layers.10.mlp.up_proj", "lm_head", "model.layers.2.self_attn.q_proj", "model.layers.2.mlp.up_proj",
             "model.layers.1.self_attn.v_proj", "model.embed_tokens", "h.0.attn.c_attn", "h.0"]
    assert sorted(names, key=module_order) == [
        "h.0", "h.0.attn.c_attn", "lm_head", "model.embed_tokens", "model.layers.1.self_attn.v_proj",
        "model.layers.2.mlp.up_proj", "model.layers.2.self_attn.q_proj", "model.layers.10.mlp.up_proj",
    ]
    # A number never meets text at the same position, so mixed names compare without a TypeError.
    assert sorted(["x.a", "x.1", "x10", "x2"], key=module_order) == ["x2", "x10", "x.1", "x.a"]



class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)
        self.proj = torch.nn.Linear(8, 6)


@pytest.mark.parametrize(("module", "option"), [("embed", None), ("embed", "use_dora"), ("proj", None),
                                                ("proj", "use_dora"), ("proj", "lora_bias")],
                         ids=["embedding", "embedding-dora", "linear", "linear-dora", "linear-bias"])
def test_lora_keys_are_the_keys_peft_saves(module: str, option: str | None) -> None:
    peft = pytest.importorskip("peft")
    options = {option: True} if option else {}
    model = peft.get_peft_model(_Tiny(), peft.LoraConfig(r=2, lora_alpha=2, target_modules=[module], **options))
    keys = lora_keys(module, embedding=module == "embed")
    extra = {"use_dora": {keys.magnitude}, "lora_bias": {keys.bias}, None: set()}[option]
    assert set(peft.get_peft_model_state_dict(model)) == {keys.a, keys.b} | extra
    # The keys read back as the same module: what one pipeline writes, another reads.
    assert {split_adapter_key(k)[0] for k in (keys.a, keys.b, keys.bias, keys.magnitude)} == {module}

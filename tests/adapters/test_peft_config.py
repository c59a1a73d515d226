"""uniform_scaling: the config keys that give every module scaling 1 at its own rank, checked by PEFT itself."""

from __future__ import annotations

import pytest
import torch

from adaptertool.adapters.peft_config import AdapterSettings, uniform_scaling


def test_most_common_rank_is_r_and_the_larger_wins_a_tie() -> None:
    assert uniform_scaling({"a": 4, "b": 8, "c": 8}, default_rank=1) == {
        "r": 8, "lora_alpha": 8, "rank_pattern": {"a": 4}, "alpha_pattern": {"a": 4}}
    assert uniform_scaling({"a": 4, "b": 8}, default_rank=1)["r"] == 8
    assert uniform_scaling({"a": 4, "b": 4}, default_rank=1) == {"r": 4, "lora_alpha": 4}
    assert uniform_scaling({}, default_rank=16) == {"r": 16, "lora_alpha": 16}


# Each pattern key must match its own module only: unescaped, "layers.1.q" would also match "layersX1Yq";
# unanchored, "head" would also match "lm_head".
RANKS = {"layers.1.q": 4, "layersX1Yq": 2, "layers.11.q": 2, "layers.2.q": 2, "head": 1, "lm_head": 3}


class _Named(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # Attribute names cannot hold dots: nested ModuleDicts give the dotted paths.
        self.layers = torch.nn.ModuleDict({i: torch.nn.ModuleDict({"q": torch.nn.Linear(8, 8)}) for i in ("1", "11", "2")})
        self.layersX1Yq = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 8)
        self.lm_head = torch.nn.Linear(8, 8)


def test_peft_gives_every_module_its_rank_and_scaling_one() -> None:
    peft = pytest.importorskip("peft")
    config = uniform_scaling(RANKS, default_rank=1)
    assert (config["r"], sorted(config["rank_pattern"].values())) == (2, [1, 3, 4])
    model = peft.get_peft_model(_Named(), peft.LoraConfig(target_modules=sorted(RANKS), **config))
    for name, rank in RANKS.items():
        layer = model.base_model.model.get_submodule(name)
        assert (layer.lora_A["default"].weight.shape[0], layer.scaling["default"]) == (rank, 1.0), name
    # Our own reader of the config agrees.
    settings = AdapterSettings.from_config({"peft_type": "LORA", **config}, source="test")
    assert {name: (settings.module_rank(name), settings.module_scaling(name, rank)) for name, rank in RANKS.items()} == {
        name: (rank, 1.0) for name, rank in RANKS.items()}

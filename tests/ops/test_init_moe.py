"""init on mixture-of-experts bases (fixtures/build_moe.py), against PEFT 0.21 on transformers 5.

Both forms of expert adapter, from both saved layouts: the fused form (target_parameters) has
exactly the keys and shapes PEFT's own get_peft_model makes for the same config; every adapter loads
in PeftModel.from_pretrained with no missing and no unexpected keys (but the ones PEFT 0.21 drops, by
its own bugs, from per-expert adapters on deepseek_v3 and qwen2_moe) and leaves the logits as they
were, since B is 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from adaptertool.cli import cli
from adaptertool.errors import AdapterToolError
from adaptertool.ops.init import InitConfig, init_adapter
from tests.ops.moe_peft import moe_model, peft_load

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

FAMILIES = ("qwen3_moe", "mixtral", "qwen2_moe", "olmoe", "deepseek_v3", "gpt_oss")
CASES = [(f, layout) for f in FAMILIES for layout in (("fused",) if f == "gpt_oss" else ("per-expert", "fused"))]
E, H, I, R = 4, 32, 24, 2
IDS = torch.tensor([[3, 17, 42, 9, 5, 63, 28, 11]])
# What PEFT 0.21 on transformers 5 drops, as unexpected keys, of a per-expert adapter: deepseek_v3's
# dense MLP (layer 0: 3 Linears, A and B) and qwen2_moe's experts (2 layers, as converted keys, A and B).
PEFT_DROPS = {"deepseek_v3": 12, "qwen2_moe": 8}
MOE_LAYERS = {"deepseek_v3": 1}  # its first layer is dense (first_k_dense_replace); the others have 2 MoE layers


def _model(folder: Path) -> torch.nn.Module:
    return moe_model(folder)[0]


def _load(base: Path, adapter: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[torch.nn.Module, list[str], list[str]]:
    # PEFT warns that rank_pattern keys did not match when it converts per-expert adapters: not checked here
    model, missing, unexpected, _ = peft_load(_model(base), adapter, monkeypatch)
    return model, missing, unexpected


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _config(adapter: Path) -> dict:
    return json.loads((adapter / "adapter_config.json").read_text())


@pytest.mark.parametrize(("family", "layout"), CASES)
def test_fused_form_is_what_peft_makes_and_loads_unchanged(moe_fixtures: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           family: str, layout: str) -> None:
    base = moe_fixtures / family / layout
    report = init_adapter(InitConfig(base=base, out=tmp_path / "ad", rank=R, experts="fused"))
    config = _config(tmp_path / "ad")
    assert report.experts == "fused" and report.parameters == 2 * MOE_LAYERS.get(family, 2)
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    ours = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    made = peft.get_peft_model(_model(base), peft.LoraConfig(r=R, lora_alpha=config["lora_alpha"],
                                                             target_modules=config["target_modules"],
                                                             target_parameters=config["target_parameters"]))
    theirs = peft.get_peft_model_state_dict(made)
    # Mixtral's router keeps its on-disk name (block_sparse_moe.gate), which PEFT's loader renames to mlp.gate.
    assert ({k.replace(".block_sparse_moe.", ".mlp."): tuple(v.shape) for k, v in ours.items()}
            == {k: tuple(v.shape) for k, v in theirs.items()})
    for key, value in ours.items():
        if key.endswith("lora_B.weight"):
            assert not value.any(), key
        else:  # kaiming-uniform as nn.Linear's reset: U(-1/sqrt(in), 1/sqrt(in))
            bound = value.shape[1] ** -0.5
            assert value.abs().max() <= bound and value.abs().max() > 0.8 * bound, key
    model, missing, unexpected = _load(base, tmp_path / "ad", monkeypatch)
    assert missing == [] and unexpected == []
    assert torch.equal(_logits(model), _logits(_model(base)))
    moved = [n for n in report.notes if "left out" in n]
    assert len(moved) == (family == "deepseek_v3")  # its dense MLP's gate/up/down_proj, which PEFT would move


@pytest.mark.parametrize(("family", "layout"), [c for c in CASES if c[0] != "gpt_oss"])
def test_per_expert_form_names_transformers_4_modules_in_either_layout(moe_fixtures: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch, family: str,
                                                                      layout: str) -> None:
    base = moe_fixtures / family / layout
    report = init_adapter(InitConfig(base=base, out=tmp_path / "ad", rank=R, experts="per-expert", method="gaussian"))
    ours = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    on_disk = load_file(moe_fixtures / family / "per-expert" / "model.safetensors")
    expert_modules = {k.removesuffix(".weight") for k in on_disk if ".experts." in k}
    adapted = {k.removeprefix("base_model.model.").rsplit(".", 2)[0] for k in ours}
    assert expert_modules <= adapted and len(expert_modules) == MOE_LAYERS.get(family, 2) * E * 3
    assert report.experts == "per-expert" and report.parameters == 0 and "target_parameters" not in _config(tmp_path / "ad")
    for key, value in ours.items():
        name = key.removeprefix("base_model.model.").rsplit(".", 2)[0] + ".weight"
        # Mixtral's router keeps the base's name: mlp.gate on the fused base, block_sparse_moe.gate on disk per expert.
        shape = on_disk[name if name in on_disk else name.replace(".mlp.", ".block_sparse_moe.")].shape
        assert tuple(value.shape) == ((R, shape[1]) if ".lora_A." in key else (shape[0], R)), key
    model, missing, unexpected = _load(base, tmp_path / "ad", monkeypatch)
    assert missing == [] and len(unexpected) == PEFT_DROPS.get(family, 0), unexpected
    assert torch.equal(_logits(model), _logits(_model(base)))
    assert len([n for n in report.notes if n.startswith("PEFT 0.21")]) == (family in PEFT_DROPS)


def test_the_default_form_follows_the_base_and_draws_are_seeded(moe_fixtures: Path, tmp_path: Path) -> None:
    root = moe_fixtures / "qwen3_moe"
    per_expert = init_adapter(InitConfig(base=root / "per-expert", out=tmp_path / "a", rank=R))
    fused = init_adapter(InitConfig(base=root / "fused", out=tmp_path / "b", rank=R))
    assert (per_expert.experts, fused.experts) == ("per-expert", "fused")
    init_adapter(InitConfig(base=root / "per-expert", out=tmp_path / "c", rank=R, experts="fused"))
    b, c = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("b", "c"))
    assert b.keys() == c.keys() and all(torch.equal(v, c[k]) for k, v in b.items())  # the base's layout changes nothing


def test_gaussian_experts_have_peft_spread(moe_fixtures: Path, tmp_path: Path) -> None:
    """PEFT's gaussian init draws A ~ N(0, 1/r) with r the per-expert rank, not E*r."""
    init_adapter(InitConfig(base=moe_fixtures / "qwen3_moe" / "fused", out=tmp_path / "ad", rank=8, method="gaussian",
                            targets=("experts",)))
    a = load_file(tmp_path / "ad" / "adapter_model.safetensors")["base_model.model.model.layers.0.mlp.experts.lora_A.weight"]
    assert a.shape == (E * 8, I) and abs(float(a.std()) - 1 / 8) < 0.1 / 8


@pytest.mark.parametrize(("targets", "params", "modules"), [
    (("experts",), ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], []),
    (("down_proj", "q_proj"), ["mlp.experts.down_proj"], ["q_proj"]),
    (("model.layers.1.mlp.experts.gate_up_proj",), ["model.layers.1.mlp.experts.gate_up_proj"], []),
], ids=["experts", "down_proj", "one-layer"])
def test_targets_reach_fused_parameters_as_peft_matches_them(moe_fixtures: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             targets: tuple[str, ...], params: list[str], modules: list[str]) -> None:
    base = moe_fixtures / "qwen3_moe" / "per-expert"
    init_adapter(InitConfig(base=base, out=tmp_path / "ad", rank=R, experts="fused", targets=targets))
    config = _config(tmp_path / "ad")
    assert config["target_parameters"] == params and config["target_modules"] == modules
    model, missing, unexpected = _load(base, tmp_path / "ad", monkeypatch)
    assert missing == [] and unexpected == []


def test_experts_alone_in_the_per_expert_form_name_them_without_the_dense_mlp(moe_fixtures: Path, tmp_path: Path) -> None:
    """deepseek_v3's dense MLP shares the experts' short names: --targets experts must name the experts in full."""
    init_adapter(InitConfig(base=moe_fixtures / "deepseek_v3" / "per-expert", out=tmp_path / "ad", rank=R,
                            targets=("experts",)))
    names = _config(tmp_path / "ad")["target_modules"]
    assert len(names) == E * 3 and all(".mlp.experts." in n for n in names)
    init_adapter(InitConfig(base=moe_fixtures / "qwen3_moe" / "per-expert", out=tmp_path / "q", rank=R, targets=("experts",)))
    assert _config(tmp_path / "q")["target_modules"] == ["down_proj", "gate_proj", "up_proj"]


@pytest.mark.parametrize(("family", "layout", "options", "message"), [
    ("gpt_oss", "fused", {"experts": "per-expert"}, "gpt_oss experts exist only fused .* use --experts fused"),
    ("qwen3_moe", "per-expert", {"experts": "fused", "method": "pissa", "residual_base": "res"},
     r"--method pissa is not defined for PEFT's target_parameters LoRAs on fused experts .*; use --experts per-expert"),
    ("qwen3_moe", "fused", {"dora": True}, r"--dora is not defined .*; leave the experts out of --targets$"),
    ("qwen3_moe", "fused", {"dora": True, "experts": "per-expert"}, r"--dora on model\.layers\.0\.mlp\.experts\.0\.gate_proj needs its weight as a tensor "
                                           r"of its own, but the base fuses its experts"),
    ("deepseek_v3", "fused", {"targets": ("gate_proj", "up_proj")}, r"moves target_modules named gate_proj/up_proj/down_proj "
                                                                   r"onto the fused experts of a deepseek_v3 model"),
    ("qwen3_moe", "fused", {"targets": ("w1",)}, r"--targets w1 matches no 2-D float weight"),
], ids=["gpt-oss-per-expert", "pissa-fused", "dora-fused", "dora-fused-base", "deepseek-dense-named", "no-match"])
def test_refusals_are_one_line_and_write_nothing(moe_fixtures: Path, tmp_path: Path, family: str, layout: str,
                                                 options: dict, message: str) -> None:
    if "residual_base" in options:
        options = {**options, "residual_base": tmp_path / options["residual_base"]}
    with pytest.raises(AdapterToolError, match=message):
        init_adapter(InitConfig(base=moe_fixtures / family / layout, out=tmp_path / "ad", rank=R, **options))
    assert not (tmp_path / "ad").exists()


def test_experts_options_on_a_base_without_experts(tiny_models: dict, tmp_path: Path) -> None:
    base = tiny_models[("fp32", False)]
    for options, message in (({"experts": "fused"}, "--experts fused applies to mixture-of-experts bases"),
                             ({"targets": ("experts",)}, "--targets experts, but the base has no experts")):
        result = CliRunner().invoke(cli, ["init", str(base), str(tmp_path / "ad"),
                                          *(["--experts", options["experts"]] if "experts" in options else ["--targets", "experts"])])
        assert result.exit_code == 1 and message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "ad").exists()

"""combine on mixture-of-experts adapters (fixtures/build_moe.py), against PEFT 0.21 and transformers 5.

Per-expert adapters (target_modules on each expert's Linear) are ordinary modules and combine by
every method; target_parameters adapters on fused experts combine by linear and cat, expert by
expert. Oracles: PEFT's merge_and_unload of the combined adapter against PEFT's merges of the
inputs (fixtures' oracles), and our merge of the combined adapter against merging the inputs one
after the other.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from adaptertool.cli import cli
from adaptertool.ops.combine import CombineConfig, combine
from adaptertool.ops.merge import MergeConfig, merge

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _model(folder: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's float32 merge_and_unload of ``adapter`` on ``base``, as transformers 5 holds it (fused experts)."""
    return peft.PeftModel.from_pretrained(_model(base), adapter).merge_and_unload().state_dict()


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _other(source: Path, folder: Path, seed: int) -> Path:
    """A second adapter of the same form and keys: ``source``'s factors moved by seeded noise."""
    shutil.copytree(source, folder)
    g = torch.Generator().manual_seed(seed)
    tensors = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in load_file(source / "adapter_model.safetensors").items()}
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    return folder


def _sequential(base: Path, adapters: list[tuple[Path, float]], tmp: Path) -> dict[str, torch.Tensor]:
    """Our merge of each input in turn (float32 bases: the weighted sum of the deltas, rounded per step)."""
    current = base
    for i, adapter in enumerate(adapters):
        merge(MergeConfig(base=current, adapters=(adapter,), out=tmp / f"step{i}"))
        current = tmp / f"step{i}"
    return _weights(current)


def _assert_close(ours: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == expected.keys()
    for name, value in ours.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=2e-6, msg=name)


@pytest.mark.parametrize("method", ["linear", "cat", "svd"])
@pytest.mark.parametrize("layout", ["per-expert", "fused"])
def test_per_expert_adapters_combine_as_ordinary_modules(moe_fixtures: Path, tmp_path: Path, layout: str, method: str) -> None:
    root = moe_fixtures / "qwen3_moe"
    first, second = root / "adapters" / "per-expert", _other(root / "adapters" / "per-expert", tmp_path / "second", 1)
    # svd at the sum of the ranks is exact too
    options = {"rank": 4, "svd": "exact"} if method == "svd" else {}
    report = combine(CombineConfig(adapters=(first, second), weights=(0.7, -0.3), out=tmp_path / "mixed", method=method,
                                   **options))
    assert {m.rank for m in report.modules} == {4} and len(report.modules) == 2 * 4 * 3 + 2  # experts and q_proj
    merge(MergeConfig(base=root / layout, adapters=((tmp_path / "mixed", 1.0),), out=tmp_path / "merged"))
    expected = _sequential(root / layout, [(first, 0.7), (second, -0.3)], tmp_path)
    _assert_close(_weights(tmp_path / "merged"), expected)


def test_combined_per_expert_adapter_is_what_peft_merges(moe_fixtures: Path, tmp_path: Path) -> None:
    """PEFT 0.21 on transformers 5 converts the combined per-expert adapter (one rank everywhere) on load;
    its merge equals its merges of the two inputs, added."""
    root = moe_fixtures / "mixtral"
    first, second = root / "adapters" / "per-expert", _other(root / "adapters" / "per-expert", tmp_path / "second", 2)
    combine(CombineConfig(adapters=(first, second), out=tmp_path / "mixed"))
    base = _model(root / "fused").state_dict()
    one, two = _peft_merged(root / "fused", first), _peft_merged(root / "fused", second)
    both = _peft_merged(root / "fused", tmp_path / "mixed")
    for name, value in both.items():
        torch.testing.assert_close(value, one[name] + two[name] - base[name], rtol=0, atol=2e-6, msg=name)


@pytest.mark.parametrize("method", ["linear", "cat"])
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_target_parameters_adapters_combine_expert_by_expert(moe_fixtures: Path, tmp_path: Path, family: str,
                                                            method: str) -> None:
    """tp (r 2 on both parameters) and tp-pattern (rank_pattern 3/1, alpha_pattern, rsLoRA): PEFT merges
    the combined adapter to its two merges added; our merge of it equals merging the two in turn."""
    root = moe_fixtures / family
    tp, pattern = root / "adapters" / "tp", root / "adapters" / "tp-pattern"
    report = combine(CombineConfig(adapters=(tp, pattern), out=tmp_path / "mixed", method=method))
    ranks = {m.module: m.rank for m in report.modules}
    assert ranks["model.layers.1.mlp.experts.gate_up_proj"] == 2 + 3 and ranks["model.layers.0.mlp.experts.down_proj"] == 2 + 1
    config = json.loads((tmp_path / "mixed" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert not any(".experts" in m for m in config["target_modules"])
    base = _weights(root / "fused")
    one, two = _weights(root / "oracles" / "tp"), _weights(root / "oracles" / "tp-pattern")
    both = _peft_merged(root / "fused", tmp_path / "mixed")
    for name, value in both.items():
        torch.testing.assert_close(value, one[name] + two[name] - base[name], rtol=0, atol=2e-6, msg=name)
    merge(MergeConfig(base=root / "fused", adapters=((tmp_path / "mixed", 1.0),), out=tmp_path / "merged"))
    _assert_close(_weights(tmp_path / "merged"), _sequential(root / "fused", [(tp, 1.0), (pattern, 1.0)], tmp_path))


def test_one_parameter_and_two_nest_as_peft_does(moe_fixtures: Path, tmp_path: Path) -> None:
    """tp-down holds down_proj alone (keys without .base_layer); with tp the output holds both, so
    down_proj's keys stay outer and gate_up_proj's nest in base_layer."""
    root = moe_fixtures / "qwen3_moe"
    combine(CombineConfig(adapters=(root / "adapters" / "tp-down", root / "adapters" / "tp"), out=tmp_path / "mixed",
                          weights=(2.0, 0.5)))
    keys = load_file(tmp_path / "mixed" / "adapter_model.safetensors")
    assert keys["base_model.model.model.layers.0.mlp.experts.lora_A.weight"].shape == (4 * (2 + 2), 24)
    assert keys["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape == (4 * 2, 32)
    merge(MergeConfig(base=root / "per-expert", adapters=((tmp_path / "mixed", 1.0),), out=tmp_path / "merged"))
    expected = _sequential(root / "per-expert", [(root / "adapters" / "tp-down", 2.0), (root / "adapters" / "tp", 0.5)], tmp_path)
    _assert_close(_weights(tmp_path / "merged"), expected)


def _tp_with(source: Path, folder: Path, **config: object) -> Path:
    shutil.copytree(source, folder)
    settings = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**settings, **config}))
    return folder


def test_refusals_are_one_line_and_write_nothing(moe_fixtures: Path, tmp_path: Path) -> None:
    root = moe_fixtures / "qwen3_moe"
    tp, per_expert = root / "adapters" / "tp", root / "adapters" / "per-expert"
    eight = tmp_path / "eight"
    shutil.copytree(tp, eight)
    tensors = load_file(tp / "adapter_model.safetensors")
    tensors = {k: torch.cat([v, v]) if "lora_A" in k and ".experts" in k else torch.cat([v, v], dim=1)
               if "lora_B" in k and ".experts" in k else v for k, v in tensors.items()}  # 8 experts at rank 2
    save_file(tensors, eight / "adapter_model.safetensors")
    cases = [
        ([str(tp), str(tp), "--method", "svd"], f"error: {tp}: base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight "
         "is a target_parameters LoRA on fused experts, which combines only by stacking its factors expert by expert: "
         "use --method linear or cat"),
        ([str(tp), str(per_expert)], f"error: {per_expert}: model.layers.0.mlp.experts.0.down_proj is a per-expert LoRA on "
         f"the experts that {tp} adapts as fused parameters (target_parameters); combine cannot hold both forms in one "
         "adapter: merge them one after the other"),
        ([str(_tp_with(tp, tmp_path / "old", peft_version="0.18.0")), str(tp)],
         f"error: {tmp_path / 'old'}: made by PEFT 0.18.0, whose target_parameters LoRAs have A/B roles that only the "
         "base's layout tells (PEFT < 0.19.1); merge it into its base instead of combining it"),
        ([str(tp), str(eight)], f"error: {eight}: base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight is a "
         f"LoRA on 8 experts of [48, 32] (out, in) for model.layers.0.mlp.experts.gate_up_proj, but {tp} has 4 experts of "
         "[48, 32]; the adapters were made for different base models"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(cli, ["combine", *args, str(tmp_path / "out")])
        assert result.exit_code == 1, (args, result.output)
        assert result.output.strip().splitlines() == [message]
        assert not (tmp_path / "out").exists()

"""info on mixture-of-experts checkpoints: experts per layer, router, shared experts, layout, from
config.json and the headers alone (fixtures/build_moe.py's tiny models)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from adaptertool.cli import cli
from adaptertool.ops.info import info

# family -> (family naming, layout of the fused save, MoE layers, dense layers, router, shared-expert tensors)
FACTS = {
    "qwen3_moe": ("qwen2_moe", "fused", [0, 1], [], ["gate.weight"], []),
    "mixtral": ("mixtral", "fused", [0, 1], [], ["gate.weight"], []),
    "qwen2_moe": ("qwen2_moe", "fused", [0, 1], [], ["gate.weight"],
                  ["shared_expert.down_proj.weight", "shared_expert.gate_proj.weight", "shared_expert.up_proj.weight",
                   "shared_expert_gate.weight"]),
    "olmoe": ("qwen2_moe", "fused", [0, 1], [], ["gate.weight"], []),
    "deepseek_v3": ("qwen2_moe", "fused", [1], [0], ["gate.e_score_correction_bias", "gate.weight"],
                    ["shared_experts.down_proj.weight", "shared_experts.gate_proj.weight", "shared_experts.up_proj.weight"]),
    "gpt_oss": ("gpt_oss", "fused-transposed", [0, 1], [], ["router.bias", "router.weight"], []),
}
CASES = [(family, layout) for family in FACTS for layout in (("fused",) if family == "gpt_oss" else ("per-expert", "fused"))]


@pytest.mark.parametrize(("family", "layout"), CASES)
def test_info_describes_the_experts(moe_fixtures: Path, family: str, layout: str) -> None:
    naming, fused, moe, dense, router, shared = FACTS[family]
    report = info(moe_fixtures / family / layout)
    experts = report.experts
    assert experts is not None and report.notes == []
    assert (experts.family, experts.layout) == (naming, "per-expert" if layout == "per-expert" else fused)
    assert (experts.moe_layers, experts.dense_layers, experts.experts, experts.experts_per_token) == (moe, dense, 4, 2)
    assert (experts.hidden, experts.intermediate, experts.router, experts.shared) == (32, 24, router, shared)


def test_info_json_carries_the_experts_and_stays_torch_free(moe_fixtures: Path) -> None:
    base = moe_fixtures / "deepseek_v3" / "per-expert"
    code = ("import sys; from adaptertool.cli import cli; "
            f"cli(['info', {str(base)!r}, '--json'], standalone_mode=False); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["experts"]["moe_layers"] == [1] and report["experts"]["dense_layers"] == [0]
    assert report["experts"]["layout"] == "per-expert" and report["notes"] == []


def test_info_on_adapters_and_dense_models_has_no_experts(moe_fixtures: Path, tiny_sharded: Path) -> None:
    assert info(moe_fixtures / "qwen3_moe" / "adapters" / "tp").experts is None
    report = info(tiny_sharded)
    assert report.experts is None and report.notes == []


def test_experts_that_disagree_with_the_config_are_a_note_not_an_error(moe_fixtures: Path, tmp_path: Path) -> None:
    folder = tmp_path / "base"
    shutil.copytree(moe_fixtures / "qwen3_moe" / "fused", folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    (folder / "config.json").write_text(json.dumps({**config, "num_experts": 8, "num_local_experts": 8}), encoding="utf-8")
    report = info(folder)
    assert report.experts is None and report.tensors > 0
    assert len(report.notes) == 1 and "experts not described" in report.notes[0] and "says 8 experts" in report.notes[0]
    result = CliRunner().invoke(cli, ["info", str(folder), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["notes"] == report.notes

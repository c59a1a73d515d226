"""extract from mixture-of-experts fine-tunes (fixtures/build_moe.py), against transformers 5 and PEFT 0.21.

The fine-tune: a fixture base whose every expert projection (and one attention projection) moved by
a seeded rank-2 delta, the same deltas in both saved layouts. Extracted at a rank that holds every
delta, the adapter merged back (adaptertool merge) gives the tuned model's logits in transformers,
in either form of expert LoRA, from either layout; PEFT loads the adapters with no missing or
unexpected keys and its forward gives the tuned logits too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from adaptertool.adapters.experts import PROJECTIONS, describe_experts
from adaptertool.cli import cli
from adaptertool.errors import AdapterToolError
from adaptertool.ops.extract import ExtractConfig, extract
from adaptertool.ops.merge import MergeConfig, merge
from tests.ops.moe_peft import moe_model, peft_load

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

FAMILIES = ("qwen3_moe", "mixtral", "qwen2_moe", "olmoe", "deepseek_v3", "gpt_oss")
CASES = [(f, layout) for f in FAMILIES for layout in (("fused",) if f == "gpt_oss" else ("per-expert", "fused"))]
FORMS = ("per-expert", "fused")  # gpt-oss has no per-expert form (test_refusals)
E = 4
IDS = torch.tensor([[3, 17, 42, 9, 5, 63, 28, 11]])
ATTENTION = {"deepseek_v3": "q_b_proj"}  # the attention projection the fine-tune also moves (default q_proj)
# Where PEFT 0.21 on transformers 5 cannot take the adapter in: qwen2_moe's per-expert LoRAs (ignored).
PEFT_CANNOT = {("qwen2_moe", "per-expert")}


def _fine_tune(base: Path, out: Path, *, rank_of=lambda expert: 2, skip: int | None = None) -> Path:
    """``base`` with every expert projection (but expert ``skip``'s) and one attention projection moved by
    a seeded random delta of rank ``rank_of(expert)``: generated per (layer, expert, projection), so
    both saved layouts of a family get the same fine-tune."""
    shutil.copytree(base, out)
    tensors = load_file(base / "model.safetensors")
    config = json.loads((base / "config.json").read_text())
    layout = describe_experts(config, {k: tuple(v.shape) for k, v in tensors.items()})
    assert layout is not None
    for layer in layout.layers:
        for e in range(layer.experts):
            for p, projection in enumerate(PROJECTIONS):
                if e == skip:
                    continue
                where = layer.weight(e, projection)
                g = torch.Generator().manual_seed(1000 * layer.index + 10 * e + p)
                rows, cols = where.shape
                rank = rank_of(e)
                where.view(tensors[where.tensor]).add_(torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g) * 0.05)
    attention = next(k for k in sorted(tensors) if k.endswith(f"{ATTENTION.get(config['model_type'], 'q_proj')}.weight"))
    g = torch.Generator().manual_seed(7)
    tensors[attention] += torch.randn(tensors[attention].shape[0], 2, generator=g) @ torch.randn(2, tensors[attention].shape[1], generator=g) * 0.05
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def tuned(moe_fixtures: Path, tmp_path_factory: pytest.TempPathFactory):
    """(family, layout) -> the fine-tune of that fixture base, made once."""
    root = tmp_path_factory.mktemp("moe-tuned")
    made: dict[tuple[str, str], Path] = {}

    def get(family: str, layout: str) -> Path:
        if (family, layout) not in made:
            made[(family, layout)] = _fine_tune(moe_fixtures / family / layout, root / f"{family}-{layout}")
        return made[(family, layout)]

    return get


def _model(folder: Path) -> torch.nn.Module:
    model, info = moe_model(folder)
    assert not any(info.values()), info
    return model


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _peft(base: Path, adapter: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[torch.nn.Module, list[str], list[str]]:
    model, missing, unexpected, caught = peft_load(_model(base), adapter, monkeypatch)
    assert not [w for w in caught if "missing" in w.lower()], caught
    return model, missing, unexpected


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize(("family", "layout", "form"), [(f, layout, form) for f, layout in CASES for form in FORMS
                                                        if not (f == "gpt_oss" and form == "per-expert")])
def test_full_rank_extract_merged_back_gives_the_tuned_logits(moe_fixtures: Path, tuned, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch, family: str, layout: str,
                                                              form: str) -> None:
    base, fine = moe_fixtures / family / layout, tuned(family, layout)
    report = extract(ExtractConfig(base=base, tuned=fine, out=tmp_path / "ad", rank=8, experts=form))
    assert report.experts == form and report.rel_error < 1e-5
    merge(MergeConfig(base=base, adapters=((tmp_path / "ad", 1.0),), out=tmp_path / "merged"))
    expected = _logits(_model(fine))
    torch.testing.assert_close(_logits(_model(tmp_path / "merged")), expected, rtol=1e-5, atol=1e-5)
    if (family, form) in PEFT_CANNOT:
        return
    model, missing, unexpected = _peft(base, tmp_path / "ad", monkeypatch)
    assert missing == [] and unexpected == []
    torch.testing.assert_close(_logits(model), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
def test_per_expert_extract_names_transformers_4_modules(moe_fixtures: Path, tuned, tmp_path: Path, layout: str) -> None:
    """The default from either layout: the per-expert checkpoint's module names."""
    report = extract(ExtractConfig(base=moe_fixtures / "mixtral" / layout, tuned=tuned("mixtral", layout),
                                   out=tmp_path / "ad", rank=4))
    assert report.experts == "per-expert"
    keys = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    on_disk = load_file(moe_fixtures / "mixtral" / "per-expert" / "model.safetensors")
    modules = {k.removeprefix("base_model.model.").rsplit(".", 2)[0] for k in keys}
    assert modules == {k.removesuffix(".weight") for k in on_disk if ".experts." in k} | {"model.layers.0.self_attn.q_proj"}
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert "target_parameters" not in config and sorted(config["target_modules"]) == [
        "model.layers.0.self_attn.q_proj", "w1", "w2", "w3"]


def test_report_groups_experts_and_json_keeps_each(moe_fixtures: Path, tuned, tmp_path: Path) -> None:
    base, fine = moe_fixtures / "qwen3_moe" / "per-expert", tuned("qwen3_moe", "per-expert")
    text = CliRunner().invoke(cli, ["extract", str(base), str(fine), str(tmp_path / "a"), "--rank", "4"])
    assert text.exit_code == 0, text.output
    rows = [line for line in text.output.splitlines() if line.startswith("model.")]
    assert len(rows) == 1 + 2 * 3  # q_proj of layer 0, then a row per layer and projection
    assert "model.layers.1.mlp.experts.*.down_proj" in rows[-1] and rows[-1].endswith("4 of 4 experts changed")
    assert not any(".experts.2." in line for line in text.output.splitlines())
    done = CliRunner().invoke(cli, ["extract", str(base), str(fine), str(tmp_path / "b"), "--rank", "4", "--json"])
    report = json.loads(done.output)
    experts = [m for m in report["modules"] if m["group"] is not None]
    assert len(experts) == 2 * E * 3 and {m["expert"] for m in experts} == set(range(E))
    assert [g["group"] for g in report["expert_groups"]] == [
        f"model.layers.{layer}.mlp.experts.*.{p}_proj" for layer in (0, 1) for p in ("gate", "up", "down")]
    fused = json.loads(CliRunner().invoke(cli, ["extract", str(base), str(fine), str(tmp_path / "c"), "--rank", "4",
                                                "--experts", "fused", "--json"]).output)
    params = [m for m in fused["modules"] if m["expert"] is not None]
    assert len(params) == 2 * 2 * E and {m["group"] for m in params} == {
        f"model.layers.{layer}.mlp.experts.{p}" for layer in (0, 1) for p in ("gate_up_proj", "down_proj")}


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_fused_form_pads_experts_to_one_rank_per_parameter(moe_fixtures: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Experts of different ranks (expert e moved by rank-e deltas, --energy finds them) and one unchanged:
    one rank per parameter, the lower-rank and unchanged experts padded with zeros, the model still exact."""
    base = moe_fixtures / "olmoe" / "fused"
    fine = _fine_tune(base, tmp_path / "tuned", rank_of=lambda e: e, skip=0)
    report = extract(ExtractConfig(base=base, tuned=fine, out=tmp_path / "ad", energy=0.999999, experts="fused", svd="exact"))
    tensors = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    down = tensors["base_model.model.model.layers.0.mlp.experts.lora_A.weight"]
    assert down.shape[0] == E * 3 and not down[:3].any()  # rank 3 (expert 3's), expert 0 all zero
    gate_up = tensors["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"]
    assert gate_up.shape[0] == E * 6  # gate and up of expert 3: rank 3 each
    groups = {g.group: g for g in report.expert_groups}
    assert groups["model.layers.0.mlp.experts.down_proj"].changed == E - 1
    model, missing, unexpected = _peft(base, tmp_path / "ad", monkeypatch)
    assert missing == [] and unexpected == []
    torch.testing.assert_close(_logits(model), _logits(_model(fine)), rtol=1e-5, atol=1e-5)


def test_unchanged_experts_are_named_in_full_in_the_per_expert_form(moe_fixtures: Path, tmp_path: Path) -> None:
    base = moe_fixtures / "qwen3_moe" / "per-expert"
    fine = _fine_tune(base, tmp_path / "tuned", skip=1)
    report = extract(ExtractConfig(base=base, tuned=fine, out=tmp_path / "ad", rank=4))
    names = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["target_modules"]
    assert len([n for n in names if ".experts." in n]) == 2 * (E - 1) * 3 and ".experts.1." not in " ".join(names)
    assert sum(".experts.1." in m for m in report.unchanged) == 2 * 3
    assert all(g.changed == E - 1 and g.experts == E for g in report.expert_groups)


def test_dense_mlp_beside_fused_experts_is_kept_with_a_note(moe_fixtures: Path, tmp_path: Path) -> None:
    """deepseek_v3's dense MLP changed too: the fused form keeps its LoRA (our merge applies it) and says
    that PEFT 0.21 on transformers 5 cannot load the adapter."""
    base = moe_fixtures / "deepseek_v3" / "fused"
    fine = _fine_tune(base, tmp_path / "tuned")
    tensors = load_file(fine / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"] += 0.01
    save_file(tensors, fine / "model.safetensors", metadata={"format": "pt"})
    report = extract(ExtractConfig(base=base, tuned=fine, out=tmp_path / "ad", rank=8, experts="fused"))
    assert any(m.module == "model.layers.0.mlp.down_proj" for m in report.modules)
    assert [n for n in report.notes if n.startswith("PEFT 0.21 on transformers 5 cannot load this adapter")]


def test_gpt_oss_extracts_fused_by_default(moe_fixtures: Path, tuned, tmp_path: Path) -> None:
    report = extract(ExtractConfig(base=moe_fixtures / "gpt_oss" / "fused", tuned=tuned("gpt_oss", "fused"),
                                   out=tmp_path / "ad", rank=8))
    assert report.experts == "fused" and report.rel_error < 1e-5


@pytest.mark.parametrize(("family", "options", "message"), [
    ("gpt_oss", {"experts": "per-expert"}, "gpt_oss experts exist only fused"),
    ("qwen3_moe", {"experts": "fused", "targets": ("gate_proj",)}, r"--targets gate_proj matches no 2-D weight"),
    ("qwen3_moe", {"experts": "sideways"}, r"--experts must be one of per-expert, fused"),
])
def test_refusals(moe_fixtures: Path, tmp_path: Path, family: str, options: dict, message: str) -> None:
    base = moe_fixtures / family / "fused"
    with pytest.raises(AdapterToolError, match=message):
        extract(ExtractConfig(base=base, tuned=base, out=tmp_path / "ad", **options))
    assert not (tmp_path / "ad").exists()

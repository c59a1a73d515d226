"""merge and subtract on mixture-of-experts bases, against PEFT 0.21 and transformers 5 (fixtures/build_moe.py).

Six families, both saved layouts (per-expert Linears, fused 3-D tensors; gpt-oss fused and
transposed), both adapter forms (PEFT target_parameters, transformers-4 per-expert target_modules).
Oracles: PEFT's float32 merge_and_unload, bit for bit, wherever PEFT applies the adapter fully.
Where it does not (per-expert adapters on deepseek_v3's dense MLP and shared experts, and on every
qwen2_moe expert, which PEFT 0.21 with transformers 5 drops silently), the tests pin PEFT's
behaviour and check ours against the float64 formula rounded once. transformers loads every
output with no missing or unexpected keys.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from functools import cache
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from adaptertool.adapters.expert_lora import ParamLora
from adaptertool.adapters.experts import PROJECTIONS, ExpertLayout, describe_experts
from adaptertool.adapters.peft_keys import split_adapter_key
from adaptertool.cli import cli
from adaptertool.errors import AdapterToolError
from adaptertool.io import open_checkpoint
from adaptertool.ops.adapter_inputs import load_adapter
from adaptertool.ops.merge import MergeConfig, merge, subtract
from adaptertool.ops.merge_experts import merge_fused
from adaptertool.ops.merge_plan import ExpertStep, plan_targets
from tests.ops.moe_peft import moe_model

transformers = pytest.importorskip("transformers")

FAMILIES = ("qwen3_moe", "mixtral", "qwen2_moe", "olmoe", "deepseek_v3", "gpt_oss")
LAYOUTS = {family: ("fused",) if family == "gpt_oss" else ("per-expert", "fused") for family in FAMILIES}
CASES = [(family, layout) for family in FAMILIES for layout in LAYOUTS[family]]
ADAPTERS = ("tp", "tp-down", "tp-pattern", "per-expert")
MERGES = [(f, layout, a) for f, layout in CASES for a in ADAPTERS if not (f == "gpt_oss" and a == "per-expert")]
E, H, I = 4, 32, 24
SCALING = 8 / 2  # the per-expert adapter's lora_alpha / r
# PEFT 0.21 + transformers 5 on the per-expert adapter: family -> (what it drops, how many modules of all)
DROPPED = {"deepseek_v3": ("dense", 6, 20), "qwen2_moe": ("experts", 24, 32)}


# --- helpers ------------------------------------------------------------------------------------


@cache
def _tensors(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint folder's tensors (one file in the fixtures), read once; callers must not modify them."""
    return load_file(path / ("adapter_model.safetensors" if (path / "adapter_config.json").is_file() else "model.safetensors"))


def _layout(folder: Path) -> ExpertLayout:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    layout = describe_experts(config, {k: tuple(v.shape) for k, v in _tensors(folder).items()})
    assert layout is not None
    return layout


def _plain(name: str) -> str:
    """A non-expert tensor's name in transformers 5's naming (Mixtral's router sits in block_sparse_moe on disk)."""
    return name.replace(".block_sparse_moe.", ".mlp.")


def _kind(module: str) -> str:
    return ("experts" if ".experts." in module else "shared" if ".shared_expert" in module
            else "dense" if ".mlp." in module else "attention")


def _once(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The float64 formula ``W + scaling * B @ A``, rounded once to the weight's dtype."""
    return (weight.double() + scaling * (b.double() @ a.double())).to(weight.dtype)


def _assert_formula(ours: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    once = _once(weight, a, b, SCALING)
    # Ours adds the float32 delta: within one float32 rounding of the float64 result rounded once.
    torch.testing.assert_close(ours, once, rtol=0, atol=float(torch.finfo(torch.float32).eps * once.abs().max()), msg=what)
    assert not torch.equal(ours, weight), what


def _merge(root: Path, tmp: Path, family: str, layout: str, adapter: str, **options: object) -> Path:
    out = tmp / f"{family}-{layout}-{adapter}"
    merge(MergeConfig(base=root / family / layout, adapters=((root / family / "adapters" / adapter, 1.0),), out=out,
                      **options))  # type: ignore[arg-type]
    return out


@pytest.fixture(scope="module")
def merged(moe_fixtures: Path, tmp_path_factory: pytest.TempPathFactory):
    """(family, layout, adapter) -> our merge of that fixture adapter into that base, made once."""
    tmp = tmp_path_factory.mktemp("moe-merges")
    done: dict[tuple[str, str, str], Path] = {}

    def get(family: str, layout: str, adapter: str) -> Path:
        if (family, layout, adapter) not in done:
            done[(family, layout, adapter)] = _merge(moe_fixtures, tmp, family, layout, adapter)
        return done[(family, layout, adapter)]

    return get


# --- merges against PEFT -------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "layout", "adapter"), MERGES)
def test_merge_equals_peft_or_the_formula_where_peft_drops_modules(moe_fixtures: Path, merged, family: str, layout: str,
                                                                   adapter: str) -> None:
    base_dir, out = moe_fixtures / family / layout, merged(family, layout, adapter)
    base, ours, oracle = _tensors(base_dir), _tensors(out), _tensors(moe_fixtures / family / "oracles" / adapter)
    base_layout, our_layout, oracle_layout = _layout(base_dir), _layout(out), _layout(moe_fixtures / family / "oracles" / adapter)
    lora = _tensors(moe_fixtures / family / "adapters" / adapter)
    dropped_kind = DROPPED.get(family, (None,))[0] if adapter == "per-expert" else None
    # The output keeps the base's layout and names, every tensor its dtype.
    assert {k: (v.dtype, v.shape) for k, v in ours.items()} == {k: (v.dtype, v.shape) for k, v in base.items()}
    changed = 0
    # Experts: each projection of each expert, whatever the layout, against PEFT's (saved fused).
    for layer, ours_layer, peft_layer in zip(base_layout.layers, our_layout.layers, oracle_layout.layers, strict=True):
        for e in range(E):
            for projection in PROJECTIONS:
                w, o, p = (x.weight(e, projection) for x in (layer, ours_layer, peft_layer))
                weight, mine, peft = w.view(base[w.tensor]), o.view(ours[o.tensor]), p.view(oracle[p.tensor])
                changed += not torch.equal(mine, weight)
                if dropped_kind == "experts":
                    module = f"{layer.block}.experts.{e}.{projection}_proj"  # qwen2_moe's per-expert names
                    assert torch.equal(peft, weight), module  # PEFT 0.21 dropped this expert's LoRA, silently
                    a, b = (lora[f"base_model.model.{module}.lora_{x}.weight"] for x in "AB")
                    _assert_formula(mine, weight, a, b, module)
                else:
                    assert torch.equal(mine, peft), (layer.index, e, projection)
            if layer.interleaved:  # gpt-oss's expert biases: no LoRA touches them
                for name in (f"{layer.block}.experts.gate_up_proj_bias", f"{layer.block}.experts.down_proj_bias"):
                    assert torch.equal(ours[name], oracle[name]) and torch.equal(ours[name], base[name])
    expected = len(base_layout.layers) * E * (1 if adapter == "tp-down" else 3)
    assert changed == expected
    # Everything else: attention (every adapter has one LoRA there), dense MLPs, shared experts, routers, norms.
    for name, value in ours.items():
        if name in our_layout.tensors:
            continue
        module = name.removesuffix(".weight")
        a_key = f"base_model.model.{module}.lora_A.weight"
        if dropped_kind == "dense" and a_key in lora and _kind(module) in ("dense", "shared"):
            assert torch.equal(oracle[_plain(name)], base[name]), module  # dropped by PEFT
            _assert_formula(value, base[name], lora[a_key], lora[a_key.replace("lora_A", "lora_B")], module)
        else:
            assert torch.equal(value, oracle[_plain(name)]), name


@pytest.mark.parametrize(("family", "layout"), CASES)
def test_the_report_names_what_peft_drops(moe_fixtures: Path, tmp_path: Path, family: str, layout: str) -> None:
    adapter = "tp" if family == "gpt_oss" else "per-expert"
    out = tmp_path / "out"
    report = merge(MergeConfig(base=moe_fixtures / family / layout, out=out,
                               adapters=((moe_fixtures / family / "adapters" / adapter, 1.0),)))
    notes = [n for n in report.notes if "PEFT" in n]
    if family not in DROPPED or adapter != "per-expert":
        assert notes == []
        return
    kind, n, total = DROPPED[family]
    assert len(notes) == 1
    assert re.search(rf"PEFT 0\.21 with transformers 5 silently drops {n} of this adapter's {total} modules on a {family} "
                     rf"model .*; this output applies all {total}$", notes[0])
    assert ("outside the experts" in notes[0]) == (kind == "dense")


def test_pattern_ranks_and_rslora_reach_each_parameter(moe_fixtures: Path) -> None:
    """tp-pattern: rank_pattern gives layer 1's gate_up_proj rank 3 and down_proj rank 1, alpha_pattern
    gate_up_proj alpha 5, with rsLoRA; the plan must carry PEFT's resolved scalings."""
    adapter = load_adapter(moe_fixtures / "qwen3_moe" / "adapters" / "tp-pattern", 1.0)
    try:
        with open_checkpoint(moe_fixtures / "qwen3_moe" / "fused") as base:
            plan = plan_targets(base, [adapter], subtract=False)
    finally:
        adapter.close()
    found = Counter((name, step.update.rank, step.update.scaling) for name, target in plan.targets.items()
                    for step in target.steps if isinstance(step, ExpertStep) and isinstance(step.update, ParamLora))
    assert found == {
        ("model.layers.0.mlp.experts.gate_up_proj", 2, 5 / 2 ** 0.5): E, ("model.layers.0.mlp.experts.down_proj", 1, 8.0): E,
        ("model.layers.1.mlp.experts.gate_up_proj", 3, 5 / 3 ** 0.5): E, ("model.layers.1.mlp.experts.down_proj", 1, 8.0): E,
    }


# --- transformers loads what we write -------------------------------------------------------------


def _logits(folder: Path, state: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    model, info = moe_model(folder)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys, no errors
    if state is not None:
        model.load_state_dict(state)
    ids = torch.tensor([[3, 17, 42, 9, 5, 63, 28, 11]])
    with torch.no_grad():
        return model(ids).logits


def _formula_state(root: Path, family: str) -> dict[str, torch.Tensor]:
    """transformers' state dict of the base with every module of the per-expert adapter merged by the
    float64 formula (rounded once): the model PEFT would have made had it dropped nothing."""
    model = moe_model(root / family / "fused")[0]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    layout = describe_experts(model.config.to_dict(), {k: tuple(v.shape) for k, v in state.items()})
    assert layout is not None
    lora = _tensors(root / family / "adapters" / "per-expert")
    modules = sorted({split[0] for key in lora if (split := split_adapter_key(key))})
    for module in modules:
        a, b = (lora[f"base_model.model.{module}.lora_{x}.weight"] for x in "AB")
        where = layout.locate(module)
        view = where.view(state[where.tensor]) if where is not None else state[f"{_plain(module)}.weight"]
        view.copy_(_once(view.clone(), a, b, SCALING))
    return state


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize(("family", "layout", "adapter"), [m for m in MERGES if m[2] in ("tp", "per-expert")])
def test_transformers_loads_the_output_and_its_logits_equal_peft(moe_fixtures: Path, merged, family: str, layout: str,
                                                                 adapter: str) -> None:
    ours = _logits(merged(family, layout, adapter))
    peft = _logits(moe_fixtures / family / "oracles" / adapter)
    if adapter == "per-expert" and family in DROPPED:
        assert not torch.allclose(ours, peft, atol=1e-4)  # PEFT's model lacks the LoRAs it dropped
        reference = _logits(moe_fixtures / family / "fused", _formula_state(moe_fixtures, family))
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(ours, peft)


# --- subtract undoes merge ----------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ["tp-pattern", "per-expert"])
@pytest.mark.parametrize(("family", "layout"), CASES)
def test_subtract_undoes_merge(moe_fixtures: Path, tmp_path: Path, family: str, layout: str, adapter: str) -> None:
    if family == "gpt_oss" and adapter == "per-expert":
        adapter = "tp"
    base_dir = moe_fixtures / family / layout
    adapters = ((moe_fixtures / family / "adapters" / adapter, 0.7),)
    merge(MergeConfig(base=base_dir, adapters=adapters, out=tmp_path / "merged"))
    subtract(MergeConfig(base=tmp_path / "merged", adapters=adapters, out=tmp_path / "restored"))
    base, merged_, restored = _tensors(base_dir), load_file(tmp_path / "merged" / "model.safetensors"), \
        load_file(tmp_path / "restored" / "model.safetensors")
    assert restored.keys() == base.keys()
    moved = max(float((merged_[k] - v).abs().max()) for k, v in base.items())
    error = max(float((restored[k] - v).abs().max()) for k, v in base.items())
    assert moved > 1e-3 and error < 1e-6, (moved, error)


# --- several adapters, dtypes, memory ------------------------------------------------------------


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
def test_two_adapters_in_one_pass_equal_two_merges_in_float32(moe_fixtures: Path, tmp_path: Path, layout: str) -> None:
    """A target_parameters and a per-expert adapter on the same experts, weighted: one pass applies both
    in order in float32 and rounds once; on a float32 base that is two merges in a row, bit for bit."""
    root = moe_fixtures / "mixtral"
    tp, per_expert = (root / "adapters" / "tp", 0.5), (root / "adapters" / "per-expert", -1.5)
    merge(MergeConfig(base=root / layout, adapters=(tp, per_expert), out=tmp_path / "both"))
    merge(MergeConfig(base=root / layout, adapters=(tp,), out=tmp_path / "first"))
    merge(MergeConfig(base=tmp_path / "first", adapters=(per_expert,), out=tmp_path / "second"))
    both, second = (load_file(tmp_path / name / "model.safetensors") for name in ("both", "second"))
    assert both.keys() == second.keys()
    for name, value in both.items():
        assert torch.equal(value, second[name]), name


@pytest.mark.parametrize("kind", ["dora", "ia3"])
def test_per_expert_dora_and_ia3_give_the_same_experts_in_either_layout(moe_fixtures: Path, tmp_path: Path, kind: str) -> None:
    """Non-additive per-expert modules (PEFT 0.21 cannot load them on transformers 5 experts at all):
    applied to the expert's rows of a fused tensor, they give the per-expert base's result."""
    root, g = moe_fixtures / "qwen3_moe", torch.Generator().manual_seed(3)
    lora = _tensors(root / "adapters" / "per-expert")
    if kind == "dora":
        extra = {k.replace("lora_A.weight", "lora_magnitude_vector"): torch.rand(lora[k.replace("lora_A", "lora_B")].shape[0],
                                                                              generator=g) + 0.5
                 for k in lora if k.endswith("lora_A.weight")}
        adapter = _edited(root / "adapters" / "per-expert", tmp_path / kind, tensors=extra, config={"use_dora": True})
    else:
        adapter = tmp_path / kind
        adapter.mkdir()
        vectors = {k.replace("lora_A.weight", "ia3_l"): torch.rand((1, v.shape[1]) if ".down_proj." in k else (
            lora[k.replace("lora_A", "lora_B")].shape[0], 1), generator=g) + 0.5 for k, v in lora.items() if k.endswith("lora_A.weight")}
        save_file(vectors, adapter / "adapter_model.safetensors")
        (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "target_modules": ["gate_proj", "up_proj",
                                                                 "down_proj", "q_proj"], "feedforward_modules": ["down_proj"]}))
    for layout in ("per-expert", "fused"):
        merge(MergeConfig(base=root / layout, adapters=((adapter, 1.0),), out=tmp_path / f"out-{layout}"))
    one, two = (_layout(tmp_path / f"out-{layout}") for layout in ("per-expert", "fused"))
    a, b = (_tensors(tmp_path / f"out-{layout}") for layout in ("per-expert", "fused"))
    base_layout, base = _layout(root / "per-expert"), _tensors(root / "per-expert")
    for l1, l2, l0 in zip(one.layers, two.layers, base_layout.layers, strict=True):
        for e in range(E):
            for projection in PROJECTIONS:
                w1, w2, w0 = l1.weight(e, projection), l2.weight(e, projection), l0.weight(e, projection)
                assert torch.equal(w1.view(a[w1.tensor]), w2.view(b[w2.tensor])), (l1.index, e, projection)
                assert not torch.equal(w1.view(a[w1.tensor]), w0.view(base[w0.tensor]))
    with pytest.raises(AdapterToolError, match="subtract cannot undo it"):
        subtract(MergeConfig(base=tmp_path / "out-fused", adapters=((adapter, 1.0),), out=tmp_path / "undone"))


def test_a_replaced_fused_tensor_takes_later_expert_loras(moe_fixtures: Path, tmp_path: Path) -> None:
    """modules_to_save of a whole fused tensor, then a target_parameters LoRA on it: the LoRA applies
    to the replacement, as two merges in a row (float32)."""
    root = moe_fixtures / "qwen3_moe"
    name = "model.layers.1.mlp.experts.gate_up_proj"
    whole = tmp_path / "whole"
    whole.mkdir()
    save_file({f"base_model.model.{name}": _tensors(root / "fused")[name] * 2}, whole / "adapter_model.safetensors")
    (whole / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"],
                                                           "modules_to_save": ["experts"]}))
    tp = (root / "adapters" / "tp", 1.0)
    merge(MergeConfig(base=root / "fused", adapters=((whole, 1.0), tp), out=tmp_path / "both"))
    merge(MergeConfig(base=root / "fused", adapters=((whole, 1.0),), out=tmp_path / "first"))
    merge(MergeConfig(base=tmp_path / "first", adapters=(tp,), out=tmp_path / "second"))
    both, second, first = (load_file(tmp_path / n / "model.safetensors") for n in ("both", "second", "first"))
    assert all(torch.equal(v, second[k]) for k, v in both.items())
    assert not torch.equal(both[name], first[name]) and torch.equal(first[name], _tensors(root / "fused")[name] * 2)


def _bf16_fused(root: Path, folder: Path) -> Path:
    """qwen3_moe's fused base in bfloat16 (the fixtures' bf16 base is per-expert)."""
    folder.mkdir()
    save_file({k: v.to(torch.bfloat16) for k, v in _tensors(root / "qwen3_moe" / "fused").items()},
              folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((root / "qwen3_moe" / "fused" / "config.json").read_text(encoding="utf-8"))
    (folder / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}), encoding="utf-8")
    return folder


def _tp_delta(lora: dict[str, torch.Tensor], layer: int, expert: int, projection: str) -> torch.Tensor:
    """The float64 update of one expert projection by the fixtures' tp adapter (r 2, alpha 8, both
    parameters): A's rows expert-major, B's columns rank-major, gate and up the halves of gate_up's rows."""
    key = f"base_model.model.model.layers.{layer}.mlp.experts" + ("" if projection == "down" else ".base_layer")
    a, b = lora[f"{key}.lora_A.weight"].double(), lora[f"{key}.lora_B.weight"].double()
    a_e, b_e = a.reshape(E, 2, -1)[expert], b.reshape(b.shape[0], 2, E)[:, :, expert]
    delta = SCALING * (b_e @ a_e)
    return {"gate": delta[:I], "up": delta[I:], "down": delta}[projection]


def test_bf16_bases_round_once_where_peft_rounds_twice(moe_fixtures: Path, tmp_path: Path) -> None:
    """PEFT adds bf16(delta) to a bf16 weight: two roundings. We add the float32 delta to the weight in
    float32 and round once, in either layout: the float64 formula rounded once, but where the float32
    sum sits within float32 error of a bf16 rounding boundary."""
    root = moe_fixtures / "qwen3_moe"
    outs = {}
    for name, base in (("per-expert", root / "bf16"), ("fused", _bf16_fused(moe_fixtures, tmp_path / "bf16-fused"))):
        outs[name] = tmp_path / f"out-{name}"
        merge(MergeConfig(base=base, adapters=((root / "adapters" / "tp", 1.0),), out=outs[name]))
    base, layout, lora = _tensors(root / "bf16"), _layout(root / "bf16"), _tensors(root / "adapters" / "tp")
    peft, peft_layout = _tensors(root / "oracles" / "tp-bf16"), _layout(root / "oracles" / "tp-bf16")
    ours = {name: (_tensors(out), _layout(out)) for name, out in outs.items()}
    ours_differ = peft_differ = total = 0
    for layer in layout.layers:
        for e in range(E):
            for projection in PROJECTIONS:
                w, p = layer.weight(e, projection), peft_layout.layer(layer.index).weight(e, projection)
                weight = w.view(base[w.tensor])
                once = (weight.double() + _tp_delta(lora, layer.index, e, projection)).to(torch.bfloat16)
                mine = [o.view(t[o.tensor]) for t, lay in ours.values() for o in [lay.layer(layer.index).weight(e, projection)]]
                assert torch.equal(mine[0], mine[1])  # the same bits from either layout
                ulp = (once.float().abs() * 2 ** -7).clamp_min(2 ** -133)  # bf16 spacing at each value, at most
                assert ((mine[0].float() - once.float()).abs() <= ulp).all()
                ours_differ += int((mine[0] != once).sum())
                peft_differ += int((p.view(peft[p.tensor]) != once).sum())
                total += once.numel()
    assert ours_differ <= total // 1000, ours_differ
    assert 0.05 * total < peft_differ < 0.5 * total, peft_differ  # PEFT's second rounding moves ~30% of them


def test_fused_tensors_merge_in_place(moe_fixtures: Path, tmp_path: Path) -> None:
    """The output of a fused tensor that keeps its dtype is the stored tensor as read, updated in place."""
    fused = _bf16_fused(moe_fixtures, tmp_path / "bf16-fused")
    adapter = load_adapter(moe_fixtures / "qwen3_moe" / "adapters" / "tp", 1.0)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    try:
        with open_checkpoint(fused) as base:
            plan = plan_targets(base, [adapter], subtract=False)
            weight = base.read(name)
        out = merge_fused(weight, plan.targets[name].steps, [adapter], torch.device("cpu"), torch.bfloat16)
        # --dtype fp32 on a bf16 base: rounded once, to float32
        as_float32 = merge_fused(_tensors(fused)[name].clone(), plan.targets[name].steps, [adapter], torch.device("cpu"),
                                 torch.float32)
    finally:
        adapter.close()
    assert out.data_ptr() == weight.data_ptr() and out.dtype == torch.bfloat16
    assert not torch.equal(out, _tensors(fused)[name])
    assert torch.equal(as_float32.to(torch.bfloat16), out) and not torch.equal(as_float32, out.float())


_PEAK = """
import json, sys, torch
from pathlib import Path
from adaptertool.io import open_checkpoint
from adaptertool.ops.adapter_inputs import load_adapter
from adaptertool.ops.merge_plan import plan_targets
from adaptertool.ops.merge_experts import merge_fused

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

torch.set_num_threads(1)
adapter = load_adapter(Path(sys.argv[2]), 1.0)
with open_checkpoint(Path(sys.argv[1])) as base:
    plan = plan_targets(base, [adapter], subtract=False)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    weight = base.read(name)
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the resident size now
    held = status("VmRSS")
    merge_fused(weight, plan.targets[name].steps, [adapter], torch.device("cpu"), torch.bfloat16)
    print(json.dumps([weight.nbytes, status("VmHWM") - held]))
"""


def test_a_fused_merge_holds_one_expert_in_float32(tmp_path: Path) -> None:
    """Peak memory: the bf16 tensor once, plus about one expert's float32 slice and delta; a float32
    copy of the whole tensor would add twice the tensor's size."""
    experts, hidden, inter, rank = 32, 1024, 512, 4
    g = torch.Generator().manual_seed(0)
    (tmp_path / "base").mkdir()
    save_file({"model.layers.0.mlp.experts.gate_up_proj": torch.randn(experts, 2 * inter, hidden, generator=g).to(torch.bfloat16),
               "model.layers.0.mlp.experts.down_proj": torch.randn(experts, hidden, inter, generator=g).to(torch.bfloat16)},
              tmp_path / "base" / "model.safetensors")
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "hidden_size": hidden,
                                                               "moe_intermediate_size": inter, "num_experts": experts}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file({f"{TP_KEY}.lora_A.weight": torch.randn(experts * rank, hidden, generator=g),
               f"{TP_KEY}.lora_B.weight": torch.randn(2 * inter, experts * rank, generator=g)}, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": rank,
                                                                "target_parameters": ["mlp.experts.gate_up_proj"]}))
    done = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path / "base"), str(adapter)], capture_output=True,
                          text=True, check=False, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    tensor, grew = json.loads(done.stdout.strip().splitlines()[-1])
    one_expert = tensor // experts * 2  # a float32 slice
    assert grew < 4 * one_expert + tensor // 4, (tensor, grew)  # measured: 10.6 MB, 2.5 slices


# --- refusals: one line, exit 1, nothing written ------------------------------------------------


def _edited(source: Path, folder: Path, *, config: dict | None = None, drop: tuple[str, ...] = (),
            tensors: dict[str, torch.Tensor] | None = None, rename: tuple[str, str] | None = None) -> Path:
    """A copy of adapter ``source`` with config keys changed (None deletes), tensors dropped, added or renamed."""
    shutil.copytree(source, folder)
    settings = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    for key, value in (config or {}).items():
        if value is None:
            settings.pop(key, None)
        else:
            settings[key] = value
    (folder / "adapter_config.json").write_text(json.dumps(settings), encoding="utf-8")
    weights = {k: v for k, v in _tensors(source).items() if not any(d in k for d in drop)}
    if rename is not None:
        weights = {k.replace(*rename): v for k, v in weights.items()}
    weights.update(tensors or {})
    save_file(weights, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    return folder


TP_KEY = "base_model.model.model.layers.0.mlp.experts"


def _bad_adapters(root: Path, tmp: Path) -> dict[str, tuple[Path, Path, str]]:
    """name -> (base, adapter, the error it must give)."""
    qwen = root / "qwen3_moe"
    tp, g = qwen / "adapters" / "tp", torch.Generator().manual_seed(0)
    eight = {f"{TP_KEY}.base_layer.lora_A.weight": torch.randn(16, H, generator=g),  # 8 experts at rank 2
             f"{TP_KEY}.base_layer.lora_B.weight": torch.randn(2 * I, 16, generator=g)}
    transposed = {f"{TP_KEY}.lora_A.weight": torch.randn(2 * E, H, generator=g),  # down_proj: A (E*r, out), B (in, E*r)
                  f"{TP_KEY}.lora_B.weight": torch.randn(I, 2 * E, generator=g)}
    return {
        "expert count": (qwen / "fused", _edited(tp, tmp / "eight", tensors=eight),
                         r"lora_A\.weight has 16 rows, which at rank 2 \(adapter_config\.json\) is 8 experts, but "
                         r"model\.layers\.0\.mlp has 4 experts"),
        "parameter the base lacks": (qwen / "per-expert", _edited(tp, tmp / "w13", config={"target_parameters": ["mlp.experts.w13"]}),
                                     r"target_parameters \['mlp\.experts\.w13'\] names no parameter of model\.layers\.\d\.mlp\.experts"),
        "no target_parameters": (qwen / "fused", _edited(tp, tmp / "untold", config={"target_parameters": None}),
                                 r"adapter_config\.json has no target_parameters, so which of gate_up_proj, down_proj it adapts is unknown"),
        "transposed by PEFT 0.19.0": (qwen / "fused", _edited(tp, tmp / "transposed", tensors=transposed, config={"peft_version": "0.19.0"}),
                                      r"roles that PEFT 0\.17-0\.19\.0 gave them by mistake .* PEFT >= 0\.19\.1"),
        "layer the base lacks": (qwen / "fused", _edited(tp, tmp / "deeper", rename=(".layers.1.", ".layers.7.")),
                                 r"layers\.7\.mlp\.experts\.(base_layer\.)?lora_A\.weight is a LoRA on the parameters of model\.layers\.7\.mlp\.experts, "
                                 r"but the base's experts are model\.layers\.0\.mlp\.experts, model\.layers\.1\.mlp\.experts"),
        "base without experts": (root / "qwen3_moe" / "dense", tp,
                                 r"is a LoRA on the parameters of model\.layers\.\d\.mlp\.experts, but the base has no "
                                 r"mixture-of-experts layers"),
        "per-expert module of another expert count": (
            qwen / "fused", _edited(qwen / "adapters" / "per-expert", tmp / "expert7", rename=(".experts.3.", ".experts.7.")),
            r"model\.layers\.0\.mlp\.experts\.7\.down_proj is expert 7, but model\.layers\.0\.mlp has 4 experts; "
            r"the adapter is for another model$"),
    }


def _dense_base(root: Path) -> None:
    """qwen3_moe's attention and embeddings with a dense MLP's names and no experts: a base the
    target_parameters adapter cannot be for."""
    folder = root / "qwen3_moe" / "dense"
    if folder.is_dir():
        return
    tensors = {k: v for k, v in _tensors(root / "qwen3_moe" / "per-expert").items() if ".mlp." not in k}
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((root / "qwen3_moe" / "per-expert" / "config.json").read_text(encoding="utf-8"))
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}))


def test_bad_adapters_are_refused_with_one_line(moe_fixtures: Path, tmp_path: Path) -> None:
    root = tmp_path / "fixtures"
    (root / "qwen3_moe").mkdir(parents=True)
    for folder in ("fused", "per-expert", "adapters"):
        (root / "qwen3_moe" / folder).symlink_to(moe_fixtures / "qwen3_moe" / folder)
    _dense_base(root)
    for name, (base, adapter, message) in _bad_adapters(root, tmp_path).items():
        out = tmp_path / "out"
        result = CliRunner().invoke(cli, ["merge", str(base), str(adapter), str(out)])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1, (name, result.output)
        assert len(lines) == 1 and lines[0].startswith(f"error: {adapter}: "), (name, result.output)
        assert re.search(message, lines[0]), (name, lines[0])
        assert not out.exists(), name


def test_convert_refuses_target_parameters_adapters(moe_fixtures: Path, tmp_path: Path) -> None:
    # combine takes them (linear, cat: tests/ops/test_combine_moe.py); convert does not yet
    tp = moe_fixtures / "qwen3_moe" / "adapters" / "tp"
    result = CliRunner().invoke(cli, ["convert", str(tp), str(tmp_path / "out"), "--rank", "1"])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines() == [
        f"error: {tp}: adapter_config.json has target_parameters ['mlp.experts.down_proj', 'mlp.experts.gate_up_proj'], "
        "LoRAs on fused mixture-of-experts parameters; only merge, subtract and combine (linear, cat) support such adapters yet"]
    assert not (tmp_path / "out").exists()


def test_mixtral_adapters_in_either_naming_reach_either_layout(moe_fixtures: Path, tmp_path: Path) -> None:
    """Mixtral's per-expert modules are block_sparse_moe.experts.N.w1 in transformers 4 and on disk,
    mlp.experts.N.w1 in transformers 5: an adapter in either naming merges the same into either base."""
    root = moe_fixtures / "mixtral"
    renamed = _edited(root / "adapters" / "per-expert", tmp_path / "mlp-names", rename=(".block_sparse_moe.", ".mlp."))
    for layout in ("per-expert", "fused"):
        for name, adapter in (("disk", root / "adapters" / "per-expert"), ("mlp", renamed)):
            merge(MergeConfig(base=root / layout, adapters=((adapter, 1.0),), out=tmp_path / f"{layout}-{name}"))
        one, two = (load_file(tmp_path / f"{layout}-{name}" / "model.safetensors") for name in ("disk", "mlp"))
        assert one.keys() == two.keys() and all(torch.equal(v, two[k]) for k, v in one.items())
        assert not all(torch.equal(v, _tensors(root / layout)[k]) for k, v in one.items())

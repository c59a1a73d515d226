"""Expert layouts and LoRA on experts, against tiny MoE models and merges made by transformers 5 and
PEFT 0.21 (fixtures/build_moe.py): six families, both saved layouts, both adapter forms.

Oracles: a float32 merge must equal PEFT's merge_and_unload bit for bit wherever PEFT applies the
adapter fully. Where PEFT silently drops part of an adapter (DeepSeek-V3's dense MLP and shared
experts, every expert of qwen2_moe, all given as transformers-4 target_modules), the tests pin
PEFT's behaviour and check ours against the float64 formula rounded once.
"""

from __future__ import annotations

import json
from dataclasses import replace
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adaptertool.adapters.expert_lora import (
    expert_delta,
    expert_factors,
    fuse_gate_up,
    plan_param_loras,
    split_gate_up,
    stack_experts,
)
from adaptertool.adapters.experts import PROJECTIONS, ExpertLayout, MoeLayer, describe_experts
from adaptertool.adapters.lora import linear_delta
from adaptertool.adapters.peft_config import AdapterSettings
from adaptertool.adapters.peft_keys import split_adapter_key
from adaptertool.errors import AdapterToolError

FAMILIES = ("qwen3_moe", "mixtral", "qwen2_moe", "olmoe", "deepseek_v3", "gpt_oss")
LAYOUTS = {family: ("fused",) if family == "gpt_oss" else ("per-expert", "fused") for family in FAMILIES}
CASES = [(family, layout) for family in FAMILIES for layout in LAYOUTS[family]]
TP_ADAPTERS = ("tp", "tp-down", "tp-pattern")
E, H, I = 4, 32, 24  # the fixtures' experts, hidden size, expert intermediate size
BOTH = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]  # target_parameters

# family -> (naming, MoE layers, dense layers, router tensors under the block, shared-expert tensors per layer)
FACTS = {
    "qwen3_moe": ("qwen2_moe", (0, 1), (), ("gate.weight",), 0),
    "mixtral": ("mixtral", (0, 1), (), ("gate.weight",), 0),
    "qwen2_moe": ("qwen2_moe", (0, 1), (), ("gate.weight",), 4),  # shared_expert.{gate,up,down}_proj + its gate
    "olmoe": ("qwen2_moe", (0, 1), (), ("gate.weight",), 0),
    "deepseek_v3": ("qwen2_moe", (1,), (0,), ("gate.e_score_correction_bias", "gate.weight"), 3),
    "gpt_oss": ("gpt_oss", (0, 1), (), ("router.bias", "router.weight"), 0),
}


@cache
def _tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, read once; callers must not modify them."""
    return load_file(path)


def _model(root: Path, family: str, folder: str) -> dict[str, torch.Tensor]:
    return _tensors(root / family / folder / "model.safetensors")


def _config(folder: Path) -> dict:
    return json.loads(folder.read_text(encoding="utf-8"))


def _layout(root: Path, family: str, folder: str) -> ExpertLayout:
    path = root / family / folder
    layout = describe_experts(_config(path / "config.json"), {k: tuple(v.shape) for k, v in _model(root, family, folder).items()})
    assert layout is not None
    return layout


def _adapter(root: Path, family: str, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = root / family / "adapters" / name
    return _config(folder / "adapter_config.json"), _tensors(folder / "adapter_model.safetensors")


def _expert_groups(layout: ExpertLayout, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[MoeLayer, dict]]:
    """Experts module -> (its layer, {adapter key: shape}) for every key on a fused experts module."""
    groups: dict[str, tuple[MoeLayer, dict]] = {}
    for key, value in tensors.items():
        split = split_adapter_key(key)
        layer = layout.layer_of(split[0]) if split else None
        if layer is not None:
            groups.setdefault(layer.module, (layer, {}))[1][key] = tuple(value.shape)
    return groups


def _once(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``W + scaling * B @ A`` in float64, rounded once to float32."""
    return (weight.double() + scaling * (b.double() @ a.double())).float()


# --- layouts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "layout"), CASES)
def test_layout_of_each_family_and_saved_layout(moe_fixtures: Path, family: str, layout: str) -> None:
    described = _layout(moe_fixtures, family, layout)
    naming, moe, dense, router, shared = FACTS[family]
    kind = "fused-transposed" if family == "gpt_oss" else layout
    assert (described.model_type, described.family, described.dense_layers) == (family, naming, dense)
    assert [layer.index for layer in described.layers] == list(moe)
    for layer in described.layers:
        block = "block_sparse_moe" if (family, layout) == ("mixtral", "per-expert") else "mlp"
        assert (layer.layout, layer.experts, layer.hidden, layer.intermediate) == (kind, E, H, I)
        assert (layer.block, layer.module) == (f"model.layers.{layer.index}.{block}", f"model.layers.{layer.index}.mlp.experts")
        assert layer.router == tuple(f"{layer.block}.{name}" for name in router)
        assert len(layer.shared) == shared
    for index in dense:
        with pytest.raises(ValueError, match=f"layer {index} is not one MoE layer"):
            described.layer(index)
    # Every stored expert tensor, and nothing else, belongs to the experts.
    assert described.tensors == {name for name in _model(moe_fixtures, family, layout) if ".experts." in name}


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gpt_oss"])
def test_per_expert_and_fused_checkpoints_give_the_same_expert_weights(moe_fixtures: Path, family: str) -> None:
    per_expert, fused = _layout(moe_fixtures, family, "per-expert"), _layout(moe_fixtures, family, "fused")
    a, b = _model(moe_fixtures, family, "per-expert"), _model(moe_fixtures, family, "fused")
    for one, two in zip(per_expert.layers, fused.layers, strict=True):
        for expert in range(E):
            for projection in PROJECTIONS:
                w1, w2 = one.weight(expert, projection), two.weight(expert, projection)
                assert w1.shape == w2.shape == ((H, I) if projection == "down" else (I, H))
                assert torch.equal(w1.view(a[w1.tensor]), w2.view(b[w2.tensor])), (one.index, expert, projection)


def test_gpt_oss_views_compute_its_experts_forward(moe_fixtures: Path) -> None:
    layout, t = _layout(moe_fixtures, "gpt_oss", "fused"), _model(moe_fixtures, "gpt_oss", "fused")
    x, h = torch.randn(5, H, generator=torch.Generator().manual_seed(0)), torch.randn(5, I)
    for layer in layout.layers:
        gate_up, down = (t[f"{layer.block}.experts.{n}"] for n in ("gate_up_proj", "down_proj"))
        gate_up_bias, down_bias = (t[f"{layer.block}.experts.{n}_bias"] for n in ("gate_up_proj", "down_proj"))
        for e in range(E):
            fused = x @ gate_up[e] + gate_up_bias[e]  # GptOssExperts: gate = [..., ::2], up = [..., 1::2]
            for projection, want in (("gate", fused[:, ::2]), ("up", fused[:, 1::2])):
                w = layer.weight(e, projection)
                assert w.bias is not None
                torch.testing.assert_close(x @ w.view(t[w.tensor]).T + w.bias_view(t[w.bias]), want)
            w = layer.weight(e, "down")
            assert w.bias is not None
            torch.testing.assert_close(h @ w.view(t[w.tensor]).T + w.bias_view(t[w.bias]), h @ down[e] + down_bias[e])


def test_views_write_through_to_the_stored_tensor() -> None:
    layer = MoeLayer(0, "gpt_oss", "fused-transposed", "model.layers.0.mlp", "model.layers.0.mlp.experts",
                     E, H, I, (), ())
    stored = torch.zeros(E, H, 2 * I)
    layer.weight(2, "up").view(stored).add_(1.0)
    assert stored[2, :, 1::2].eq(1).all() and stored[2, :, 0::2].eq(0).all() and stored.sum() == H * I


def test_adapter_module_names_find_their_expert(moe_fixtures: Path) -> None:
    mixtral, qwen = _layout(moe_fixtures, "mixtral", "fused"), _layout(moe_fixtures, "qwen3_moe", "per-expert")
    found = mixtral.locate("model.layers.1.block_sparse_moe.experts.3.w3")  # transformers-4 name, fused base
    assert found is not None
    assert (found.tensor, found.expert, found.outputs) == ("model.layers.1.mlp.experts.gate_up_proj", 3, (I, 2 * I, 1))
    found = qwen.locate("model.layers.0.mlp.experts.2.down_proj")
    assert found is not None and (found.tensor, found.expert) == ("model.layers.0.mlp.experts.2.down_proj.weight", None)
    assert qwen.locate("model.layers.0.mlp.experts.4.down_proj") is None  # no such expert
    assert qwen.locate("model.layers.0.mlp.experts.2.w2") is None  # Mixtral's name
    assert qwen.locate("model.layers.0.self_attn.q_proj") is None
    layer = mixtral.layer_of("model.layers.1.mlp.experts.base_layer")
    assert layer is not None and layer.index == 1
    assert mixtral.layer_of("model.layers.2.mlp.experts") is None


def test_quantised_weights_companions_are_left_to_their_format(moe_fixtures: Path) -> None:
    config, shapes = _qwen_per_expert(moe_fixtures)
    scales = {name.replace(".weight", ".weight_scale_inv"): (1, 1) for name in shapes if ".experts." in name}
    layout = describe_experts(config, {**shapes, **scales})  # block FP8 (DeepSeek-V3, Qwen3-FP8) keeps per-expert keys
    assert layout is not None and layout.tensors == {name for name in shapes if ".experts." in name}


def test_models_without_experts_have_no_layout() -> None:
    assert describe_experts({"model_type": "llama"}, {"model.layers.0.mlp.gate_proj.weight": (8, 4)}) is None


# --- target_parameters adapters: PEFT's merge is the oracle ------------------------------------


@pytest.mark.parametrize("adapter", TP_ADAPTERS)
@pytest.mark.parametrize(("family", "layout"), CASES)
def test_target_parameters_merge_equals_peft(moe_fixtures: Path, family: str, layout: str, adapter: str) -> None:
    base_layout, base = _layout(moe_fixtures, family, layout), _model(moe_fixtures, family, layout)
    oracle_layout = _layout(moe_fixtures, family, f"oracles/{adapter}")
    oracle = _model(moe_fixtures, family, f"oracles/{adapter}")
    config, tensors = _adapter(moe_fixtures, family, adapter)
    settings = AdapterSettings.from_config(config, source=adapter)
    groups = _expert_groups(base_layout, tensors)
    assert len(groups) == len(base_layout.layers)
    changed = set()
    for module, (layer, shapes) in groups.items():
        plans = plan_param_loras(module, shapes, layer=layer, settings=settings,
                                 target_parameters=config["target_parameters"], peft_version=config["peft_version"])
        assert [p.param for p in plans] == (["down_proj"] if adapter == "tp-down" else ["gate_up_proj", "down_proj"])
        for plan in plans:
            lora_a, lora_b = tensors[plan.a_key], tensors[plan.b_key]
            for e in range(E):
                for projection, delta in plan.projection_deltas(lora_a, lora_b, e).items():
                    ours, want = layer.weight(e, projection), oracle_layout.layer(layer.index).weight(e, projection)
                    merged = ours.view(base[ours.tensor]) + delta
                    assert torch.equal(merged, want.view(oracle[want.tensor])), (module, plan.param, e, projection)
                    changed.add((layer.index, e, projection))
    # What the adapter leaves alone, PEFT left alone too.
    for layer, merged_layer in zip(base_layout.layers, oracle_layout.layers, strict=True):
        for e in range(E):
            for projection in PROJECTIONS:
                if (layer.index, e, projection) not in changed:
                    ours, want = layer.weight(e, projection), merged_layer.weight(e, projection)
                    assert torch.equal(ours.view(base[ours.tensor]), want.view(oracle[want.tensor]))
    assert len(changed) == len(base_layout.layers) * E * (1 if adapter == "tp-down" else 3)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_projection_factors_are_exact_per_expert_loras(moe_fixtures: Path, family: str) -> None:
    """A target_parameters LoRA split into per-expert, per-projection LoRAs gives the same deltas."""
    config, tensors = _adapter(moe_fixtures, family, "tp-pattern")
    layout = _layout(moe_fixtures, family, "fused")
    settings = AdapterSettings.from_config(config, source="tp-pattern")
    for module, (layer, shapes) in _expert_groups(layout, tensors).items():
        for plan in plan_param_loras(module, shapes, layer=layer, settings=settings, target_parameters=BOTH):
            a, b = tensors[plan.a_key], tensors[plan.b_key]
            for e in range(E):
                factors, deltas = plan.projection_factors(a, b, e), plan.projection_deltas(a, b, e)
                assert factors.keys() == deltas.keys() == set(plan.projections)
                for projection, (a_p, b_p) in factors.items():
                    assert a_p.shape == (plan.rank, plan.in_features)
                    assert torch.equal(linear_delta(a_p, b_p, plan.scaling), deltas[projection])


def test_rank_pattern_and_rslora_reach_each_parameter(moe_fixtures: Path) -> None:
    config, tensors = _adapter(moe_fixtures, "qwen3_moe", "tp-pattern")
    layout = _layout(moe_fixtures, "qwen3_moe", "fused")
    settings = AdapterSettings.from_config(config, source="tp-pattern")
    found = {}
    for module, (layer, shapes) in _expert_groups(layout, tensors).items():
        for plan in plan_param_loras(module, shapes, layer=layer, settings=settings,
                                     target_parameters=config["target_parameters"]):
            found[(layer.index, plan.param)] = (plan.rank, plan.scaling)
    # rank_pattern {"layers.1.mlp.experts.gate_up_proj": 3, "down_proj": 1}, alpha_pattern {"gate_up_proj": 5}, rsLoRA
    assert found == {(0, "gate_up_proj"): (2, 5 / 2 ** 0.5), (0, "down_proj"): (1, 8.0),
                     (1, "gate_up_proj"): (3, 5 / 3 ** 0.5), (1, "down_proj"): (1, 8.0)}


def test_peft_merges_bf16_experts_with_two_roundings(moe_fixtures: Path) -> None:
    """PEFT adds bf16(delta) to a bf16 weight: two roundings, where the float64 formula rounds once."""
    layout, base = _layout(moe_fixtures, "qwen3_moe", "bf16"), _model(moe_fixtures, "qwen3_moe", "bf16")
    oracle = _model(moe_fixtures, "qwen3_moe", "oracles/tp-bf16")
    fused = _layout(moe_fixtures, "qwen3_moe", "oracles/tp-bf16")
    config, tensors = _adapter(moe_fixtures, "qwen3_moe", "tp")
    settings = AdapterSettings.from_config(config, source="tp")
    differ = total = 0
    for module, (layer, shapes) in _expert_groups(layout, tensors).items():
        merged_layer = fused.layer(layer.index)
        for plan in plan_param_loras(module, shapes, layer=layer, settings=settings, target_parameters=config["target_parameters"]):
            a, b = tensors[plan.a_key], tensors[plan.b_key]
            for e in range(E):
                for projection, delta in plan.projection_deltas(a, b, e).items():
                    w, m = layer.weight(e, projection), merged_layer.weight(e, projection)
                    weight, peft = w.view(base[w.tensor]), m.view(oracle[m.tensor])
                    assert torch.equal(peft, weight + delta.to(torch.bfloat16))
                    a_e, b_e = expert_factors(a, b, e, experts=E)
                    b_rows = dict(zip(("gate", "up"), split_gate_up(b_e, interleaved=False))).get(projection, b_e)
                    once = (weight.double() + plan.scaling * (b_rows.double() @ a_e.double())).to(torch.bfloat16)
                    differ += int((peft != once).sum())
                    total += peft.numel()
    assert 0.05 * total < differ < 0.5 * total  # measured: 5460 of 18432 (30%)


# --- target_modules adapters on per-expert Linears ----------------------------------------------

# family -> PEFT 0.21's treatment of a transformers-4 per-expert adapter: which module kinds it drops.
DROPPED = {"deepseek_v3": ("dense", "shared"), "qwen2_moe": ("experts",)}


@pytest.mark.parametrize(("family", "layout"), [case for case in CASES if case[0] != "gpt_oss"])
def test_per_expert_adapter_merge(moe_fixtures: Path, family: str, layout: str) -> None:
    base_layout, base = _layout(moe_fixtures, family, layout), _model(moe_fixtures, family, layout)
    oracle_layout, oracle = _layout(moe_fixtures, family, "oracles/per-expert"), _model(moe_fixtures, family, "oracles/per-expert")
    config, tensors = _adapter(moe_fixtures, family, "per-expert")
    settings = AdapterSettings.from_config(config, source="per-expert")
    modules = sorted({split[0] for key in tensors if (split := split_adapter_key(key))})
    kinds = {"experts": 0, "dense": 0, "shared": 0, "attention": 0}
    for module in modules:
        a, b = tensors[f"base_model.model.{module}.lora_A.weight"], tensors[f"base_model.model.{module}.lora_B.weight"]
        delta = linear_delta(a, b, settings.module_scaling(module, a.shape[0]))
        expert = base_layout.locate(module)
        if expert is not None:
            kind = "experts"
            weight = expert.view(base[expert.tensor])
            at = oracle_layout.locate(module)
            assert at is not None
            peft = at.view(oracle[at.tensor])
        else:
            kind = "shared" if ".shared_expert" in module else "dense" if ".mlp." in module else "attention"
            weight, peft = base[f"{module}.weight"], oracle[f"{module}.weight"]
        kinds[kind] += 1
        merged = weight + delta
        if kind in DROPPED.get(family, ()):
            assert torch.equal(peft, weight), module  # PEFT 0.21 dropped this LoRA, silently
            # Ours is the formula: within one float32 rounding of the float64 result rounded once.
            once = _once(weight, a, b, settings.module_scaling(module, a.shape[0]))
            torch.testing.assert_close(merged, once, rtol=0, atol=float(torch.finfo(torch.float32).eps * once.abs().max()))
            assert not torch.equal(merged, weight)
        else:
            assert torch.equal(merged, peft), module
    layers = len(base_layout.layers)
    assert kinds["experts"] == layers * E * 3
    assert kinds["dense"] == (3 if family == "deepseek_v3" else 0)
    assert kinds["shared"] == {"deepseek_v3": 3, "qwen2_moe": 3 * layers}.get(family, 0)


# --- the reverse direction: per-expert LoRAs as target_parameters tensors ----------------------


def test_stack_experts_inverts_expert_factors() -> None:
    g = torch.Generator().manual_seed(0)
    lora_a, lora_b = torch.randn(E * 3, H, generator=g), torch.randn(2 * I, E * 3, generator=g)
    factors = [expert_factors(lora_a, lora_b, e, experts=E) for e in range(E)]
    a, b = stack_experts(factors)
    assert torch.equal(a, lora_a) and torch.equal(b, lora_b)
    # B's column k*E + e is expert e's k-th: rank-major, where A's rows are expert-major.
    assert torch.equal(factors[1][1][:, 2], lora_b[:, 2 * E + 1]) and torch.equal(factors[1][0][2], lora_a[3 + 2])
    with pytest.raises(AdapterToolError, match="one rank for all experts"):
        stack_experts([factors[0], (factors[1][0][:2], factors[1][1][:, :2])])


@pytest.mark.parametrize("interleaved", [False, True])
def test_fuse_gate_up_gives_both_deltas_exactly(interleaved: bool) -> None:
    g = torch.Generator().manual_seed(1)
    gate = (torch.randn(2, H, generator=g), torch.randn(I, 2, generator=g))
    up = (torch.randn(3, H, generator=g), torch.randn(I, 3, generator=g))
    a, b = fuse_gate_up(gate, up, interleaved=interleaved)
    assert torch.equal(a, torch.cat([gate[0], up[0]]))
    gate_rows, up_rows = (b[0::2], b[1::2]) if interleaved else (b[:I], b[I:])  # gpt-oss: gate outputs are the even ones
    assert torch.equal(gate_rows, torch.cat([gate[1], torch.zeros(I, 3)], dim=1))
    assert torch.equal(up_rows, torch.cat([torch.zeros(I, 2), up[1]], dim=1))
    delta = linear_delta(a, b, 0.5)
    gate_delta, up_delta = split_gate_up(delta, interleaved=interleaved)
    assert torch.equal(gate_delta, linear_delta(*gate, 0.5)) and torch.equal(up_delta, linear_delta(*up, 0.5))


# PEFT 0.21 says the rank/alpha_pattern keys "did not match any targeted module", and applies them.
@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_peft_loads_per_expert_loras_stacked_as_target_parameters(moe_fixtures: Path, tmp_path: Path) -> None:
    """The per-expert adapter, stacked by us into target_parameters form, merges in PEFT to the very
    bits of PEFT's own conversion of it (the per-expert oracle)."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    family = "qwen3_moe"
    layout = _layout(moe_fixtures, family, "per-expert")
    config, tensors = _adapter(moe_fixtures, family, "per-expert")
    out: dict[str, torch.Tensor] = {}
    for layer in layout.layers:
        factors: dict[str, list] = {"gate_up_proj": [], "down_proj": []}
        for e in range(E):
            lora = {p: tuple(tensors[f"base_model.model.{layer.block}.experts.{e}.{p}_proj.lora_{x}.weight"] for x in "AB")
                    for p in PROJECTIONS}
            factors["gate_up_proj"].append(fuse_gate_up(lora["gate"], lora["up"], interleaved=layer.interleaved))
            factors["down_proj"].append(lora["down"])
        prefix = f"base_model.model.{layer.module}"
        for key, param in ((f"{prefix}.base_layer", "gate_up_proj"), (prefix, "down_proj")):
            out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = stack_experts(factors[param])
    out.update({k: v for k, v in tensors.items() if "self_attn" in k})
    peft.LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj"], target_parameters=BOTH,  # gate_up: rank 2r, scaling alpha/r
                    rank_pattern={"gate_up_proj": 4}, alpha_pattern={"gate_up_proj": 16}).save_pretrained(tmp_path)
    save_file(out, tmp_path / "adapter_model.safetensors")
    model = transformers.AutoModelForCausalLM.from_pretrained(moe_fixtures / family / "fused", dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, tmp_path).merge_and_unload().state_dict()
    oracle = _model(moe_fixtures, family, "oracles/per-expert")
    assert set(merged) == set(oracle)
    for name, value in oracle.items():
        assert torch.equal(merged[name], value), name


# --- bad inputs ---------------------------------------------------------------------------------


def _qwen_fused(moe_fixtures: Path) -> tuple[dict, dict[str, tuple[int, ...]]]:
    config = _config(moe_fixtures / "qwen3_moe" / "fused" / "config.json")
    return config, {k: tuple(v.shape) for k, v in _model(moe_fixtures, "qwen3_moe", "fused").items()}


def _qwen_per_expert(moe_fixtures: Path) -> tuple[dict, dict[str, tuple[int, ...]]]:
    config = _config(moe_fixtures / "qwen3_moe" / "per-expert" / "config.json")
    return config, {k: tuple(v.shape) for k, v in _model(moe_fixtures, "qwen3_moe", "per-expert").items()}


def test_fused_tensor_with_another_expert_count_is_refused(moe_fixtures: Path) -> None:
    config, shapes = _qwen_fused(moe_fixtures)
    shapes["model.layers.1.mlp.experts.down_proj"] = (3, H, I)
    with pytest.raises(AdapterToolError, match=r"model\.layers\.1\.mlp\.experts\.down_proj holds 3 experts, but .* says 4 experts"):
        describe_experts(config, shapes)


def test_fused_tensor_that_disagrees_with_the_config_is_refused(moe_fixtures: Path) -> None:
    config, shapes = _qwen_fused(moe_fixtures)
    with pytest.raises(AdapterToolError, match=r"layers\.0\.mlp\.experts\.down_proj has shape \[4, 32, 24\], expected \[4, 32, 16\]"):
        describe_experts({**config, "moe_intermediate_size": 16}, shapes)
    shapes["model.layers.0.mlp.experts.gate_up_proj"] = (E, H, 2 * I)  # gpt-oss's orientation on a Qwen model
    with pytest.raises(AdapterToolError, match=r"layers\.0\.mlp\.experts\.gate_up_proj has shape \[4, 32, 48\]"):
        describe_experts(config, shapes)


def test_per_expert_checkpoint_with_another_expert_count_is_refused(moe_fixtures: Path) -> None:
    config, shapes = _qwen_per_expert(moe_fixtures)
    with pytest.raises(AdapterToolError, match=r"experts \[4, 5, 6, 7\] have no gate_proj\.weight, but .* says 8 experts"):
        describe_experts({**config, "num_local_experts": 8}, shapes)
    with pytest.raises(AdapterToolError, match=r"experts\.2\.\w+_proj\.weight is expert 2, but .* says 2 experts"):
        describe_experts({**config, "num_local_experts": 2}, shapes)
    del shapes["model.layers.0.mlp.experts.3.up_proj.weight"]
    with pytest.raises(AdapterToolError, match=r"model\.layers\.0\.mlp\.experts: experts \[3\] have no up_proj\.weight"):
        describe_experts(config, shapes)


def test_router_for_another_expert_count_is_refused(moe_fixtures: Path) -> None:
    config, shapes = _qwen_fused(moe_fixtures)
    shapes["model.layers.1.mlp.gate.weight"] = (8, H)
    with pytest.raises(AdapterToolError, match=r"router model\.layers\.1\.mlp\.gate\.weight has 8 rows"):
        describe_experts(config, shapes)


def test_unknown_or_mixed_expert_tensors_are_refused(moe_fixtures: Path) -> None:
    config, shapes = _qwen_fused(moe_fixtures)
    with pytest.raises(AdapterToolError, match="model_type llama4x is not a known mixture-of-experts family"):
        describe_experts({**config, "model_type": "llama4x"}, shapes)
    with pytest.raises(AdapterToolError, match="mixes two layouts"):
        describe_experts(config, {**shapes, "model.layers.0.mlp.experts.0.gate_proj.weight": (I, H)})
    with pytest.raises(AdapterToolError, match=r"experts\.0\.w1\.weight is not a qwen2_moe expert weight"):
        describe_experts(config, {**_qwen_per_expert(moe_fixtures)[1], "model.layers.0.mlp.experts.0.w1.weight": (I, H)})
    with pytest.raises(AdapterToolError, match="MXFP4"):
        describe_experts(config, {**shapes, "model.layers.0.mlp.experts.gate_up_proj_blocks": (E, 2 * I, 1, 16)})
    with pytest.raises(AdapterToolError, match="lacks n_routed_experts or num_local_experts or num_experts"):
        describe_experts({k: v for k, v in config.items() if k != "num_local_experts"}, shapes)


def _tp_plan(moe_fixtures: Path, shapes: dict, target_parameters: list[str] | None, *, family: str = "qwen3_moe",
             peft_version: str | None = None, r: int = 2) -> tuple:
    layer = _layout(moe_fixtures, family, "fused").layers[0]
    settings = AdapterSettings.from_config({"peft_type": "LORA", "r": r, "lora_alpha": 8}, source="test")
    return plan_param_loras(layer.module, shapes, layer=layer, settings=settings, target_parameters=target_parameters,
                            peft_version=peft_version)


KEY = "base_model.model.model.layers.0.mlp.experts"


def _keys(*, inner: tuple | None, outer: tuple | None) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for prefix, pair in ((f"{KEY}.base_layer", inner), (KEY, outer)):
        if pair is not None:
            shapes[f"{prefix}.lora_A.weight"], shapes[f"{prefix}.lora_B.weight"] = pair
    return shapes


GATE_UP = ((E * 2, H), (2 * I, E * 2))
DOWN = ((E * 2, I), (H, E * 2))


def test_one_targeted_parameter_is_resolved_by_target_parameters_and_shapes(moe_fixtures: Path) -> None:
    (plan,) = _tp_plan(moe_fixtures, _keys(inner=None, outer=GATE_UP), ["gate_up_proj"])
    assert (plan.param, plan.a_key, plan.rank, plan.in_features, plan.out_features) == (
        "gate_up_proj", f"{KEY}.lora_A.weight", 2, H, 2 * I)
    with pytest.raises(AdapterToolError, match="do not fit model.layers.0.mlp.experts.down_proj"):
        _tp_plan(moe_fixtures, _keys(inner=None, outer=GATE_UP), ["mlp.experts.down_proj"])


def test_ambiguous_keys_without_target_parameters_are_refused(moe_fixtures: Path) -> None:
    for target_parameters in (None, []):
        with pytest.raises(AdapterToolError, match="no target_parameters, so which of gate_up_proj, down_proj it adapts is unknown"):
            _tp_plan(moe_fixtures, _keys(inner=None, outer=DOWN), target_parameters)


def test_target_parameters_the_base_lacks_are_refused(moe_fixtures: Path) -> None:
    with pytest.raises(AdapterToolError, match=r"target_parameters \['mlp.experts.w13'\] names no parameter of model.layers.0"):
        _tp_plan(moe_fixtures, _keys(inner=None, outer=GATE_UP), ["mlp.experts.w13"])
    with pytest.raises(AdapterToolError, match="at 2 nesting depths but target_parameters names 1"):
        _tp_plan(moe_fixtures, _keys(inner=GATE_UP, outer=DOWN), ["mlp.experts.down_proj"])


def test_nesting_that_the_shapes_contradict_is_refused(moe_fixtures: Path) -> None:
    with pytest.raises(AdapterToolError, match="nesting makes it the LoRA of down_proj, but its shapes fit gate_up_proj"):
        _tp_plan(moe_fixtures, _keys(inner=DOWN, outer=GATE_UP), BOTH)


def test_adapter_for_another_expert_count_is_refused(moe_fixtures: Path) -> None:
    eight = ((16, H), (2 * I, 16))
    with pytest.raises(AdapterToolError, match=r"16 rows, which at rank 2 \(adapter_config.json\) is 8 experts, but .* has 4"):
        _tp_plan(moe_fixtures, _keys(inner=eight, outer=DOWN), BOTH)


def test_adapter_with_transposed_roles_from_peft_0_19_is_refused(moe_fixtures: Path) -> None:
    transposed_down = ((E * 2, H), (I, E * 2))  # A (E*r, out), B (in, E*r)
    with pytest.raises(AdapterToolError, match=r"roles that PEFT 0\.17-0\.19\.0 gave them by mistake.*PEFT >= 0\.19\.1"):
        _tp_plan(moe_fixtures, _keys(inner=GATE_UP, outer=transposed_down), BOTH)


def test_square_experts_fall_back_to_peft_version_for_transposed_roles(moe_fixtures: Path) -> None:
    layer = MoeLayer(0, "qwen2_moe", "fused", "model.layers.0.mlp", "model.layers.0.mlp.experts", E, H, H, (), ())
    settings = AdapterSettings.from_config({"peft_type": "LORA", "r": 2, "lora_alpha": 8}, source="test")
    shapes = _keys(inner=None, outer=((E * 2, H), (H, E * 2)))  # down_proj is (E, H, H): in == out

    def plan(version: str, interleaved: bool = False) -> tuple:
        target = replace(layer, family="gpt_oss", layout="fused-transposed") if interleaved else layer
        return plan_param_loras(layer.module, shapes, layer=target, settings=settings,
                                target_parameters=["down_proj"], peft_version=version)

    for version in ("0.17.0", "0.18.2", "0.19.0"):
        with pytest.raises(AdapterToolError, match=f"PEFT {version} gave them by mistake"):
            plan(version)
    assert plan("0.19.1")[0].param == plan("0.21.2")[0].param == "down_proj"
    assert plan("0.18.0", interleaved=True)  # 0.17-0.18 assumed gpt-oss's (E, in, out): right for it
    with pytest.raises(AdapterToolError, match="PEFT 0.19.0"):
        plan("0.19.0", interleaved=True)


def test_dora_and_lora_bias_on_experts_are_refused(moe_fixtures: Path) -> None:
    shapes = {**_keys(inner=None, outer=DOWN), f"{KEY}.lora_magnitude_vector": (H,)}
    with pytest.raises(AdapterToolError, match="supports neither DoRA nor lora_bias"):
        _tp_plan(moe_fixtures, shapes, ["down_proj"])


def test_expert_delta_is_the_documented_formula() -> None:
    g = torch.Generator().manual_seed(2)
    lora_a, lora_b = torch.randn(E * 2, H, generator=g), torch.randn(2 * I, E * 2, generator=g)
    for e in range(E):
        a_e = lora_a.reshape(E, 2, H)[e]
        b_e = lora_b.reshape(2 * I, 2, E)[:, :, e]
        assert torch.equal(expert_delta(lora_a, lora_b, e, experts=E, scaling=3.0), (b_e @ a_e) * 3.0)

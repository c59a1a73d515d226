"""combine against float64 oracles and PEFT 0.21.2: adapters made and saved by PEFT on one tiny Llama.

The oracle for every adapter's delta is PEFT itself: the base loaded in float64, the adapter merged
with merge_and_unload, minus the base. A combined adapter is checked by merging it with
adaptertool's merge (float32, compared with PEFT's bit for bit in tests/ops/test_merge.py) and
comparing with ``base + sum_i w_i delta_i`` in float64.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from adaptertool import AdapterToolError
from adaptertool.adapters.peft_keys import module_order
from adaptertool.cli import cli
from adaptertool.io import open_checkpoint
from adaptertool.ops.combine import CombineConfig, combine
from adaptertool.ops.examples import TINY
from adaptertool.ops.merge import MergeConfig, merge

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

LLAMA = {k: v for k, v in TINY.config(torch.float32).items() if k not in ("architectures", "torch_dtype")}
EPS32 = torch.finfo(torch.float32).eps

# name -> (PEFT config class, arguments); all on the same base.
ADAPTERS: dict[str, tuple[str, dict[str, Any]]] = {
    "a": ("LoraConfig", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "d": ("LoraConfig", dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"])),
    "b": ("LoraConfig", dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj"])),
    "c": ("LoraConfig", dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], rank_pattern={"up_proj": 2},
                             alpha_pattern={"layers.1.self_attn.q_proj": 3})),
    "ada": ("AdaLoraConfig", dict(init_r=6, target_r=4, lora_alpha=12, total_step=10, target_modules=["q_proj", "v_proj"])),
    "loha": ("LoHaConfig", dict(r=2, alpha=4, target_modules=["q_proj", "down_proj"])),
    "emb": ("LoraConfig", dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "gate_proj"])),
    "saved": ("LoraConfig", dict(r=2, lora_alpha=4, target_modules=["o_proj"], modules_to_save=["lm_head"])),
    "dora": ("LoraConfig", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"])),
    "ia3": ("IA3Config", dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])),
}


class Zoo:
    """A tiny float32 Llama and PEFT adapters for it, with float64 oracle deltas made on demand."""

    def __init__(self, root: Path) -> None:
        torch.manual_seed(0)
        self.base = root / "base"
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).save_pretrained(self.base)
        for index, (name, (config_class, kwargs)) in enumerate(ADAPTERS.items()):
            model = transformers.LlamaForCausalLM.from_pretrained(self.base)
            peft_model = peft.get_peft_model(model, getattr(peft, config_class)(**kwargs))
            _randomise(peft_model, seed=index)
            peft_model.save_pretrained(root / name)
        self.root = root
        self.weights = _read(self.base)

    def __getitem__(self, name: str) -> Path:
        return self.root / name

    @cache  # noqa: B019  (one Zoo per module; its oracles live as long)
    def delta(self, name: str) -> dict[str, torch.Tensor]:
        """PEFT's float64 merge of adapter ``name`` minus the base."""
        model = transformers.LlamaForCausalLM.from_pretrained(self.base, dtype=torch.float64)
        merged = peft.PeftModel.from_pretrained(model, self[name], autocast_adapter_dtype=False).merge_and_unload()
        return {k: v - self.weights[k].double() for k, v in merged.state_dict().items() if k in self.weights}

    def expected(self, chosen: list[tuple[str, float]]) -> dict[str, torch.Tensor]:
        """``base + sum_i w_i delta_i`` in float64."""
        return {k: w.double() + sum(weight * self.delta(n)[k] for n, weight in chosen) for k, w in self.weights.items()}


def _randomise(model: torch.nn.Module, *, seed: int) -> None:
    # PEFT initialises one factor to zero: make every adapter tensor look trained.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(k in name for k in ("lora_", "hada_")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1 + (1.0 if "magnitude" in name else 0.0))
            elif "ia3_l" in name:
                param.copy_(1 + torch.randn(param.shape, generator=generator) * 0.2)
            elif "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.01)


def _read(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ckpt:
        return {name: ckpt.read(name) for name in ckpt}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("zoo"))


def _combine(zoo: Zoo, out: Path, chosen: list[tuple[str, float]], **options: Any) -> Any:
    return combine(CombineConfig(adapters=tuple(zoo[n] for n, _ in chosen), weights=tuple(w for _, w in chosen),
                                 out=out, **options))


def _merged(zoo: Zoo, adapter: Path, out: Path) -> dict[str, torch.Tensor]:
    merge(MergeConfig(base=zoo.base, adapters=((adapter, 1.0),), out=out))
    return _read(out)


def _worst_ulps(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    """Largest error of any float32 tensor in ``got``, in float32 ulps of that tensor's largest value."""
    return max(((g.double() - expected[k]).abs().max() / (EPS32 * expected[k].abs().max())).item() for k, g in got.items())


# --- exact methods ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["cat", "linear"])
def test_exact_methods_give_the_weighted_sum_of_deltas(zoo: Zoo, tmp_path: Path, method: str) -> None:
    # Different ranks, alphas, rsLoRA, rank/alpha patterns, AdaLoRA, an embedding LoRA; overlapping
    # and disjoint targets; a negative weight.
    chosen = [("a", 0.7), ("b", -1.3), ("c", 0.5), ("ada", 0.4), ("emb", 0.9)]
    report = _combine(zoo, tmp_path / "comb", chosen, method=method)
    merged = _merged(zoo, tmp_path / "comb", tmp_path / "merged")
    assert _worst_ulps(merged, zoo.expected(chosen)) < 4  # float32 rounding of W + delta, no more
    q = next(m for m in report.modules if m.module == "model.layers.0.self_attn.q_proj")
    assert q.rank == 4 + 8 + 4 + 6 and q.inputs == 4 and report.rel_error == 0.0  # AdaLoRA saves init_r rows
    config = json.loads((tmp_path / "comb" / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["lora_alpha"] == config["r"]
    assert config["rank_pattern"] == {k: int(v) for k, v in config["alpha_pattern"].items()}
    # PEFT reads the combined adapter (full-path targets, patterns) and merges it to the same weights.
    model = transformers.LlamaForCausalLM.from_pretrained(zoo.base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(model, tmp_path / "comb")
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]  # else PEFT leaves layers as no-ops
    peft_merged = loaded.merge_and_unload().state_dict()
    for name, tensor in merged.items():
        assert torch.equal(tensor, peft_merged[name]), name


@pytest.mark.parametrize("weight", [0.7, -1.5])
def test_linear_of_one_adapter_matches_peft(zoo: Zoo, tmp_path: Path, weight: float) -> None:
    _combine(zoo, tmp_path / "comb", [("a", weight)], method="linear")
    model = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(zoo.base), zoo["a"], adapter_name="a")
    model.add_weighted_adapter(["a"], [weight], "comb", combination_type="linear")
    ours = load_file(tmp_path / "comb" / "adapter_model.safetensors")
    theirs = {k.replace(".comb", ""): v for k, v in model.state_dict().items() if ".comb." in k}
    assert set(ours) == set(theirs)
    for key, tensor in ours.items():
        assert torch.equal(tensor, theirs[key]), key  # the same float32 factors, bit for bit
    model.set_adapter("comb")
    peft_merged = model.merge_and_unload().state_dict()
    for name, tensor in _merged(zoo, tmp_path / "comb", tmp_path / "merged").items():
        assert torch.equal(tensor, peft_merged[name]), name


def test_linear_of_several_adapters_has_no_cross_terms_unlike_peft(zoo: Zoo, tmp_path: Path) -> None:
    chosen = [("a", 0.6), ("d", 0.4)]
    _combine(zoo, tmp_path / "comb", chosen, method="linear")
    ours = _merged(zoo, tmp_path / "comb", tmp_path / "merged")
    model = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(zoo.base), zoo["a"], adapter_name="a")
    model.load_adapter(zoo["d"], adapter_name="d")
    model.add_weighted_adapter(["a", "d"], [0.6, 0.4], "comb", combination_type="linear")
    model.set_adapter("comb")
    theirs = model.merge_and_unload().state_dict()
    expected = zoo.expected(chosen)
    name = "model.layers.0.self_attn.q_proj.weight"  # adapted by both
    change = (expected[name] - zoo.weights[name].double()).norm()
    ours_error = (ours[name].double() - expected[name]).norm() / change
    peft_error = (theirs[name].double() - expected[name]).norm() / change
    # PEFT combines A and B separately: (sum sqrt(w s) B_i)(sum sqrt(w s) A_i) adds B_i A_j for i != j.
    assert ours_error < 1e-6 and peft_error > 0.3, (ours_error, peft_error)


def test_rslora_input_is_not_inflated_unlike_peft(zoo: Zoo, tmp_path: Path) -> None:
    _combine(zoo, tmp_path / "comb", [("b", 1.0)], method="linear")
    ours = _merged(zoo, tmp_path / "comb", tmp_path / "merged")
    model = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(zoo.base), zoo["b"], adapter_name="b")
    model.add_weighted_adapter(["b"], [1.0], "comb", combination_type="linear")
    model.set_adapter("comb")
    theirs = model.merge_and_unload().state_dict()
    name = "model.layers.1.self_attn.k_proj.weight"
    true_delta = zoo.delta("b")[name]
    # PEFT 0.21.2's combined adapter keeps use_rslora with r == lora_alpha == 8: scaling sqrt(8), not 1.
    ratio = (theirs[name].double() - zoo.weights[name].double()).norm() / true_delta.norm()
    assert abs(ratio - 8**0.5) < 1e-4
    assert _worst_ulps(ours, zoo.expected([("b", 1.0)])) < 4


# --- SVD methods ------------------------------------------------------------------------------------


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_svd_at_full_rank_is_the_weighted_sum(zoo: Zoo, tmp_path: Path, svd: str) -> None:
    chosen = [("a", 0.7), ("c", 0.5), ("loha", -0.6)]  # q_proj: rank 4 + 4 + 2^2 = 12 < the break-even 15
    report = _combine(zoo, tmp_path / "comb", chosen, method="svd", rank=12, svd=svd)
    assert report.rel_error < 1e-5
    merged = _merged(zoo, tmp_path / "comb", tmp_path / "merged")
    assert _worst_ulps(merged, zoo.expected(chosen)) < 32  # plus the float32 SVD's own rounding (about 10)


def test_svd_at_rank_r_is_the_optimal_approximation(zoo: Zoo, tmp_path: Path) -> None:
    chosen = [("a", 0.7), ("b", -1.3), ("c", 0.5)]
    report = _combine(zoo, tmp_path / "comb", chosen, method="svd", rank=3, svd="exact")
    merged = _merged(zoo, tmp_path / "comb", tmp_path / "merged")
    expected = zoo.expected(chosen)
    for module in report.modules:
        name = f"{module.module}.weight"
        full = expected[name] - zoo.weights[name].double()
        u, s, vh = torch.linalg.svd(full, full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]  # Eckart-Young, in float64
        got = merged[name].double() - zoo.weights[name].double()
        torch.testing.assert_close(got, best, rtol=0, atol=2e-5 * best.abs().max().item())
        assert module.rank == min(3, int((s > 1e-6 * s[0]).sum()))  # a single rank-2 input stays rank 2
        assert abs(module.rel_error - (s[3:].norm() / s.norm()).item()) < 1e-4


def test_svd_randomized_is_near_optimal(zoo: Zoo, tmp_path: Path) -> None:
    chosen = [("a", 0.7), ("b", -1.3), ("c", 0.5)]
    exact = _combine(zoo, tmp_path / "exact", chosen, method="svd", rank=3, svd="exact")
    fast = _combine(zoo, tmp_path / "fast", chosen, method="svd", rank=3, seed=5)
    for e, f in zip(exact.modules, fast.modules):
        assert f.rel_error <= e.rel_error * 1.01 + 1e-6, e.module


def test_svd_matches_peft_0_21_which_no_longer_scales_twice(zoo: Zoo, tmp_path: Path) -> None:
    chosen = [("a", 0.6), ("d", 0.4)]  # scalings 2 and 4
    _combine(zoo, tmp_path / "comb", chosen, method="svd", rank=8, svd="exact")
    ours = _merged(zoo, tmp_path / "comb", tmp_path / "merged")
    model = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(zoo.base), zoo["a"], adapter_name="a")
    model.load_adapter(zoo["d"], adapter_name="d")
    model.add_weighted_adapter(["a", "d"], [0.6, 0.4], "comb", combination_type="svd", svd_rank=8)
    model.set_adapter("comb")
    theirs = model.merge_and_unload().state_dict()
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=1e-6)
    # PEFT before huggingface/peft#3111 weighted the already scaled deltas by w_i * s_i: every
    # adapter's contribution came out s_i times too large (here 2x and 4x).
    name = "model.layers.0.self_attn.q_proj.weight"
    doubled = sum(w * s * zoo.delta(n)[name] for (n, w), s in zip(chosen, (2.0, 4.0)))
    right = sum(w * zoo.delta(n)[name] for n, w in chosen)
    assert (doubled - right).norm() / right.norm() > 1.0
    assert (ours[name].double() - zoo.weights[name].double() - right).norm() / right.norm() < 1e-5


def _ties_oracle(taus: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES in float64, vectorised over a stack (the maths test walks entries one by one instead)."""
    stacked = torch.stack([t.double() for t in taus])
    k = max(1, int(density * taus[0].numel() + 0.5))
    order = stacked.abs().reshape(len(taus), -1).argsort(dim=1, descending=True)[:, :k]
    mask = torch.zeros_like(stacked.reshape(len(taus), -1)).scatter_(1, order, 1.0).reshape(stacked.shape)
    terms = stacked * mask * torch.tensor(weights, dtype=torch.float64).view(-1, 1, 1)
    elected = torch.where(terms.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(terms) == elected).double()
    return (terms * agree).sum(0) / agree.sum(0).clamp_min(1.0)


def test_ties_matches_a_float64_oracle(zoo: Zoo, tmp_path: Path) -> None:
    chosen = [("a", 1.0), ("c", -0.5), ("d", 0.8)]
    report = _combine(zoo, tmp_path / "comb", chosen, method="ties", density=0.3, rank=8, svd="exact")
    merged = _merged(zoo, tmp_path / "comb", tmp_path / "merged")
    name = "model.layers.0.self_attn.q_proj.weight"
    combined = _ties_oracle([zoo.delta(n)[name] for n, _ in chosen], [w for _, w in chosen], 0.3)
    u, s, vh = torch.linalg.svd(combined, full_matrices=False)
    best = (u[:, :8] * s[:8]) @ vh[:8]
    got = merged[name].double() - zoo.weights[name].double()
    torch.testing.assert_close(got, best, rtol=0, atol=2e-5 * best.abs().max().item())
    module = next(m for m in report.modules if m.module == "model.layers.0.self_attn.q_proj")
    assert abs(module.rel_error - (s[8:].norm() / s.norm()).item()) < 1e-4


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_is_reproducible_by_seed(zoo: Zoo, tmp_path: Path, method: str) -> None:
    chosen = [("a", 1.0), ("d", 0.5)]
    files = []
    for i, seed in enumerate((1, 1, 2)):
        _combine(zoo, tmp_path / f"out{i}", chosen, method=method, density=0.5, seed=seed)
        files.append((tmp_path / f"out{i}" / "adapter_model.safetensors").read_bytes())
    assert files[0] == files[1] and files[0] != files[2]


def test_conv1d_fan_in_fan_out_and_lora_bias(tmp_path: Path) -> None:
    # GPT-2 stores Conv1D weights as (in, out); one adapter also trains biases (lora_B.bias).
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    settings = {"g1": {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj"], "lora_bias": True},
                "g2": {"r": 2, "lora_alpha": 6, "use_rslora": True, "target_modules": ["c_attn", "c_fc"]}}
    weights = _read(tmp_path / "base")
    deltas = {}
    for index, (name, kwargs) in enumerate(settings.items()):
        model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
        peft_model = peft.get_peft_model(model, peft.LoraConfig(fan_in_fan_out=True, **kwargs))
        _randomise(peft_model, seed=index)
        peft_model.save_pretrained(tmp_path / name)
        exact = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base", dtype=torch.float64)
        merged = peft.PeftModel.from_pretrained(exact, tmp_path / name, autocast_adapter_dtype=False).merge_and_unload()
        deltas[name] = {k: v - weights[k].double() for k, v in merged.state_dict().items() if k in weights}
    chosen = [("g1", 0.5), ("g2", -1.2)]
    expected = {k: w.double() + sum(x * deltas[n][k] for n, x in chosen) for k, w in weights.items()}
    for method, options in (("cat", {}), ("svd", {"rank": 6, "svd": "exact"})):
        out = tmp_path / method
        combine(CombineConfig(adapters=(tmp_path / "g1", tmp_path / "g2"), weights=(0.5, -1.2), out=out, method=method, **options))
        assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
        merge(MergeConfig(base=tmp_path / "base", adapters=((out, 1.0),), out=tmp_path / f"merged-{method}"))
        merged = _read(tmp_path / f"merged-{method}")
        assert _worst_ulps(merged, expected) < (4 if method == "cat" else 32), method
        assert not torch.equal(merged["transformer.h.0.attn.c_attn.bias"], weights["transformer.h.0.attn.c_attn.bias"])


# --- whole tensors, notes ---------------------------------------------------------------------------


def _edited(zoo: Zoo, name: str, out: Path, *, config: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
            tensors: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None) -> Path:
    out.mkdir()
    original = json.loads((zoo[name] / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps(config(original) if config else original))
    weights = load_file(zoo[name] / "adapter_model.safetensors")
    save_file(tensors(weights) if tensors else weights, out / "adapter_model.safetensors")
    return out


def test_modules_to_save_are_copied_once(zoo: Zoo, tmp_path: Path) -> None:
    chosen = [("saved", 1.0), ("a", 0.5)]
    report = _combine(zoo, tmp_path / "comb", chosen, method="cat")
    assert report.modules_to_save == ["lm_head"]
    assert _worst_ulps(_merged(zoo, tmp_path / "comb", tmp_path / "merged"), zoo.expected(chosen)) < 4


def test_conflicting_modules_to_save_are_refused(zoo: Zoo, tmp_path: Path) -> None:
    other = _edited(zoo, "saved", tmp_path / "other", tensors=lambda w: {k: v * (1.5 if "lm_head" in k else 1.0) for k, v in w.items()})
    with pytest.raises(AdapterToolError, match=r"other: saved tensor base_model\.model\.lm_head\.weight differs from the one "
                                               r"in .*saved; a whole-tensor copy \(modules_to_save\) cannot be weighted"):
        combine(CombineConfig(adapters=(zoo["saved"], other), out=tmp_path / "out"))
    # Weight 0 drops an adapter, saved copies included.
    report = combine(CombineConfig(adapters=(zoo["saved"], other), weights=(1.0, 0.0), out=tmp_path / "out"))
    assert any("weight 0" in note for note in report.notes)


def test_different_base_names_with_equal_shapes_is_a_note(zoo: Zoo, tmp_path: Path) -> None:
    named = _edited(zoo, "a", tmp_path / "named", config=lambda c: {**c, "base_model_name_or_path": "org/base"})
    renamed = _edited(zoo, "d", tmp_path / "renamed", config=lambda c: {**c, "base_model_name_or_path": "org/other"})
    report = combine(CombineConfig(adapters=(named, renamed), out=tmp_path / "out"))
    assert any("different base models (org/base, org/other)" in note for note in report.notes)
    # An adapter that names no base cannot disagree with one that does.
    unnamed = _edited(zoo, "a", tmp_path / "unnamed", config=lambda c: {**c, "base_model_name_or_path": None})
    report = combine(CombineConfig(adapters=(unnamed, renamed), out=tmp_path / "out2"))
    assert not any("different base models" in note for note in report.notes)


# --- bad inputs: one-line errors, exit code 1, nothing written -------------------------------------


def _cli(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def _refused(match: str, *args: str | Path) -> None:
    code, out, err = _cli("combine", *args)
    assert code == 1 and out == "", (code, out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert match in err, err


def test_adapters_for_different_shapes(zoo: Zoo, tmp_path: Path) -> None:
    wider = _edited(zoo, "d", tmp_path / "wider", tensors=lambda w: {k: torch.cat([v, v], -1) if "lora_A" in k else v for k, v in w.items()})
    _refused("wider: module model.layers.0.self_attn.q_proj implies weight shape [32, 64] but", zoo["a"], wider,
             tmp_path / "out")
    _refused("implies [32, 32]; the adapters were made for different base models", zoo["a"], wider, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("name", "message"), [
    ("dora", "module model.layers.0.self_attn.q_proj is a DoRA update, which rescales weights"),
    ("ia3", "is a IA3 update, which rescales weights instead of adding a delta"),
])
def test_non_additive_adapters_are_refused(zoo: Zoo, tmp_path: Path, name: str, message: str) -> None:
    _refused(message, zoo["a"], zoo[name], tmp_path / "out", "--method", "svd")


def test_loha_cannot_be_stacked(zoo: Zoo, tmp_path: Path) -> None:
    _refused("is LOHA, which has no LoRA factors to stack for --method cat; use --method svd", zoo["loha"],
             tmp_path / "out", "--method", "cat")


@pytest.mark.parametrize(("options", "message"), [
    (["--weights", "0.5"], "1 weights for 2 adapters; give one weight per adapter"),
    (["--weights", "0.5,x"], "--weights must be comma-separated numbers"),
    (["--method", "ties"], "--method ties needs --density"),
    (["--method", "ties", "--density", "0"], "--density must lie in (0, 1], e.g. 0.5, not 0.0"),
    (["--method", "dare_linear", "--density", "1.5"], "--density must lie in (0, 1], e.g. 0.5, not 1.5"),
    (["--density", "0.5"], "--density applies to ties, dare_* and magnitude_prune, not --method linear"),
    (["--method", "cat", "--rank", "4"], "--method cat is exact and its rank is the sum of the inputs' ranks"),
    (["--method", "svd", "--rank", "0"], "--rank must be a positive integer, not 0"),
    (["--method", "svd", "--majority-sign", "frequency"], "--majority-sign applies to ties and dare_ties"),
])
def test_bad_options(zoo: Zoo, tmp_path: Path, options: list[str], message: str) -> None:
    _refused(message, zoo["a"], zoo["d"], tmp_path / "out", *options)


def test_weights_both_ways_and_all_zero(zoo: Zoo, tmp_path: Path) -> None:
    _refused("give weights either as ADAPTER:WEIGHT or with --weights, not both", f"{zoo['a']}:0.5", zoo["d"],
             tmp_path / "out", "--weights", "1,2")
    _refused("every combined update is zero; nothing to write", f"{zoo['a']}:0", f"{zoo['d']}:0", tmp_path / "out")


def test_cli_json_and_weights(zoo: Zoo, tmp_path: Path) -> None:
    code, out, err = _cli("combine", f"{zoo['a']}:0.7", f"{zoo['d']}:-0.3", tmp_path / "out", "--method", "svd",
                          "--rank", "8", "--svd", "exact", "--json")
    assert code == 0 and err == "", err
    report = json.loads(out)
    assert report["weights"] == [0.7, -0.3] and report["rank"] == 8 and report["rel_error"] < 1e-5
    # -o/--out is an alias for the positional OUT; with it every positional is an adapter.
    code, out, _ = _cli("combine", zoo["a"], zoo["d"], "-o", tmp_path / "out2", "--weights", "0.7,-0.3", "--method", "cat")
    assert code == 0 and "total: 6 modules (r=8)" in out and out.rstrip().splitlines()[-1].startswith("wrote ")
    # Modules are listed in model order, layer numbers by value.
    listed = [line.split()[0] for line in out.splitlines()[1:7]]
    assert listed == sorted(listed, key=module_order) and len(listed) == 6


def test_cli_needs_an_adapter_and_out(zoo: Zoo, tmp_path: Path) -> None:
    for args in ([zoo["a"]], ["-o", tmp_path / "out"], []):
        code, out, err = _cli("combine", *args)
        assert code == 2 and out == "" and "give at least one ADAPTER and then OUT" in err, err
    assert not (tmp_path / "out").exists()


def test_cli_lists_every_method() -> None:
    from adaptertool.adapters.combine import METHODS
    from adaptertool.cli.combining import _METHODS

    assert sorted(_METHODS) == sorted(METHODS)  # the CLI's copy, kept so that --help need not import torch


def test_module_seed_streams_hash_module_colon_stream() -> None:
    import zlib

    from adaptertool.ops.targets import module_seed

    # Pinned: changing the formula changes every seeded output (combine's DARE masks and sketches).
    assert module_seed(7, "m.q_proj") == (7 * 1_000_003 + zlib.crc32(b"m.q_proj")) % (1 << 63)
    assert module_seed(7, "m.q_proj", "svd") == (7 * 1_000_003 + zlib.crc32(b"m.q_proj:svd")) % (1 << 63)
    assert module_seed(7, "m.q_proj", "dare0") != module_seed(7, "m.q_proj", "dare1")

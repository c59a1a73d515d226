"""convert: PiSSA/OLoRA -> LoRA, resize and export, against exact oracles.

Oracles: the trained PiSSA model (residual base + trained adapter, merged by our merge, which
matches PEFT bit for bit in float32), PEFT's own conversion (save_pretrained with
path_initial_model_for_weight_conversion), the optimal rank-r approximation from a float64 SVD,
and PEFT loading the outputs.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from adaptertool.cli import cli
from adaptertool.errors import AdapterToolError
from adaptertool.io import TensorSpec, open_checkpoint, staged_output, write_adapter
from adaptertool.ops.convert import ConvertConfig, convert
from adaptertool.ops.examples import TINY, write_llama, write_lora_adapter
from adaptertool.ops.init import InitConfig, init_adapter
from adaptertool.ops.merge import MergeConfig, merge

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("convert") / "base"
    write_llama(out, TINY, dtype=torch.float32)
    return out


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(folder) as ckpt:
        return {name: ckpt.read(name) for name in ckpt}


def _config(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def _write(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    with staged_output(folder, force=True) as tmp:
        write_adapter(tmp, config, [TensorSpec(k, "F32", tuple(t.shape)) for k, t in tensors.items()], tensors.__getitem__)
    return folder


def _trained(initial: Path, out: Path, *, seed: int = 5, scale: float = 0.05) -> Path:
    """Simulated training: every A and B moved by noise; the config as PEFT saves a trained PiSSA adapter."""
    g = torch.Generator().manual_seed(seed)
    # Noise relative to each tensor's size; a zero B (a default init) gets noise of 0.02.
    tensors = {k: t + scale * (t.abs().mean() if t.any() else 0.04) * torch.randn(t.shape, generator=g)
               for k, t in _tensors(initial).items()}
    return _write(out, {**_config(initial), "init_lora_weights": "pissa"}, tensors)


def _merged(base: Path, adapter: Path, out: Path) -> dict[str, torch.Tensor]:
    merge(MergeConfig(base=base, adapters=((adapter, 1.0),), out=out, dtype=torch.float32))
    return _tensors(out)


def _assert_same_model(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert got.keys() == want.keys()
    for name, expected in want.items():
        torch.testing.assert_close(got[name], expected, atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize(("method", "rslora", "dora"), [("pissa", False, False), ("olora", True, False), ("pissa", False, True)],
                         ids=["pissa", "olora-rslora", "pissa-dora"])
def test_pissa_to_lora_over_the_original_base_is_the_trained_model(base: Path, tmp_path: Path, method: str, rslora: bool,
                                                                   dora: bool) -> None:
    init_adapter(InitConfig(base=base, out=tmp_path / "init", rank=4, alpha=8.0, rslora=rslora, dora=dora, method=method,
                            residual_base=tmp_path / "residual"))
    trained = _trained(tmp_path / "init", tmp_path / "trained")
    option = {"from_pissa" if method == "pissa" else "from_olora": tmp_path / "init"}
    report = convert(ConvertConfig(adapter=trained, out=tmp_path / "lora", **option))
    config = _config(tmp_path / "lora")
    assert config["r"] == 8 and config["init_lora_weights"] is True and report.steps == [f"from-{method}"]
    assert config["lora_alpha"] == pytest.approx(8 * 2**0.5 if rslora else 16)
    assert {m.rank for m in report.modules} == {8}
    want = _merged(tmp_path / "residual", trained, tmp_path / "want")
    _assert_same_model(_merged(base, tmp_path / "lora", tmp_path / "got"), want)
    # The export form of the same conversion (DoRA is refused there) merges to the same model too.
    if not dora:
        convert(ConvertConfig(adapter=trained, out=tmp_path / "export", export=True, **option))
        assert (_config(tmp_path / "export")["r"], _config(tmp_path / "export")["lora_alpha"]) == (8, 8)
        _assert_same_model(_merged(base, tmp_path / "export", tmp_path / "got-export"), want)


@pytest.mark.parametrize("lora", [
    {"init_lora_weights": "pissa", "target_modules": ["q_proj", "v_proj", "down_proj"]},
    {"init_lora_weights": "olora", "target_modules": ["k_proj", "up_proj"], "rank_pattern": {"up_proj": 2},
     "alpha_pattern": {"k_proj": 3}},
], ids=["pissa", "olora-patterns"])
def test_same_as_peft_conversion(base: Path, tmp_path: Path, lora: dict) -> None:
    """PEFT's path_initial_model_for_weight_conversion on the same trained adapter: same tensors, same r/alpha/patterns."""
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                peft.LoraConfig(r=4, lora_alpha=8, **lora))
    model.peft_config["default"].init_lora_weights = True  # as PEFT's examples save the initial adapter
    model.save_pretrained(tmp_path / "initial")
    model.peft_config["default"].init_lora_weights = lora["init_lora_weights"]
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn_like(param) * 0.01)
    model.save_pretrained(tmp_path / "trained")
    model.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    convert(ConvertConfig(adapter=tmp_path / "trained", out=tmp_path / "ours", from_pissa=tmp_path / "initial"))
    ours, theirs = _tensors(tmp_path / "ours"), _tensors(tmp_path / "peft")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    keys = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "init_lora_weights")
    ours_config, theirs_config = _config(tmp_path / "ours"), _config(tmp_path / "peft")
    assert {k: ours_config.get(k) for k in keys} == {k: theirs_config.get(k) for k in keys}
    # PEFT keeps target_modules as a set: its saved order varies with the hash seed.
    assert sorted(ours_config["target_modules"]) == sorted(theirs_config["target_modules"])


def _optimal(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, float]:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank], float(s[rank:].square().sum().sqrt())


def _deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """Each module's delta in float64, through PEFT's rules (rank/alpha patterns, rsLoRA) as our merge reads them."""
    from adaptertool.adapters.peft_config import AdapterSettings

    settings = AdapterSettings.from_config(_config(adapter), source="test")
    tensors = _tensors(adapter)
    deltas = {}
    for key, a in tensors.items():
        if key.endswith("lora_A.weight"):
            module = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            b = tensors[key.replace("lora_A", "lora_B")]
            deltas[module] = b.double() @ a.double() * settings.module_scaling(module, settings.module_rank(module))
    return deltas


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_resize_is_the_optimal_rank_r_approximation(tmp_path: Path, svd: str) -> None:
    source = write_lora_adapter(tmp_path / "r8", TINY, rank=8, alpha=4.0, targets=("q_proj", "v_proj", "down_proj"))
    report = convert(ConvertConfig(adapter=source, out=tmp_path / "r3", rank=3, svd=svd))
    config = _config(tmp_path / "r3")
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (3, 3, False) and "rank_pattern" not in config
    before, after = _deltas(source), _deltas(tmp_path / "r3")
    for module, delta in before.items():
        best, floor = _optimal(delta, 3)
        error = float((after[module] - delta).norm())
        assert error <= floor * (1 + 1e-5 if svd == "exact" else 1.01), module
        if svd == "exact":
            torch.testing.assert_close(after[module], best, atol=1e-7, rtol=0)
    by_module = {m.module: m for m in report.modules}
    for module, delta in before.items():
        assert by_module[module].rel_error == pytest.approx(_optimal(delta, 3)[1] / float(delta.norm()), rel=0.02)


def test_resize_by_energy_writes_patterns_and_never_grows_a_rank(base: Path, tmp_path: Path) -> None:
    tensors = _tensors(write_lora_adapter(tmp_path / "src", TINY, rank=6, alpha=6.0, targets=("q_proj", "o_proj")))
    for key in tensors:  # o_proj: only 2 of its 6 components carry anything
        if "o_proj.lora_B" in key:
            tensors[key][:, 2:] = 0
    source = _write(tmp_path / "lowrank", _config(tmp_path / "src"), tensors)
    report = convert(ConvertConfig(adapter=source, out=tmp_path / "energy", energy=0.999999, svd="exact"))
    config = _config(tmp_path / "energy")
    assert config["r"] == config["lora_alpha"] == 6
    assert config["rank_pattern"] == {r"model\.layers\.0\.self_attn\.o_proj": 2, r"model\.layers\.1\.self_attn\.o_proj": 2}
    assert config["alpha_pattern"] == config["rank_pattern"]
    assert report.rel_error < 1e-3
    after = _deltas(tmp_path / "energy")  # read through PEFT's pattern rules: scaling 1 for the rank-2 modules too
    for module, delta in _deltas(source).items():
        assert float((after[module] - delta).norm()) <= 1e-3 * float(delta.norm()), module
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), tmp_path / "energy")
    assert not [w for w in caught if "missing" in str(w.message).lower()]
    o_proj = model.base_model.model.model.layers[1].self_attn.o_proj
    assert (o_proj.r["default"], o_proj.scaling["default"]) == (2, 1.0)
    grown = convert(ConvertConfig(adapter=source, out=tmp_path / "r12", rank=12))
    assert {m.rank for m in grown.modules} == {6} and any("keep their rank" in n for n in grown.notes)


def test_dora_resize_at_full_rank_keeps_the_merged_model(base: Path, tmp_path: Path) -> None:
    init_adapter(InitConfig(base=base, out=tmp_path / "init", rank=4, alpha=8.0, dora=True, targets=("q_proj", "up_proj")))
    trained = _trained(tmp_path / "init", tmp_path / "trained", scale=0.5)
    report = convert(ConvertConfig(adapter=trained, out=tmp_path / "r4", rank=4, svd="exact"))
    assert any("DoRA magnitude vectors kept" in n for n in report.notes) and _config(tmp_path / "r4")["use_dora"] is True
    assert {m.rank for m in report.modules} == {4} and report.rel_error < 1e-5
    _assert_same_model(_merged(base, tmp_path / "r4", tmp_path / "got"), _merged(base, trained, tmp_path / "want"), atol=1e-5)


def _patterned(tmp_path: Path) -> Path:
    """rsLoRA with rank and alpha patterns and a lora_B.bias: everything --export must flatten."""
    g = torch.Generator().manual_seed(11)
    tensors = {}
    for layer in range(2):
        for module, (rows, cols, rank) in {"q_proj": (32, 32, 4), "v_proj": (16, 32, 2)}.items():
            key = f"{PREFIX}model.layers.{layer}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, cols, generator=g) * 0.1
            tensors[f"{key}.lora_B.weight"] = torch.randn(rows, rank, generator=g) * 0.1
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "use_rslora": True,
              "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"layers.1.self_attn.v_proj": 3},
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_dora": False, "inference_mode": True}
    return _write(tmp_path / "patterned", config, tensors)


def test_export_flattens_patterns_and_rslora_and_merges_to_the_same_weights(base: Path, tmp_path: Path) -> None:
    source = _patterned(tmp_path)
    report = convert(ConvertConfig(adapter=source, out=tmp_path / "export", export=True))
    config = _config(tmp_path / "export")
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 4, False)
    assert "rank_pattern" not in config and "alpha_pattern" not in config
    assert any("2 modules of lower rank zero-padded to r=4" in n for n in report.notes)
    assert {tuple(t.shape) for k, t in _tensors(tmp_path / "export").items() if "lora_A" in k} == {(4, 32)}
    _assert_same_model(_merged(base, tmp_path / "export", tmp_path / "got"), _merged(base, source, tmp_path / "want"))
    ids = torch.tensor([[1, 5, 17, 33, 60]])
    logits = []
    for adapter in (source, tmp_path / "export"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), adapter)
        assert not [w for w in caught if "missing" in str(w.message).lower()]
        with torch.no_grad():
            logits.append(model(ids).logits)
    torch.testing.assert_close(logits[1], logits[0], atol=1e-6, rtol=1e-6)


def test_export_keeps_modules_to_save(base: Path, tmp_path: Path) -> None:
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base),
                                peft.LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(tmp_path / "ad")
    report = convert(ConvertConfig(adapter=tmp_path / "ad", out=tmp_path / "export", export=True))
    assert any("1 full tensors (modules_to_save) kept" in n for n in report.notes)
    _assert_same_model(_merged(base, tmp_path / "export", tmp_path / "got"), _merged(base, tmp_path / "ad", tmp_path / "want"))


def test_loha_resized_into_a_lora(base: Path, tmp_path: Path) -> None:
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base),
                                peft.LoHaConfig(r=3, alpha=6, target_modules=["q_proj", "up_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "hada_" in name:
                param.copy_(torch.randn_like(param) * 0.2)
    model.save_pretrained(tmp_path / "loha")
    with pytest.raises(AdapterToolError, match="is LOHA, not LoRA factors; re-factor it as a LoRA with --rank"):
        convert(ConvertConfig(adapter=tmp_path / "loha", out=tmp_path / "x", export=True))
    convert(ConvertConfig(adapter=tmp_path / "loha", out=tmp_path / "lora", rank=5, svd="exact"))
    assert _config(tmp_path / "lora")["peft_type"] == "LORA"
    original, merged = _tensors(base), _merged(base, tmp_path / "lora", tmp_path / "m1")
    full = _merged(base, tmp_path / "loha", tmp_path / "m2")
    for name in original:
        delta = full[name].double() - original[name].double()
        if delta.abs().max() == 0:
            continue
        got = merged[name].double() - original[name].double()
        assert float((got - delta).norm()) <= _optimal(delta, 5)[1] * 1.001 + 1e-6, name


def test_bad_inputs_are_refused(base: Path, tmp_path: Path) -> None:
    init_adapter(InitConfig(base=base, out=tmp_path / "init", rank=4, method="pissa", residual_base=tmp_path / "res"))
    init_adapter(InitConfig(base=base, out=tmp_path / "init2", rank=2, method="pissa", residual_base=tmp_path / "res2"))
    init_adapter(InitConfig(base=base, out=tmp_path / "init-a16", rank=4, alpha=16, method="pissa",
                            residual_base=tmp_path / "res3"))
    init_adapter(InitConfig(base=base, out=tmp_path / "q-only", rank=4, method="pissa", targets=("q_proj",),
                            residual_base=tmp_path / "res4"))
    trained = _trained(tmp_path / "init", tmp_path / "trained")
    cases = [
        ({"from_pissa": tmp_path / "init2"}, r"has factors \[2, \d+\]/\[\d+, 2\] but \[4, \d+\]/\[\d+, 4\] in"),
        ({"from_pissa": tmp_path / "init-a16"}, "has scaling 4 but 1 in .*; the adapters must share r, lora_alpha"),
        ({"from_olora": tmp_path / "q-only"}, r"trained: only this adapter has module model\.layers\.0\.mlp\.down_proj; is INITIAL the adapter"),
    ]
    for options, message in cases:
        with pytest.raises(AdapterToolError, match=message):
            convert(ConvertConfig(adapter=trained, out=tmp_path / "out", **options))
    dora = tmp_path / "dora"
    init_adapter(InitConfig(base=base, out=dora, rank=2, dora=True, targets=("q_proj",)))
    with pytest.raises(AdapterToolError, match="is DoRA, which the loaders --export targets do not read"):
        convert(ConvertConfig(adapter=dora, out=tmp_path / "out", export=True))
    ia3 = _write(tmp_path / "ia3", {"peft_type": "IA3", "target_modules": ["k_proj"], "feedforward_modules": []},
                 {f"{PREFIX}model.layers.0.self_attn.k_proj.ia3_l": torch.ones(16, 1)})
    with pytest.raises(AdapterToolError, match="is IA3, which rescales weights"):
        convert(ConvertConfig(adapter=ia3, out=tmp_path / "out", rank=2))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("options", "message"), [
    ({}, "nothing to do"),
    ({"from_pissa": Path("a"), "from_olora": Path("b")}, "--from-pissa and --from-olora both given"),
    ({"rank": 2, "energy": 0.9}, "two rank rules"),
    ({"max_rank": 4, "export": True}, "--max-rank caps a resize"),
    ({"rank": 0}, "--rank must be a positive integer"),
    ({"energy": 1.5}, r"--energy must lie in \(0, 1\]"),
    ({"export": True, "svd": "full"}, "--svd must be randomized or exact"),
], ids=["nothing", "both-initials", "two-rules", "max-rank", "rank0", "energy", "svd"])
def test_bad_options(options: dict, message: str) -> None:
    with pytest.raises(AdapterToolError, match=message):
        ConvertConfig(adapter=Path("a"), out=Path("o"), **options)


def test_cli_init_then_convert(base: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["init", str(base), str(tmp_path / "ad"), "--method", "olora", "--rank", "2",
                                 "--residual-base", str(tmp_path / "res"), "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["method"] == "olora" and report["modules"] == 14 and report["residual_base"] == str(tmp_path / "res")
    result = runner.invoke(cli, ["convert", str(tmp_path / "ad"), str(tmp_path / "small"), "--rank", "1", "--export", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == ["resize", "export"]
    result = runner.invoke(cli, ["convert", str(tmp_path / "ad"), str(tmp_path / "small")])
    assert result.exit_code == 1 and "nothing to do" in result.stderr
    result = runner.invoke(cli, ["init", str(base), str(tmp_path / "x"), "--method", "svd"])
    assert result.exit_code == 2
    result = runner.invoke(cli, ["init", str(base), str(tmp_path / "x"), "--method", "pissa"])
    assert result.exit_code == 1 and result.stderr.startswith("error: --method pissa") and result.stdout == ""

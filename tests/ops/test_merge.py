"""merge/subtract against PEFT: adapters made and saved by PEFT on tiny models, merged both ways.

Oracles: PEFT 0.21's merge_and_unload on the same model. In float32 our merge runs the same float32
operations as PEFT and must match bit for bit. In bf16 PEFT rounds intermediate results to bf16
(for LoHa, LoKr, DoRA and IA3 all its arithmetic is bf16), so there the oracle is PEFT's merge of the
same bf16 weights run in float64: we must be within one bf16 ulp of it (we add in float32 and round
once), and never further from it than PEFT's own bf16 merge, which rounds the delta first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from adaptertool import AdapterToolError
from adaptertool.cli import cli
from adaptertool.io import open_checkpoint
from adaptertool.ops.examples import TINY
from adaptertool.ops.merge import MergeConfig, merge, subtract
from tests.quant.fourbit_reference import decode_quant_state

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

LLAMA = {k: v for k, v in TINY.config(torch.float32).items() if k not in ("architectures", "torch_dtype")}

# case -> (model kind, PEFT config class, its arguments)
CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "lora": ("llama", "LoraConfig", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "rslora": ("llama", "LoraConfig", dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["k_proj", "o_proj"])),
    "patterns": ("llama", "LoraConfig", dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                             rank_pattern={"up_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3})),
    "embedding": ("llama", "LoraConfig", dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "gate_proj"])),
    "modules_to_save": ("llama", "LoraConfig", dict(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "lora_bias": ("llama-bias", "LoraConfig", dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], lora_bias=True)),
    "layers_to_transform": ("llama", "LoraConfig", dict(r=4, lora_alpha=8, target_modules=["v_proj"], layers_to_transform=[1])),
    "dora": ("llama", "LoraConfig", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"])),
    "dora_embedding": ("llama", "LoraConfig", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["embed_tokens"])),
    "conv1d_fan_in_fan_out": ("gpt2", "LoraConfig", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "conv1d_dora": ("gpt2", "LoraConfig", dict(r=4, lora_alpha=8, target_modules=["c_fc"], fan_in_fan_out=True, use_dora=True)),
    "loha": ("llama", "LoHaConfig", dict(r=4, alpha=8, target_modules=["q_proj", "up_proj"])),
    "lokr": ("llama", "LoKrConfig", dict(r=4, alpha=8, target_modules=["k_proj", "down_proj"])),
    "lokr_factored": ("llama", "LoKrConfig", dict(r=2, alpha=3, target_modules=["gate_proj"], decompose_both=True, decompose_factor=4)),
    "adalora": ("llama", "AdaLoraConfig", dict(init_r=6, target_r=4, lora_alpha=12, total_step=10, target_modules=["q_proj", "v_proj"])),
    "ia3": ("llama", "IA3Config", dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "ia3_bias": ("llama-bias", "IA3Config", dict(target_modules=["q_proj", "o_proj"], feedforward_modules=["o_proj"])),
}
# Not DoRA/IA3 (not additive), nor adapters holding full copies: modules_to_save, and "embedding",
# for which PEFT also saves the embedding's own base weight.
ADDITIVE = [c for c in CASES if not (c.startswith("ia3") or "dora" in c or c in ("modules_to_save", "embedding"))]


def _model(kind: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
        return transformers.GPT2LMHeadModel(config).to(dtype)
    config = transformers.LlamaConfig(**LLAMA, attention_bias=kind == "llama-bias")
    model = transformers.LlamaForCausalLM(config).to(dtype)
    if kind == "llama-bias":
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0, 0.1)
    return model


def _randomise(model: torch.nn.Module) -> None:
    # PEFT initialises one factor to zero (or IA3 to ones): make every adapter tensor real.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(k in name for k in ("lora_", "hada_", "lokr_")):
                param.copy_(torch.randn_like(param) * 0.1 + (1.0 if "magnitude" in name else 0.0))
            elif "ia3_l" in name:
                param.copy_(1 + torch.randn_like(param) * 0.2)
            elif "modules_to_save" in name:  # a trained copy differs from the base
                param.add_(torch.randn_like(param) * 0.01)


def _make(root: Path, case: str, dtype: torch.dtype) -> tuple[Path, Path]:
    kind, config_class, kwargs = CASES[case]
    model = _model(kind, dtype)
    base, adapter = root / "base", root / "adapter"
    model.save_pretrained(base)
    peft_model = peft.get_peft_model(model, getattr(peft, config_class)(**kwargs))
    _randomise(peft_model)
    peft_model.save_pretrained(adapter)
    return base, adapter


def _peft_merged(base: Path, adapter: Path, kind: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    model_class = transformers.GPT2LMHeadModel if kind == "gpt2" else transformers.LlamaForCausalLM
    model = model_class.from_pretrained(base, dtype=dtype)
    peft_model = peft.PeftModel.from_pretrained(model, adapter, autocast_adapter_dtype=False)
    adapter_dtypes = {p.dtype for n, p in peft_model.named_parameters() if any(k in n for k in ("lora_", "hada_", "lokr_", "ia3_"))}
    assert adapter_dtypes == {dtype}, adapter_dtypes  # the oracle really computes in `dtype`
    return peft_model.merge_and_unload().state_dict()


def _ours(out: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(out) as ckpt:
        return {name: ckpt.read(name) for name in ckpt}


def _ulps(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest distance of ``got`` (bf16) from ``want`` (float64) in bf16 ulps at ``want``.

    Where W + delta nearly cancels, the bf16 ulp of the result is far below float32's resolution of
    the operands; there the spacing is floored at one float32 ulp of the tensor's largest value.
    """
    want = want.double()
    spacing = torch.finfo(torch.bfloat16).eps * torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(1e-30))))
    spacing = spacing.clamp_min(torch.finfo(torch.float32).eps * want.abs().max().item())
    return ((got.double() - want).abs() / spacing).max().item()


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_merge_is_bit_identical_to_peft(tmp_path: Path, case: str) -> None:
    base, adapter = _make(tmp_path, case, torch.float32)
    report = merge(MergeConfig(base=base, adapters=((adapter, 1.0),), out=tmp_path / "out"))
    expected = _peft_merged(base, adapter, CASES[case][0], torch.float32)
    ours = _ours(tmp_path / "out")
    assert report.merged + report.replaced > 0
    changed = 0
    for name, tensor in ours.items():
        assert torch.equal(tensor, expected[name]), f"{name}: max diff {(tensor - expected[name]).abs().max()}"
        with open_checkpoint(base) as b:
            changed += not torch.equal(tensor, b.read(name))
    assert changed == report.merged + report.replaced


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_merge_within_one_ulp(tmp_path: Path, case: str) -> None:
    base, adapter = _make(tmp_path, case, torch.bfloat16)
    merge(MergeConfig(base=base, adapters=((adapter, 1.0),), out=tmp_path / "out"))
    exact = _peft_merged(base, adapter, CASES[case][0], torch.float64)
    for name, tensor in _ours(tmp_path / "out").items():
        assert tensor.dtype == torch.bfloat16
        assert _ulps(tensor, exact[name]) <= 1.0, name
    # PEFT's own bf16 merge rounds the delta to bf16 before adding it: measured against the same
    # exact result it is never closer than ours.
    peft_bf16 = _peft_merged(base, adapter, CASES[case][0], torch.bfloat16)
    for name, tensor in _ours(tmp_path / "out").items():
        ours_error = (tensor.double() - exact[name]).abs().max()
        assert ours_error <= (peft_bf16[name].double() - exact[name]).abs().max(), name


@pytest.mark.parametrize("case", ADDITIVE)
def test_subtract_returns_the_base(tmp_path: Path, case: str) -> None:
    base, adapter = _make(tmp_path, case, torch.float32)
    merge(MergeConfig(base=base, adapters=((adapter, 1.0),), out=tmp_path / "merged"))
    subtract(MergeConfig(base=tmp_path / "merged", adapters=((adapter, 1.0),), out=tmp_path / "back"))
    original = _ours(base)
    worst = max((t - original[n]).abs().max().item() for n, t in _ours(tmp_path / "back").items())
    assert worst < 1e-6  # the bound; one float32 rounding of W + d - d


@pytest.mark.parametrize("case", ["dora", "ia3", "modules_to_save"])
def test_subtract_refuses_what_cannot_be_undone(tmp_path: Path, case: str) -> None:
    base, adapter = _make(tmp_path, case, torch.float32)
    reason = {"dora": "DoRA rescales weights", "ia3": "IA3 rescales weights", "modules_to_save": "replaces .* outright"}[case]
    with pytest.raises(AdapterToolError, match=reason):
        subtract(MergeConfig(base=base, adapters=((adapter, 1.0),), out=tmp_path / "back"))
    assert not (tmp_path / "back").exists()


def test_several_adapters_in_one_pass_with_weights(tmp_path: Path) -> None:
    base, first = _make(tmp_path / "a", "lora", torch.float32)
    _, second = _make(tmp_path / "b", "loha", torch.float32)
    merge(MergeConfig(base=base, adapters=((first, 0.5), (second, 2.0)), out=tmp_path / "both", scale=0.5,
                      max_shard_bytes=20_000))
    assert len(list((tmp_path / "both").glob("model-0000*-of-*.safetensors"))) > 2
    # The reference: each adapter merged alone at its weight, the deltas summed in float64.
    merge(MergeConfig(base=base, adapters=((first, 0.25),), out=tmp_path / "one"))
    merge(MergeConfig(base=base, adapters=((second, 1.0),), out=tmp_path / "two"))
    w0, one, two, both = _ours(base), _ours(tmp_path / "one"), _ours(tmp_path / "two"), _ours(tmp_path / "both")
    for name in w0:
        expected = one[name].double() + two[name].double() - w0[name].double()
        torch.testing.assert_close(both[name].double(), expected, rtol=0, atol=1e-6)


def test_tied_lm_head_is_untied_and_matches_peft_forward(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, "tie_word_embeddings": True}))
    model.save_pretrained(tmp_path / "base")
    assert "lm_head.weight" not in load_file(tmp_path / "base" / "model.safetensors")
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"]))
    _randomise(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = peft_model(ids).logits
    report = merge(MergeConfig(base=tmp_path / "base", adapters=((tmp_path / "adapter", 1.0),), out=tmp_path / "out"))
    assert any("lm_head was tied" in note for note in report.notes)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_dtype_option_casts_and_updates_config(tmp_path: Path) -> None:
    base, adapter = _make(tmp_path, "lora", torch.float32)
    report = merge(MergeConfig(base=base, adapters=((adapter, 1.0),), out=tmp_path / "out", dtype=torch.bfloat16))
    expected = _peft_merged(base, adapter, "llama", torch.float32)
    for name, tensor in _ours(tmp_path / "out").items():
        assert torch.equal(tensor, expected[name].to(torch.bfloat16)), name  # rounded once, from float32
    assert report.cast > 0 and report.dtype == "bfloat16"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_default_adapter_name_in_keys_is_normalised(tmp_path: Path) -> None:
    base, adapter = _make(tmp_path, "lora", torch.float32)
    tensors = load_file(adapter / "adapter_model.safetensors")
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    save_file({k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}, renamed / "adapter_model.safetensors")
    (renamed / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    merge(MergeConfig(base=base, adapters=((adapter, 1.0),), out=tmp_path / "a"))
    merge(MergeConfig(base=base, adapters=((renamed, 1.0),), out=tmp_path / "b"))
    a, b = _ours(tmp_path / "a"), _ours(tmp_path / "b")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_base_without_model_prefix(tmp_path: Path) -> None:
    base, adapter = _make(tmp_path, "lora", torch.float32)
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file({k.removeprefix("model."): v for k, v in load_file(base / "model.safetensors").items()}, bare / "model.safetensors")
    merge(MergeConfig(base=base, adapters=((adapter, 1.0),), out=tmp_path / "a"))
    merge(MergeConfig(base=bare, adapters=((adapter, 1.0),), out=tmp_path / "b"))
    a, b = _ours(tmp_path / "a"), _ours(tmp_path / "b")
    assert all(torch.equal(a[n], b[n.removeprefix("model.")]) for n in a)


# --- bad inputs: each a one-line error, nothing written ---------------------------------------------


def _edited_adapter(tmp_path: Path, *, config: dict[str, Any] | None = None, tensors: Any = None) -> tuple[Path, Path]:
    base, adapter = _make(tmp_path, "lora", torch.float32)
    edited = tmp_path / "edited"
    edited.mkdir()
    original = json.loads((adapter / "adapter_config.json").read_text())
    (edited / "adapter_config.json").write_text(json.dumps(config(original) if callable(config) else original))
    weights = load_file(adapter / "adapter_model.safetensors")
    save_file(tensors(weights) if tensors else weights, edited / "adapter_model.safetensors")
    return base, edited


def _refused(base: Path, adapter: Path, match: str, tmp_path: Path) -> None:
    with pytest.raises(AdapterToolError, match=match) as info:
        merge(MergeConfig(base=base, adapters=((adapter, 1.0),), out=tmp_path / "out"))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_codes_of_an_undecoded_format_are_refused(tmp_path: Path) -> None:
    # An FP8 weight whose scale tensor is missing: adding a delta to the codes would write garbage.
    base, adapter = _make(tmp_path, "lora", torch.float32)
    tensors = load_file(base / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    _refused(base, adapter, rf"model\.safetensors: tensor {name} is stored as F8_E4M3, quantised in a way merge does "
             "not decode; dequantize the base", tmp_path)


def test_adapter_for_another_model(tmp_path: Path) -> None:
    base, adapter = _edited_adapter(tmp_path, tensors=lambda w: {k: torch.cat([v, v], -1) if "lora_A" in k else v for k, v in w.items()})
    _refused(base, adapter, r"edited: module model\.layers\.\d\.\w+\.\w+_proj implies shape \[\d+, \d+\] for model\.layers\.\S+\.weight, "
             r"but the base has \[\d+, \d+\]; was the adapter made for another model\?", tmp_path)


def test_wrong_rank_shapes(tmp_path: Path) -> None:
    base, adapter = _edited_adapter(tmp_path, tensors=lambda w: {k: v[:, :3].contiguous() if "lora_B" in k else v for k, v in w.items()})
    _refused(base, adapter, r"module model\.layers\.0\.\S+: lora_A \[4, \d+\] and lora_B \[\d+, 3\] do not chain", tmp_path)


def test_rank_disagrees_with_config(tmp_path: Path) -> None:
    base, adapter = _edited_adapter(tmp_path, config=lambda c: {**c, "r": 8})
    _refused(base, adapter, r"has rank 4 in its tensors but the config says r=8", tmp_path)


def test_nan_in_adapter_is_flagged(tmp_path: Path) -> None:
    def poison(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        key = sorted(weights)[0]
        weights[key][0, 0] = float("nan")
        return weights

    base, adapter = _edited_adapter(tmp_path, tensors=poison)
    _refused(base, adapter, r"tensor base_model\.model\..* holds NaN or Inf values; the adapter is broken", tmp_path)


def test_missing_config_field(tmp_path: Path) -> None:
    base, adapter = _edited_adapter(tmp_path, config=lambda c: {k: v for k, v in c.items() if k != "r"})
    _refused(base, adapter, r"adapter_config\.json: LORA config lacks 'r'", tmp_path)


def test_unknown_peft_type(tmp_path: Path) -> None:
    base, adapter = _edited_adapter(tmp_path, config=lambda c: {**c, "peft_type": "PROMPT_TUNING"})
    _refused(base, adapter, r"peft_type PROMPT_TUNING is not supported; adaptertool merges LORA, LOHA, LOKR, ADALORA, IA3", tmp_path)


def test_dora_config_without_magnitudes(tmp_path: Path) -> None:
    base, adapter = _edited_adapter(tmp_path, config=lambda c: {**c, "use_dora": True})
    _refused(base, adapter, r"use_dora but there is no lora_magnitude_vector", tmp_path)


def test_pickle_only_adapter_is_refused(tmp_path: Path) -> None:
    base, adapter = _make(tmp_path, "lora", torch.float32)
    (adapter / "adapter_model.safetensors").unlink()
    torch.save({"w": torch.ones(1)}, adapter / "adapter_model.bin")
    _refused(base, adapter, r"holds only pickled weights \(adapter_model\.bin\); adaptertool never unpickles", tmp_path)


def test_weight_on_dora_is_refused(tmp_path: Path) -> None:
    base, adapter = _make(tmp_path, "dora", torch.float32)
    with pytest.raises(AdapterToolError, match=r"DoRA updates are not additive"):
        merge(MergeConfig(base=base, adapters=((adapter, 0.5),), out=tmp_path / "out"))


def test_nf4_base_merges_into_16_bit(tmp_path: Path) -> None:
    # The base is a transformers-saved bitsandbytes NF4 checkpoint (double quant); the oracle is each
    # weight as bitsandbytes stored it (codes, nested absmax, tables), decoded by the format's
    # definition, plus the LoRA delta, in float64. Not bitsandbytes' C dequantize_4bit: on AVX-512
    # CPUs it misreads absmax for this model's 32-wide rows (tests/quant/fourbit_reference.py).
    pytest.importorskip("bitsandbytes")
    base16, adapter = _make(tmp_path, "lora", torch.bfloat16)
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                                   bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.LlamaForCausalLM.from_pretrained(base16, quantization_config=quantization, device_map="cpu")
    model.save_pretrained(tmp_path / "nf4")
    report = merge(MergeConfig(base=tmp_path / "nf4", adapters=((adapter, 1.0),), out=tmp_path / "out"))
    assert any("4-bit weights" in note for note in report.notes)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    lora = load_file(adapter / "adapter_model.safetensors")
    settings = json.loads((adapter / "adapter_config.json").read_text())
    ours = _ours(tmp_path / "out")
    assert set(ours) == set(load_file(base16 / "model.safetensors"))  # the plain layout, no quant entries
    for name, module in model.named_modules():
        if not hasattr(module, "weight") or not hasattr(module.weight, "quant_state"):
            continue
        weight = decode_quant_state(module.weight.data, module.weight.quant_state).double()
        key = f"base_model.model.{name}"
        if f"{key}.lora_A.weight" in lora:
            delta = lora[f"{key}.lora_B.weight"].double() @ lora[f"{key}.lora_A.weight"].double()
            weight = weight + delta * settings["lora_alpha"] / settings["r"]
        assert ours[f"{name}.weight"].dtype == torch.bfloat16
        assert _ulps(ours[f"{name}.weight"], weight) <= 1.0, name


def test_requantize_keeps_the_4bit_layout_and_loads(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    base16, adapter = _make(tmp_path, "lora", torch.bfloat16)
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                                   bnb_4bit_compute_dtype=torch.bfloat16)
    transformers.LlamaForCausalLM.from_pretrained(base16, quantization_config=quantization, device_map="cpu").save_pretrained(tmp_path / "nf4")
    merge(MergeConfig(base=tmp_path / "nf4", adapters=((adapter, 1.0),), out=tmp_path / "m16"))
    report = merge(MergeConfig(base=tmp_path / "nf4", adapters=((adapter, 1.0),), out=tmp_path / "m4", requantize=True))
    assert any("re-quantised 14 weights to NF4 (blocksize 64, double-quant)" in note for note in report.notes)
    assert not any(".merge16-" in p.name for p in tmp_path.iterdir())  # the 16-bit scratch is gone
    assert set(_ours(tmp_path / "m4")) == set(_ours(tmp_path / "nf4"))  # the same 4-bit layout as the base
    model, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "m4", device_map="cpu", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    from adaptertool.ops.dequantize import DequantConfig, dequantize

    dequantize(DequantConfig(source=tmp_path / "m4", out=tmp_path / "back"))
    merged16, back = _ours(tmp_path / "m16"), _ours(tmp_path / "back")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"):
        error = (back[name].float() - merged16[name].float()).norm() / merged16[name].float().norm()
        assert error < 0.12, name  # NF4's rounding of the merged weights (about 0.1 relative)
    with pytest.raises(AdapterToolError, match="--requantize needs a quantised base"):
        merge(MergeConfig(base=base16, adapters=((adapter, 1.0),), out=tmp_path / "x", requantize=True))


@pytest.mark.parametrize("command", ["merge", "subtract"])
def test_base_and_adapter_given_the_other_way_round_are_caught(tiny_sharded: Path, tiny_adapter: Path, tmp_path: Path,
                                                               command: str) -> None:
    result = CliRunner().invoke(cli, [command, str(tiny_adapter), str(tiny_sharded), str(tmp_path / "out")])
    usage = "subtract MODEL ADAPTER OUT" if command == "subtract" else "merge BASE ADAPTER OUT"
    assert result.exit_code == 1
    assert result.stderr == f"error: {tiny_adapter} is a PEFT adapter and {tiny_sharded} is not: are they swapped? the order is {usage}\n"
    assert not (tmp_path / "out").exists()

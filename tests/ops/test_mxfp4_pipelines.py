"""gpt-oss MXFP4 through quantize, dequantize and merge, against transformers' own MXFP4 loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from adaptertool.ops.dequantize import DequantConfig, dequantize
from adaptertool.ops.quantize import QuantConfig, quantize


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny bf16 gpt-oss (fused experts stored (E, in, out), gate/up interleaved) and its MXFP4 quantisation."""
    root = tmp_path_factory.mktemp("gpt-oss")
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(
        "gpt_oss", vocab_size=64, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"], sliding_window=8)
    transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(root / "bf16")
    return root


def test_quantize_mxfp4_writes_what_transformers_loads(gpt_oss: Path, tmp_path: Path) -> None:
    report = quantize(QuantConfig(source=gpt_oss / "bf16", out=tmp_path / "mx", quant_type="mxfp4"))
    assert report.quantized == 4  # gate_up_proj and down_proj of 2 layers; attention and router stay bf16
    stored = load_file(tmp_path / "mx" / "model.safetensors")
    assert stored["model.layers.0.mlp.experts.gate_up_proj_blocks"].shape == (4, 64, 2, 16)  # (E, 2I, H/32, 16)
    assert stored["model.layers.0.mlp.experts.down_proj_scales"].shape == (4, 64, 1)  # (E, H, I/32)
    assert "model.layers.0.mlp.experts.gate_up_proj" not in stored
    assert json.loads((tmp_path / "mx" / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    dequantize(DequantConfig(source=tmp_path / "mx", out=tmp_path / "dq"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "mx", quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.bfloat16)
    ours, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dq", dtype=torch.bfloat16,
                                                                    output_loading_info=True)
    assert not any(info.values()), info
    assert theirs.state_dict().keys() == ours.state_dict().keys()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, theirs.state_dict()[name]), name
    # every expert weight within half an MXFP4 step of the bf16 original
    original = load_file(gpt_oss / "bf16" / "model.safetensors")
    for name in ("model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        error = (ours.state_dict()[name].float() - original[name].float()).abs()
        assert error.max() <= original[name].float().abs().max() / 3, name  # half a step of 2 at scale < amax / 3


def test_mxfp4_round_trip_keeps_values_and_documents_the_recipe_s_bytes(gpt_oss: Path, tmp_path: Path) -> None:
    # triton_kernels' recipe (scale = the least power of two >= amax / 6) is not idempotent in bytes:
    # a group whose largest value rounds to 3 * 2**k comes back at scale 2**(k-1) with doubled codes.
    # The values are identical, so dequantize -> quantize -> dequantize is.
    quantize(QuantConfig(source=gpt_oss / "bf16", out=tmp_path / "mx", quant_type="mxfp4"))
    dequantize(DequantConfig(source=tmp_path / "mx", out=tmp_path / "dq"))
    quantize(QuantConfig(source=tmp_path / "dq", out=tmp_path / "mx2", quant_type="mxfp4"))
    dequantize(DequantConfig(source=tmp_path / "mx2", out=tmp_path / "dq2"))
    assert (tmp_path / "dq2" / "model.safetensors").read_bytes() == (tmp_path / "dq" / "model.safetensors").read_bytes()
    first, second = load_file(tmp_path / "mx" / "model.safetensors"), load_file(tmp_path / "mx2" / "model.safetensors")
    name = "model.layers.0.mlp.experts.down_proj_scales"
    moved = first[name] != second[name]
    assert moved.any() and bool((first[name][moved].int() - second[name][moved].int() == 1).all())


def test_expert_adapter_merges_into_an_mxfp4_base(gpt_oss: Path, tmp_path: Path) -> None:
    import peft

    from adaptertool.ops.merge import MergeConfig, merge

    quantize(QuantConfig(source=gpt_oss / "bf16", out=tmp_path / "mx", quant_type="mxfp4"))
    dequantize(DequantConfig(source=tmp_path / "mx", out=tmp_path / "dq"))
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dq"),
                                peft.LoraConfig(r=2, lora_alpha=4, target_modules=[],
                                                target_parameters=["mlp.experts.gate_up_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    model.save_pretrained(tmp_path / "adapter")
    adapter = ((tmp_path / "adapter", 1.0),)
    # 16-bit: the MXFP4 values are exact in bf16, so merging into the base equals merging into its dequantisation
    merge(MergeConfig(base=tmp_path / "mx", adapters=adapter, out=tmp_path / "m16"))
    merge(MergeConfig(base=tmp_path / "dq", adapters=adapter, out=tmp_path / "m16-dq"))
    ours, via_bf16 = load_file(tmp_path / "m16" / "model.safetensors"), load_file(tmp_path / "m16-dq" / "model.safetensors")
    assert ours.keys() == via_bf16.keys() and all(torch.equal(ours[k], via_bf16[k]) for k in ours)
    # --requantize: MXFP4 again; down_proj (untouched) keeps its bytes, config.json its quantization_config
    merge(MergeConfig(base=tmp_path / "mx", adapters=adapter, out=tmp_path / "rq", requantize=True))
    before, after = load_file(tmp_path / "mx" / "model.safetensors"), load_file(tmp_path / "rq" / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {f"model.layers.{i}.mlp.experts.gate_up_proj_{part}" for i in (0, 1) for part in ("blocks", "scales")}
    assert (tmp_path / "rq" / "config.json").read_bytes() == (tmp_path / "mx" / "config.json").read_bytes()
    requantized = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "rq", quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.bfloat16)
    merged = load_file(tmp_path / "m16" / "model.safetensors")
    for name, tensor in requantized.state_dict().items():  # each merged weight quantised afresh: within half a step
        want = merged[name].float()
        assert (tensor.float() - want).abs().max() <= want.abs().max() / 3, name

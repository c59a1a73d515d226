"""Every quantised base of fixtures/build_fp8.py (block FP8 with partial edge blocks and ue8m0 scales,
compressed-tensors FP8 per row / block / tensor, gpt-oss MXFP4; dense and MoE) through dequantize,
merge and merge --requantize, against the format's definition and what transformers loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from adaptertool.io import open_checkpoint
from adaptertool.ops.dequantize import DequantConfig, dequantize
from adaptertool.ops.merge import MergeConfig, merge
from adaptertool.ops.quantized import open_quantized_view

CASES = ["qwen3-fp8", "qwen3-fp8-ue8m0", "qwen3_moe-fp8", "qwen3_moe-fp8-b16", "deepseek_v3-fp8", "deepseek_v3-fp8-ue8m0",
         "deepseek_v3-fp8-aligned", "llama-ct-fp8-dynamic", "llama-ct-fp8-block", "llama-ct-fp8-tensor", "gpt_oss-mxfp4"]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(folder) as ckpt:
        return {name: ckpt.read(name) for name in ckpt}


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _case(fp8_fixtures: Path, name: str) -> tuple[Path, Path, Path]:
    case = json.loads((fp8_fixtures / "manifest.json").read_text())["cases"][name]
    return fp8_fixtures / case["quantized"], fp8_fixtures / case["bf16"], fp8_fixtures / case["adapter"]


@pytest.mark.parametrize("name", CASES)
def test_dequantize_gives_the_plain_model_transformers_loads(fp8_fixtures: Path, tmp_path: Path, name: str) -> None:
    quantized, bf16, _ = _case(fp8_fixtures, name)
    dequantize(DequantConfig(source=quantized, out=tmp_path / "dq"))
    ours, original = _tensors(tmp_path / "dq"), _tensors(bf16)
    assert ours.keys() == original.keys() and all(ours[k].dtype == original[k].dtype for k in ours)
    with open_checkpoint(quantized) as ckpt:
        view = open_quantized_view(ckpt)
        assert view is not None
        for key in ours:  # each decoded weight straight to bf16: its float32 decoding rounded once
            want = view.float32(key).to(torch.bfloat16) if key in view.quantized else ckpt.read(key)
            assert torch.equal(_bytes(ours[key]), _bytes(want)), key
    config = json.loads((tmp_path / "dq" / "config.json").read_text())
    assert "quantization_config" not in config
    _, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dq", output_loading_info=True)
    assert not any(info.values()), info


@pytest.mark.parametrize("name", CASES)
def test_requantized_merge_rewrites_only_what_the_adapter_changes(fp8_fixtures: Path, tmp_path: Path, name: str) -> None:
    quantized, _, adapter = _case(fp8_fixtures, name)
    merge(MergeConfig(base=quantized, adapters=((adapter, 1.0),), out=tmp_path / "m16"))
    report = merge(MergeConfig(base=quantized, adapters=((adapter, 1.0),), out=tmp_path / "rq", requantize=True))
    before, after, merged = _tensors(quantized), _tensors(tmp_path / "rq"), _tensors(tmp_path / "m16")
    assert before.keys() == after.keys() and all(before[k].dtype == after[k].dtype for k in before)
    changed = {k for k in before if not torch.equal(_bytes(before[k]), _bytes(after[k]))}
    with open_checkpoint(quantized) as ckpt:
        view = open_quantized_view(ckpt)
        assert view is not None
        # what the 16-bit merge changed, mapped to the stored tensors (a quantised weight: its codes and scales)
        touched = {k for k in merged if k in view.quantized and not torch.equal(merged[k], view.decode(k))}
        touched_plain = {k for k in merged if k not in view.quantized and not torch.equal(merged[k], ckpt.read(k))}
        stored = {key for k in touched for key in view.quantized[k].stored if not key.endswith("input_scale")}
    assert touched and changed <= stored | touched_plain and touched_plain <= changed and changed & stored
    assert report.cast == 0 and report.copied == len(before) - len(stored | touched_plain)  # the rest: byte copies
    assert (tmp_path / "rq" / "config.json").read_bytes() == (quantized / "config.json").read_bytes()


def test_fp8_deepseek_with_an_expert_adapter_in_target_parameters_form(fp8_fixtures: Path, tmp_path: Path) -> None:
    # The composed case: a DeepSeek-V3-shaped block-FP8 base (per-expert keys, partial edge blocks) and
    # a PEFT target_parameters LoRA on its fused in-memory experts, merged 16-bit and with --requantize.
    import peft

    quantized, bf16, _ = _case(fp8_fixtures, "deepseek_v3-fp8")
    torch.manual_seed(0)
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32),
                                peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_b_proj"],
                                                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    model.save_pretrained(tmp_path / "tp")
    adapter = ((tmp_path / "tp", 1.0),)
    merge(MergeConfig(base=quantized, adapters=adapter, out=tmp_path / "m16"))
    dequantize(DequantConfig(source=quantized, out=tmp_path / "dq32", dtype=torch.float32))
    merge(MergeConfig(base=tmp_path / "dq32", adapters=adapter, out=tmp_path / "via-dq", dtype=torch.bfloat16))
    ours, via = _tensors(tmp_path / "m16"), _tensors(tmp_path / "via-dq")
    assert ours.keys() == via.keys() and all(torch.equal(ours[k], via[k]) for k in ours)  # one rounding, either way
    merge(MergeConfig(base=quantized, adapters=adapter, out=tmp_path / "rq", requantize=True))
    before, after = _tensors(quantized), _tensors(tmp_path / "rq")
    changed = {k for k in before if not torch.equal(_bytes(before[k]), _bytes(after[k]))}
    experts = {k for k in changed if ".mlp.experts." in k}
    assert len(experts) == 2 * 3 * 4  # layer 1's 4 routed experts x gate/up/down, codes and scales
    assert {k for k in changed if "shared_experts" in k or "layers.0.mlp" in k} == set()  # not in the adapter
    assert any("q_b_proj" in k for k in changed)

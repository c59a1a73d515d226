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


def test_verify_checks_quantised_layouts_and_e8m0_scales(fp8_fixtures: Path, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import save_file

    from adaptertool.ops.verify import verify

    for name in ("deepseek_v3-fp8", "gpt_oss-mxfp4"):
        quantized, _, _ = _case(fp8_fixtures, name)
        report = verify(quantized, nan=True)
        assert report.ok, (name, report.problems, report.nonfinite)
    # an FP8 scale on the wrong grid is a problem, found from the headers alone
    quantized, _, _ = _case(fp8_fixtures, "qwen3-fp8")
    broken = tmp_path / "fp8"
    shutil.copytree(quantized, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight_scale_inv"] = torch.ones(1, 1)
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    report = verify(broken)
    assert not report.ok and "model.layers.0.self_attn.q_proj.weight_scale_inv has shape [1, 1]" in report.problems[0]
    # an MXFP4 scale byte 255 is NaN in E8M0: the scan reads the uint8 scales as such
    quantized, _, _ = _case(fp8_fixtures, "gpt_oss-mxfp4")
    broken = tmp_path / "mx"
    shutil.copytree(quantized, broken)
    files = sorted(broken.glob("*.safetensors"))
    key = "model.layers.1.mlp.experts.down_proj_scales"
    for file in files:
        tensors = load_file(file)
        if key in tensors:
            tensors[key][0, 0, 0] = 255
            save_file(tensors, file, metadata={"format": "pt"})
    report = verify(broken, nan=True)
    assert [(bad.tensor, bad.nan) for bad in report.nonfinite] == [(key, 1)]


@pytest.mark.parametrize("name", ["deepseek_v3-fp8-aligned", "qwen3_moe-fp8", "gpt_oss-mxfp4"])
def test_requantized_merge_generates_like_the_16_bit_merge(fp8_fixtures: Path, tmp_path: Path, name: str) -> None:
    # transformers loads what --requantize writes in the base's own format (block-aligned cases: its FP8
    # loader is right there) and greedy decoding follows the 16-bit merge's tokens.
    quantized, _, adapter = _case(fp8_fixtures, name)
    merge(MergeConfig(base=quantized, adapters=((adapter, 1.0),), out=tmp_path / "rq", requantize=True))
    merge(MergeConfig(base=quantized, adapters=((adapter, 1.0),), out=tmp_path / "m16"))
    config = (transformers.Mxfp4Config(dequantize=True) if name.startswith("gpt_oss")
              else transformers.FineGrainedFP8Config(dequantize=True))
    # float32: transformers' grouped expert matmul refuses bf16 experts this narrow (12 columns)
    requantized = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "rq", quantization_config=config,
                                                                    dtype=torch.float32)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m16", dtype=torch.float32)
    prompt = torch.tensor([[3, 17, 29, 41, 5]])
    with torch.no_grad():
        ours = requantized.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        want = merged.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        logits = merged(want[:, :-1]).logits[0, prompt.shape[1] - 1 :]
    top2 = logits.topk(2).values
    tied = (top2[:, 0] - top2[:, 1]) < 0.05 * logits.abs().max()  # a near-tie may go either way
    differ = (ours[0, prompt.shape[1] :] != want[0, prompt.shape[1] :]).nonzero()
    assert differ.numel() == 0 or bool(tied[: int(differ[0]) + 1].any()), (ours, want)

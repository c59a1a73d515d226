"""FP8 bases through quantize, dequantize and merge (16-bit and --requantize), against the format's
definition in float64, the published recipe, and transformers' loaders where they are right
(FineGrainedFP8 on block-aligned shapes; compressed-tensors' decompression)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from adaptertool import AdapterToolError
from adaptertool.ops.merge import MergeConfig, merge
from adaptertool.ops.quantize import QuantConfig, quantize
from adaptertool.ops.dequantize import DequantConfig, dequantize
from tests.ops.test_merge import _ulps

BLOCK = 16


def _quantize_block(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's recipe written plainly: per (partial) block s = amax / 448, q = RNE(w / s)."""
    rows, cols = w.shape
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    s = torch.empty(math.ceil(rows / BLOCK), math.ceil(cols / BLOCK))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            block = w[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK].float()
            amax = block.abs().max().item()
            s[i, j] = amax / 448 if amax else 1.0
            q[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK] = (block / s[i, j]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, s


def _definition(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """q * s in float64, each scale over its (partial) block."""
    grid = s.double().repeat_interleave(BLOCK, 0)[: q.shape[0]].repeat_interleave(BLOCK, 1)[:, : q.shape[1]]
    return q.double() * grid


def _build(root: Path, intermediate: int) -> tuple[Path, Path, Path]:
    """A tiny bf16 Qwen3, its block-FP8 copy (FP8 everywhere but embeddings, head and norms) and a LoRA made on the bf16."""
    import peft

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(
        "qwen3", vocab_size=64, hidden_size=32, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(root / "bf16")
    tensors = {}
    for name, tensor in load_file(root / "bf16" / "model.safetensors").items():
        if tensor.dim() == 2 and "embed" not in name and "lm_head" not in name:
            tensors[name], tensors[name + "_scale_inv"] = _quantize_block(tensor)
        else:
            tensors[name] = tensor
    (root / "fp8").mkdir()
    save_file(tensors, root / "fp8" / "model.safetensors", metadata={"format": "pt"})
    settings = json.loads((root / "bf16" / "config.json").read_text())
    settings["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                       "weight_block_size": [BLOCK, BLOCK]}
    (root / "fp8" / "config.json").write_text(json.dumps(settings))
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(root / "bf16"),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj", "lm_head"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    model.save_pretrained(root / "adapter")
    return root / "fp8", root / "adapter", root / "bf16"


@pytest.fixture(scope="module")
def partial(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return _build(tmp_path_factory.mktemp("partial"), intermediate=40)  # 40 = 2.5 blocks: partial edge blocks


@pytest.fixture(scope="module")
def aligned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return _build(tmp_path_factory.mktemp("aligned"), intermediate=48)


def _deltas(adapter: Path) -> dict[str, torch.Tensor]:
    lora = load_file(adapter / "adapter_model.safetensors")
    settings = json.loads((adapter / "adapter_config.json").read_text())
    scale = settings["lora_alpha"] / settings["r"]
    return {key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight"):
            scale * lora[key.replace("lora_A", "lora_B")].double() @ lora[key].double()
            for key in lora if "lora_A" in key}


def test_dequantize_is_the_definition_rounded_once(partial: tuple[Path, Path, Path], tmp_path: Path) -> None:
    fp8, _, _ = partial
    report = dequantize(DequantConfig(source=fp8, out=tmp_path / "dq", dtype=torch.float32))
    stored = load_file(fp8 / "model.safetensors")
    ours = load_file(tmp_path / "dq" / "model.safetensors")
    assert report.dequantized == 14 and set(ours) == {k for k in stored if not k.endswith("_scale_inv")}
    assert stored["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (2, 3)  # 32 x 40: partial column blocks
    for name, tensor in ours.items():
        if name + "_scale_inv" in stored:
            want = _definition(stored[name], stored[name + "_scale_inv"]).float()
            assert torch.equal(tensor, want), name
        else:
            assert torch.equal(tensor.float(), stored[name].float()), name
    assert "quantization_config" not in json.loads((tmp_path / "dq" / "config.json").read_text())


def test_dequantize_loads_in_transformers_like_its_own_fp8_loader(aligned: tuple[Path, Path, Path], tmp_path: Path) -> None:
    # Block-aligned, so transformers' dequantising loader is a correct oracle (it is not for partial blocks).
    fp8, _, _ = aligned
    dequantize(DequantConfig(source=fp8, out=tmp_path / "dq"))
    ours, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dq", output_loading_info=True)
    assert not any(info.values()), info
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        fp8, quantization_config=transformers.FineGrainedFP8Config(dequantize=True), dtype=torch.bfloat16)
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_merge_into_fp8_writes_16_bit(partial: tuple[Path, Path, Path], tmp_path: Path) -> None:
    fp8, adapter, _ = partial
    report = merge(MergeConfig(base=fp8, adapters=((adapter, 1.0),), out=tmp_path / "m"))
    assert any("14 FP8-BLOCK weights" in note for note in report.notes)
    stored = load_file(fp8 / "model.safetensors")
    ours = load_file(tmp_path / "m" / "model.safetensors")
    deltas = _deltas(adapter)
    assert len(deltas) == 5 and report.merged == 5
    for name, tensor in ours.items():
        base = _definition(stored[name], stored[name + "_scale_inv"]) if name + "_scale_inv" in stored else stored[name].double()
        want = base + deltas.get(name, 0)
        assert tensor.dtype == torch.bfloat16
        assert _ulps(tensor, want) <= 1.0, name  # float32 arithmetic, one rounding to bf16 at the end
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())


def test_requantize_changes_only_what_the_adapter_touches(partial: tuple[Path, Path, Path], tmp_path: Path) -> None:
    fp8, adapter, _ = partial
    report = merge(MergeConfig(base=fp8, adapters=((adapter, 1.0),), out=tmp_path / "rq", requantize=True))
    stored = load_file(fp8 / "model.safetensors")
    ours = load_file(tmp_path / "rq" / "model.safetensors")
    assert set(ours) == set(stored) and all(ours[k].dtype == stored[k].dtype for k in stored)
    deltas = _deltas(adapter)
    changed = {k for k in stored if not torch.equal(ours[k].view(torch.uint8), stored[k].view(torch.uint8))}
    touched = set(deltas) | {name + "_scale_inv" for name in deltas if name + "_scale_inv" in stored}
    assert changed == touched and report.copied == len(stored) - len(touched)
    assert (json.loads((tmp_path / "rq" / "config.json").read_text())["quantization_config"]
            == json.loads((fp8 / "config.json").read_text())["quantization_config"])
    for name in deltas:
        if name + "_scale_inv" not in stored:
            continue  # lm_head: merged in bf16
        q, s = ours[name], ours[name + "_scale_inv"]
        want = _definition(stored[name], stored[name + "_scale_inv"]) + deltas[name]
        # each block re-quantised from the merged float32 weight: within half a code step of its scale
        step = s.double().repeat_interleave(BLOCK, 0)[: q.shape[0]].repeat_interleave(BLOCK, 1)[:, : q.shape[1]]
        assert ((_definition(q, s) - want).abs() <= step * 16 + 1e-12).all(), name
        assert s.max().item() * 448 >= want.abs().max().item() * (1 - 1e-6), name  # nothing clipped


def test_requantized_model_loads_and_predicts_like_the_16_bit_merge(aligned: tuple[Path, Path, Path], tmp_path: Path) -> None:
    fp8, adapter, _ = aligned
    merge(MergeConfig(base=fp8, adapters=((adapter, 1.0),), out=tmp_path / "rq", requantize=True))
    merge(MergeConfig(base=fp8, adapters=((adapter, 1.0),), out=tmp_path / "m16"))
    requantized = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "rq", quantization_config=transformers.FineGrainedFP8Config(dequantize=True), dtype=torch.bfloat16)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m16", dtype=torch.bfloat16)
    ids = torch.tensor([[1, 5, 9, 13, 2, 40, 7]])
    with torch.no_grad():
        a, b = requantized(ids).logits.float(), merged(ids).logits.float()
    assert (a - b).abs().max().item() < 0.05 * b.abs().max().item()


def test_bad_fp8_inputs_are_refused(partial: tuple[Path, Path, Path], tmp_path: Path) -> None:
    fp8, adapter, _ = partial
    tensors = load_file(fp8 / "model.safetensors")
    tensors["model.layers.1.self_attn.q_proj.weight_scale_inv"] = torch.ones(1, 1)
    broken = tmp_path / "broken"
    broken.mkdir()
    save_file(tensors, broken / "model.safetensors")
    (broken / "config.json").write_bytes((fp8 / "config.json").read_bytes())
    with pytest.raises(AdapterToolError, match=r"scale model\.layers\.1\.self_attn\.q_proj\.weight_scale_inv has shape \[1, 1\]"):
        merge(MergeConfig(base=broken, adapters=((adapter, 1.0),), out=tmp_path / "out"))
    config = json.loads((fp8 / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterToolError, match="quant_method is 'gptq'"):
        dequantize(DequantConfig(source=broken, out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_quantize_fp8_block_is_the_published_recipe_and_round_trips(partial: tuple[Path, Path, Path], tmp_path: Path) -> None:
    fp8, _, bf16 = partial
    report = quantize(QuantConfig(source=bf16, out=tmp_path / "q", quant_type="fp8-block", block=(BLOCK, BLOCK)))
    ours, theirs = load_file(tmp_path / "q" / "model.safetensors"), load_file(fp8 / "model.safetensors")
    assert report.quantized == 14 and set(ours) == set(theirs)
    for name, tensor in theirs.items():  # the fixture was made by the recipe written plainly above
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name].view(torch.uint8), tensor.view(torch.uint8)), name
    written = json.loads((tmp_path / "q" / "config.json").read_text())
    assert written["quantization_config"] == json.loads((fp8 / "config.json").read_text())["quantization_config"]
    # quantize -> dequantize (float32, exact) -> quantize gives the same bytes
    dequantize(DequantConfig(source=tmp_path / "q", out=tmp_path / "dq", dtype=torch.float32))
    quantize(QuantConfig(source=tmp_path / "dq", out=tmp_path / "q2", quant_type="fp8-block", block=(BLOCK, BLOCK),
                         dtype=torch.bfloat16))
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "q2" / f).read_bytes() == (tmp_path / "q" / f).read_bytes(), f


def test_quantize_fp8_channel_loads_in_transformers_with_compressed_tensors(aligned: tuple[Path, Path, Path],
                                                                           tmp_path: Path) -> None:
    # The oracle: compressed-tensors' own decompression, as transformers runs it when it loads the checkpoint.
    _, _, bf16 = aligned
    quantize(QuantConfig(source=bf16, out=tmp_path / "q", quant_type="fp8-channel"))
    stored = load_file(tmp_path / "q" / "model.safetensors")
    scale = stored["model.layers.0.self_attn.q_proj.weight_scale"]
    assert scale.dtype == torch.bfloat16 and scale.shape == (32, 1)
    dequantize(DequantConfig(source=tmp_path / "q", out=tmp_path / "dq"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "q", quantization_config=transformers.CompressedTensorsConfig(run_compressed=False), dtype=torch.bfloat16)
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dq", dtype=torch.bfloat16)
    assert theirs.state_dict().keys() == ours.state_dict().keys()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, theirs.state_dict()[name]), name
    quantize(QuantConfig(source=tmp_path / "dq", out=tmp_path / "q2", quant_type="fp8-channel"))  # and it round-trips
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "q2" / f).read_bytes() == (tmp_path / "q" / f).read_bytes(), f


def test_extract_from_an_fp8_base_takes_deltas_against_its_values(partial: tuple[Path, Path, Path], tmp_path: Path) -> None:
    # TUNED: the FP8 release fine-tuned in float32 (here: the adapter merged into it), the common case
    from adaptertool.ops.extract import ExtractConfig, extract

    fp8, adapter, _ = partial
    merge(MergeConfig(base=fp8, adapters=((adapter, 1.0),), out=tmp_path / "tuned", dtype=torch.float32))
    report = extract(ExtractConfig(base=fp8, tuned=tmp_path / "tuned", out=tmp_path / "ex", rank=4, svd="exact",
                                   targets=("q_proj", "down_proj")))
    assert any("BASE holds 14 FP8-BLOCK weights" in note for note in report.notes)
    want, got = _deltas(adapter), _deltas(tmp_path / "ex")
    assert set(got) == {name for name in want if "lm_head" not in name}
    for name, delta in got.items():
        assert (delta - want[name]).abs().max() <= 1e-5 * want[name].abs().max(), name

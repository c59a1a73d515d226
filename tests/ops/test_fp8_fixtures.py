"""The FP8 / MXFP4 fixtures (fixtures/build_fp8.py) are what their manifest says they are.

Every check here uses the owning libraries or float64 arithmetic, never adaptertool: these
fixtures are the oracle of adaptertool's FP8 tests, so they are checked against transformers 5.25
(``FineGrainedFP8Config(dequantize=True)``, ``Mxfp4Config(dequantize=True)``), compressed-tensors'
decompression (through transformers' ``CompressedTensorsConfig(dequantize=True)``) and a second,
vectorised writing of the block-FP8 recipe.

What transformers does with block FP8 (moe-fp8.md 1.3), pinned here: it infers the block from the
scale grid (rows // grid_rows) instead of reading ``weight_block_size``. Block-aligned tensors come
out exactly ``q * s``; a tensor whose shape is not a multiple of the block either makes the load
fail (DeepSeek-V3's kv_a_proj_with_mqa analog, 36x32 on a 5x4 grid) or loads silently wrong (24x32
with 16x16 blocks: it uses 12x16 blocks). So transformers is no oracle for partial edge blocks:
adaptertool's tests use the float64 product for those.
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

BLOCK_ALIGNED = ("qwen3-fp8", "qwen3-fp8-ue8m0", "qwen3_moe-fp8", "deepseek_v3-fp8-aligned")
BLOCK_REFUSED = ("deepseek_v3-fp8", "deepseek_v3-fp8-ue8m0")
BLOCK_SILENTLY_WRONG = "qwen3_moe-fp8-b16"
COMPRESSED = ("llama-ct-fp8-dynamic", "llama-ct-fp8-block", "llama-ct-fp8-tensor")
MXFP4 = "gpt_oss-mxfp4"
FP8_MAX = 448.0


@cache
def _manifest(root: Path) -> dict[str, Any]:
    return json.loads((root / "manifest.json").read_text(encoding="utf-8"))


def _case(root: Path, name: str) -> dict[str, Any]:
    return _manifest(root)["cases"][name]


@cache
def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (any number of shards); callers must not modify them."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def _dtypes(folder: Path) -> dict[str, str]:
    """Each tensor's dtype as the safetensors header spells it."""
    dtypes = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            dtypes.update({key: f.get_slice(key).get_dtype() for key in f.keys()})
    return dtypes


def _spread(scale: torch.Tensor, shape: tuple[int, ...], block: tuple[int, int]) -> torch.Tensor:
    """A (ceil) block grid of scales repeated over the weight's elements, edge blocks cut to fit."""
    rows, cols = shape
    return scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]


def _reference(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """q * s in float64: exact (an e4m3 code has 4 significant bits, a float32 scale 24)."""
    q64, s64 = q.double(), scale.double()
    if block is not None and s64.dim() == 2 and s64.shape != (q.shape[0], 1):
        s64 = _spread(s64, tuple(q.shape), block)
    return q64 * s64


def _transformers_load(folder: Path, quantization_config: Any, dtype: torch.dtype, out: Path) -> dict[str, torch.Tensor]:
    """What transformers makes of a quantised checkpoint: loaded on the CPU, saved, read back (per-expert keys)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization_config, dtype=dtype)
    model.save_pretrained(out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text(encoding="utf-8"))
    return {key: tensor.clone() for key, tensor in _tensors(out).items()}


def test_manifest_describes_every_case(fp8_fixtures: Path) -> None:
    manifest = _manifest(fp8_fixtures)
    assert set(manifest["cases"]) == {*BLOCK_ALIGNED, *BLOCK_REFUSED, BLOCK_SILENTLY_WRONG, *COMPRESSED, MXFP4}
    for name, case in manifest["cases"].items():
        quantized = fp8_fixtures / case["quantized"]
        config = json.loads((quantized / "config.json").read_text(encoding="utf-8"))
        assert config["quantization_config"] == case["quantization_config"], name
        assert "quantization_config" not in json.loads((fp8_fixtures / case["bf16"] / "config.json").read_text())
        dtypes = _dtypes(quantized)
        original = _tensors(fp8_fixtures / case["bf16"])
        for key in case["not_quantized"]:  # every tensor left in 16 bits is the original's, byte for byte
            assert torch.equal(_tensors(quantized)[key], original[key]), (name, key)
            assert dtypes[key] == "BF16", (name, key)
        if case["scheme"] == "mxfp4":
            continue
        for key, info in case["quantized_weights"].items():
            assert dtypes[key] == "F8_E4M3", (name, key)
            scale_key = key + ("_scale_inv" if case["scheme"] == "fp8-block" else "_scale")
            assert list(_tensors(quantized)[scale_key].shape) == info["scale_shape"], (name, key)
            if "block" in case:
                grid = [math.ceil(n / b) for n, b in zip(info["shape"], case["block"])]
                assert info["scale_shape"] == grid, (name, key)
        if "block" in case:
            partial = {key for key, info in case["quantized_weights"].items()
                       if any(n % b for n, b in zip(info["shape"], case["block"]))}
            assert set(case["partial_blocks"]) == partial, name


@pytest.mark.parametrize("name", [*BLOCK_ALIGNED, *BLOCK_REFUSED, BLOCK_SILENTLY_WRONG])
def test_block_fp8_is_deepseeks_recipe_applied_to_the_original(fp8_fixtures: Path, name: str) -> None:
    """A second, vectorised writing of the recipe (zero-padded blocks, amax / 448 in float32, zero
    guard, ue8m0 rounded up by log2) gives the stored scales and codes bit for bit."""
    case = _case(fp8_fixtures, name)
    bn, bk = case["block"]
    ue8m0 = case["quantization_config"].get("scale_fmt") == "ue8m0"
    stored, original = _tensors(fp8_fixtures / case["quantized"]), _tensors(fp8_fixtures / case["bf16"])
    for key in case["quantized_weights"]:
        w = original[key].float()
        rows, cols = w.shape
        padded = torch.zeros(math.ceil(rows / bn) * bn, math.ceil(cols / bk) * bk)
        padded[:rows, :cols] = w
        amax = padded.abs().reshape(padded.shape[0] // bn, bn, padded.shape[1] // bk, bk).amax(dim=(1, 3))
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        if ue8m0:
            scale = torch.exp2(torch.ceil(torch.log2(scale)))
        assert torch.equal(stored[key + "_scale_inv"], scale), (name, key)
        codes = (w / _spread(scale, (rows, cols), (bn, bk))).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        assert torch.equal(stored[key].view(torch.uint8), codes.view(torch.uint8)), (name, key)


@pytest.mark.parametrize("name", BLOCK_ALIGNED)
def test_transformers_dequantizes_aligned_block_fp8_exactly(fp8_fixtures: Path, name: str, tmp_path: Path) -> None:
    """Every dimension a multiple of the block: transformers' float32 load is q * s rounded once,
    and every other tensor is the original's."""
    case = _case(fp8_fixtures, name)
    assert not case["partial_blocks"] and case["transformers_5_25_load"] == "loads, every weight equal to q*s"
    stored = _tensors(fp8_fixtures / case["quantized"])
    loaded = _transformers_load(fp8_fixtures / case["quantized"],
                                transformers.FineGrainedFP8Config(dequantize=True), torch.float32, tmp_path)
    scales = {key + "_scale_inv" for key in case["quantized_weights"]}
    assert set(loaded) == set(stored) - scales
    for key, value in loaded.items():
        if key in case["quantized_weights"]:
            expected = _reference(stored[key], stored[key + "_scale_inv"], tuple(case["block"])).float()
        else:
            expected = stored[key].float()
        assert torch.equal(value, expected), (name, key)


def test_transformers_dequantizes_partial_blocks_silently_wrong(fp8_fixtures: Path, tmp_path: Path) -> None:
    """Qwen3-MoE with 16x16 blocks: the experts (24x32, 32x24, grid 2x2) load without a word, but
    transformers uses 12x16 / 16x12 blocks, so their values are not q * s; the aligned attention
    weights are exact. (moe-fp8.md 1.3; the manifest's per-tensor "transformers_5_25" says so.)"""
    case = _case(fp8_fixtures, BLOCK_SILENTLY_WRONG)
    stored = _tensors(fp8_fixtures / case["quantized"])
    loaded = _transformers_load(fp8_fixtures / case["quantized"],
                                transformers.FineGrainedFP8Config(dequantize=True), torch.float32, tmp_path)
    assert case["partial_blocks"] and all(".mlp.experts." in key for key in case["partial_blocks"])
    for key in case["quantized_weights"]:
        expected = _reference(stored[key], stored[key + "_scale_inv"], tuple(case["block"])).float()
        if key in case["partial_blocks"]:
            assert case["partial_blocks"][key]["transformers_5_25"].startswith("silently wrong")
            assert not torch.equal(loaded[key], expected), key
            assert (loaded[key] - expected).abs().max() > 1e-3, key  # wrong scales, not a rounding
        else:
            assert torch.equal(loaded[key], expected), key


@pytest.mark.parametrize("name", BLOCK_REFUSED)
def test_transformers_refuses_deepseek_partial_blocks(fp8_fixtures: Path, name: str) -> None:
    """kv_a_proj_with_mqa 36x32 on a 5x4 grid (DeepSeek-V3's 576x7168 on 5x56), q_a_proj 20x32 and
    q_b_proj 30x20: "Weight shape (36, 32) not divisible by scale grid (5, 4)" in the load report,
    then from_pretrained raises."""
    case = _case(fp8_fixtures, name)
    refused = [key for key, info in case["partial_blocks"].items() if info["transformers_5_25"].startswith("raises")]
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in refused
    assert case["partial_blocks"]["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]["grid"] == [5, 4]
    with pytest.raises(RuntimeError, match="issues during automatic conversion"):
        transformers.AutoModelForCausalLM.from_pretrained(
            fp8_fixtures / case["quantized"], quantization_config=transformers.FineGrainedFP8Config(dequantize=True),
            dtype=torch.float32)


def test_deepseek_fixture_has_partial_blocks_in_both_dimensions_and_split_shards(fp8_fixtures: Path) -> None:
    case = _case(fp8_fixtures, "deepseek_v3-fp8")
    shapes = {key: tuple(info["shape"]) for key, info in case["partial_blocks"].items()}
    assert shapes["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] == (36, 32)
    assert shapes["model.layers.0.self_attn.q_b_proj.weight"] == (30, 20)  # partial rows and columns
    assert any(info["partial_rows"] and info["partial_cols"] for info in case["partial_blocks"].values())
    assert any(key.endswith(".mlp.experts.0.down_proj.weight") for key in shapes)
    index = json.loads((fp8_fixtures / case["quantized"] / "model.safetensors.index.json").read_text())
    for scale in case["scale_in_other_shard_than_weight"]:
        assert index["weight_map"][scale] != index["weight_map"][scale.removesuffix("_scale_inv")]
    # The unquantised tensors DeepSeek-V3 keeps in 16 bits: router, its bias, norms, embeddings, head.
    kept = set(case["not_quantized"])
    assert {"model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
            "model.layers.0.self_attn.kv_a_layernorm.weight", "model.embed_tokens.weight", "lm_head.weight"} <= kept


@pytest.mark.parametrize("name", ("qwen3-fp8-ue8m0", "deepseek_v3-fp8-ue8m0"))
def test_ue8m0_scales_are_powers_of_two(fp8_fixtures: Path, name: str) -> None:
    case = _case(fp8_fixtures, name)
    assert case["quantization_config"]["scale_fmt"] == "ue8m0"
    stored = _tensors(fp8_fixtures / case["quantized"])
    for key in case["quantized_weights"]:
        mantissa, _ = torch.frexp(stored[key + "_scale_inv"])
        assert stored[key + "_scale_inv"].dtype == torch.float32 and bool((mantissa == 0.5).all()), key


@pytest.mark.parametrize("name", COMPRESSED)
def test_compressed_tensors_decompress_to_q_times_s(fp8_fixtures: Path, name: str, tmp_path: Path) -> None:
    """compressed-tensors decompresses as ``q.to(scale.dtype) * scale``: in the scale's dtype (bf16),
    so its values are q * s rounded once to bf16, whatever dtype the model loads in. Block scales
    cover partial edge blocks on a ceil grid (the library handles them correctly)."""
    case = _case(fp8_fixtures, name)
    stored = _tensors(fp8_fixtures / case["quantized"])
    config = transformers.CompressedTensorsConfig(dequantize=True)
    loaded = _transformers_load(fp8_fixtures / case["quantized"], config, torch.bfloat16, tmp_path)
    block = tuple(case["block"]) if "block" in case else None
    for key, value in loaded.items():
        if key in case["quantized_weights"]:
            assert stored[key + "_scale"].dtype == torch.bfloat16
            expected = _reference(stored[key], stored[key + "_scale"], block).to(torch.bfloat16)
        else:
            expected = stored[key]
        assert torch.equal(value, expected), (name, key)
    companions = {k for k in stored if k.endswith(("_scale", ".input_scale"))}
    assert set(loaded) == set(stored) - companions
    if name == "llama-ct-fp8-block":
        assert case["partial_blocks"]["model.layers.0.mlp.gate_proj.weight"]["grid"] == [3, 2]
        assert case["partial_blocks"]["model.layers.0.mlp.down_proj.weight"]["grid"] == [2, 3]


def test_mxfp4_decodes_to_the_bf16_original(fp8_fixtures: Path, tmp_path: Path) -> None:
    """transformers' Mxfp4 dequantising load and a float64 decoding written here both give the bf16
    original bit for bit (E2M1 codes times powers of two are bf16 numbers)."""
    case = _case(fp8_fixtures, MXFP4)
    stored, original = _tensors(fp8_fixtures / case["quantized"]), _tensors(fp8_fixtures / case["bf16"])
    loaded = _transformers_load(fp8_fixtures / case["quantized"], transformers.Mxfp4Config(dequantize=True),
                                torch.bfloat16, tmp_path)
    assert set(loaded) == set(original)
    for key in original:
        assert torch.equal(loaded[key], original[key]), key
    for key in case["quantized_weights"]:  # (E, out, in / 32, 16) bytes -> (E, in, out) values
        blocks, scales = stored[key + "_blocks"], stored[key + "_scales"]
        assert blocks.dtype == scales.dtype == torch.uint8
        assert 122 <= int(scales.min()) and int(scales.max()) < 130
        nibbles = torch.stack([blocks & 0xF, blocks >> 4], dim=-1).flatten(-2).long()  # low nibble first
        magnitude = nibbles & 0x7
        value = torch.where(magnitude < 2, magnitude.double() / 2,
                            torch.ldexp(1 + (magnitude & 1).double() / 2, (magnitude >> 1) - 1))
        value = torch.where(nibbles >= 8, -value, value) * torch.exp2(scales.double() - 127).unsqueeze(-1)
        decoded = value.flatten(-2).transpose(1, 2)
        assert torch.equal(decoded.to(torch.bfloat16), original[key]), key
        assert torch.equal(decoded, original[key].double()), key  # exact: nothing was rounded


@pytest.mark.parametrize("name", [*BLOCK_ALIGNED, *BLOCK_REFUSED, BLOCK_SILENTLY_WRONG, *COMPRESSED, MXFP4])
def test_adapter_fits_the_bf16_original(fp8_fixtures: Path, name: str) -> None:
    """Every LoRA module names a weight of the original with matching shapes, and no B is zero.
    MoE cases carry per-expert (transformers-4) modules; gpt-oss target_parameters on its experts."""
    case = _case(fp8_fixtures, name)
    original = _tensors(fp8_fixtures / case["bf16"])
    adapter = _tensors(fp8_fixtures / case["adapter"])
    config = json.loads((fp8_fixtures / case["adapter"] / "adapter_config.json").read_text(encoding="utf-8"))
    rank = config["r"]
    modules = {key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for key in adapter}
    assert modules
    for module in modules:
        a, b = adapter[f"base_model.model.{module}.lora_A.weight"], adapter[f"base_model.model.{module}.lora_B.weight"]
        assert bool(b.abs().gt(0).all()) and bool(a.abs().gt(0).any()), module
        if module.endswith(".mlp.experts") or module.endswith(".mlp.experts.base_layer"):
            assert case["model_type"] == "gpt_oss"  # target_parameters, fused: (E*r, in) and (out, E*r)
            continue
        out_features, in_features = original[module + ".weight"].shape
        assert a.shape == (rank, in_features) and b.shape == (out_features, rank), module
    if case["model_type"] in ("qwen3_moe", "deepseek_v3"):
        assert any(".mlp.experts.3.down_proj" in module for module in modules)
        assert any("self_attn" in module for module in modules)
    if case["model_type"] == "deepseek_v3":
        assert any(module.endswith("kv_a_proj_with_mqa") for module in modules)  # a partial-block target
    if case["model_type"] == "gpt_oss":
        assert sorted(config["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
        assert any(module.endswith(".mlp.experts.base_layer") for module in modules)

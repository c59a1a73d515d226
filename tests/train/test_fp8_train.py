"""LoRA on an FP8 base: block FP8 (partial edge blocks and aligned) and compressed-tensors per channel,
written by ``adaptertool quantize`` from the word-level ``tiny`` Llama. The oracles: the same model
dequantised to float32 by ``adaptertool dequantize`` (the format's definition, tested in
tests/ops/test_fp8_pipelines.py), and transformers' own dequantising loaders where they are right
(FineGrainedFP8 on block-aligned shapes only, moe-fp8.md 1.3; compressed-tensors' decompression).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import adaptertool.quant.fp8 as fp8_module
from adaptertool.cli import cli
from adaptertool.errors import InputError, OptionError
from adaptertool.io import open_adapter
from adaptertool.ops.dequantize import DequantConfig, dequantize
from adaptertool.ops.quantize import QuantConfig, quantize
from adaptertool.quant import Fp8Scheme, quantize_fp8
from adaptertool.training import Decoder, Fp8Weight, LoraSpec, load_decoder
from tests.train import batch
from tests.train.test_lora import _loss, _randomise_b_

transformers = pytest.importorskip("transformers")

# (--format, --block): 16x24 leaves partial edge blocks in every Linear (32 and 64 columns)
CASES = {"block-partial": ("fp8-block", (16, 24)), "block-aligned": ("fp8-block", (16, 16)),
         "ct-channel": ("fp8-channel", (128, 128))}


@pytest.fixture(scope="module")
def fp8_bases(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """{case: (FP8 folder with the tokenizer, its float32 dequantisation)}."""
    root = tmp_path_factory.mktemp("fp8-train")
    bases = {}
    for case, (fmt, block) in CASES.items():
        quantize(QuantConfig(source=tiny["base"], out=root / case, quant_type=fmt, block=block))
        dequantize(DequantConfig(source=root / case, out=root / f"{case}-dq", dtype=torch.float32))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tiny["base"] / name, root / case / name)
        bases[case] = (root / case, root / f"{case}-dq")
    return bases


def _fp8_weights(model: Decoder) -> dict[str, Fp8Weight]:
    return {name.removesuffix(".base.quantized"): m for name, m in model.named_modules() if isinstance(m, Fp8Weight)}


def _step(folder: Path) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Logits, LoRA gradients (B randomised: at 0 A's gradient is 0) and FP8 weights of one float32 step."""
    model = load_decoder(folder, lora=LoraSpec(rank=4, dropout=0.0), seed=3)
    _randomise_b_(model)
    ids, mask = batch(model.config.vocab_size, seed=5)
    logits = model(ids, attention_mask=mask)
    _loss(logits, ids, mask).backward()  # an FP8 backward expands W again from the codes
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, len(_fp8_weights(model))


def _assert_same_step(fp8: Path, dense: Path, *, fp8_weights: int) -> None:
    (logits, grads, count), (want_logits, want_grads, none) = _step(fp8), _step(dense)
    assert (count, none) == (fp8_weights, 0)
    torch.testing.assert_close(logits, want_logits, atol=1e-6, rtol=0)  # measured: 0 (the same decode, rounded once)
    assert grads.keys() == want_grads.keys()
    for param, grad in want_grads.items():
        torch.testing.assert_close(grads[param], grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_lora_gradients_equal_the_dequantised_base(fp8_bases: dict[str, tuple[Path, Path]],
                                                               case: str) -> None:
    fp8, dense = fp8_bases[case]
    _assert_same_step(fp8, dense, fp8_weights=14)


# Checkpoints the owning recipes wrote (fixtures/build_fp8.py): compressed-tensors' own library for
# the ct cases, power-of-two scales, and a Qwen3-MoE whose per-expert weights have partial blocks.
@pytest.mark.parametrize(("case", "fp8_weights"), [("qwen3-fp8-ue8m0", 14), ("qwen3_moe-fp8-b16", 2 * (4 + 4 * 3)),
                                                    ("llama-ct-fp8-block", 14), ("llama-ct-fp8-tensor", 14),
                                                    ("llama-ct-fp8-dynamic", 14)])
def test_published_fp8_layouts_train_like_their_dequantisation(fp8_fixtures: Path, tmp_path: Path, case: str,
                                                              fp8_weights: int) -> None:
    fp8 = fp8_fixtures / json.loads((fp8_fixtures / "manifest.json").read_text())["cases"][case]["quantized"]
    dequantize(DequantConfig(source=fp8, out=tmp_path / "dq", dtype=torch.float32))
    _assert_same_step(fp8, tmp_path / "dq", fp8_weights=fp8_weights)


@pytest.mark.parametrize("case", ["block-aligned", "ct-channel"])
def test_transformers_dequantising_load_gives_our_weights_and_logits(fp8_bases: dict[str, tuple[Path, Path]],
                                                                     case: str) -> None:
    fp8, _ = fp8_bases[case]
    settings = (transformers.FineGrainedFP8Config(dequantize=True) if case.startswith("block")
                else transformers.CompressedTensorsConfig(dequantize=True))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(fp8, quantization_config=settings,
                                                               dtype=torch.float32).eval()
    ours = load_decoder(fp8, lora=LoraSpec(dropout=0.0)).eval()
    for name, weight in _fp8_weights(ours).items():
        assert torch.equal(weight.dequantize(torch.float32), theirs.get_submodule(name).weight), name
    ids, mask = batch(ours.config.vocab_size, seed=1)
    with torch.no_grad():  # measured 3e-8: float32 summation order differs between the two attention paths
        torch.testing.assert_close(ours(ids, attention_mask=mask)[mask],
                                   theirs(input_ids=ids, attention_mask=mask.long()).logits[mask], atol=1e-6, rtol=0)


def test_fp8_linears_stay_one_byte_codes_and_train_in_bf16(fp8_bases: dict[str, tuple[Path, Path]]) -> None:
    fp8, _ = fp8_bases["block-partial"]
    model = load_decoder(fp8, lora=LoraSpec(rank=4), dtype=torch.bfloat16)
    weights = _fp8_weights(model)
    assert len(weights) == 14
    for name, weight in weights.items():
        linear = model.get_submodule(name).base
        assert linear.weight is None  # no dense copy beside the codes
        held = [*weight.buffers(), *linear.parameters(recurse=False)]
        assert weight.codes.dtype == torch.float8_e4m3fn and weight.codes.shape == weight.shape
        # 1 byte a weight plus one float32 scale per 16x24 block (at most ceil(out/16) * ceil(in/24))
        out, inp = weight.shape
        assert sum(t.numel() * t.element_size() for t in held) == out * inp + 4 * math.ceil(out / 16) * math.ceil(inp / 24)
    ids, mask = batch(model.config.vocab_size)
    _randomise_b_(model)
    logits = model(ids, attention_mask=mask)
    _loss(logits.float(), ids, mask).backward()  # codes decoded to bf16 (rounded once), forward and backward
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
               for p in model.parameters() if p.requires_grad)


def test_qlora_on_an_fp8_base_is_refused(fp8_bases: dict[str, tuple[Path, Path]]) -> None:
    fp8, _ = fp8_bases["block-partial"]
    with pytest.raises(OptionError, match=r"is an FP8 checkpoint: train keeps its FP8 codes as they are .*drop --qlora"):
        load_decoder(fp8, lora=LoraSpec(), qlora=True)


def test_an_fp8_head_is_refused(fp8_bases: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    fp8 = shutil.copytree(fp8_bases["block-aligned"][0], tmp_path / "fp8")
    tensors = load_file(fp8 / "model.safetensors")
    scheme = Fp8Scheme(weight="lm_head.weight", scale="lm_head.weight_scale_inv", convention="fp8", strategy="block",
                       block=(16, 16))
    tensors["lm_head.weight"], tensors["lm_head.weight_scale_inv"] = quantize_fp8(tensors["lm_head.weight"], scheme)
    save_file(tensors, fp8 / "model.safetensors")
    with pytest.raises(InputError, match=r"FP8 tensor lm_head.weight is not a Linear weight in the transformer blocks"):
        load_decoder(fp8, lora=LoraSpec())


@pytest.mark.parametrize(("tensor", "bad", "message"), [
    ("weight", 0x7F, r"FP8 weight model.layers.1.mlp.up_proj.weight holds NaN codes; the checkpoint is corrupt"),
    ("weight_scale_inv", float("nan"), r"FP8 scale model.layers.1.mlp.up_proj.weight_scale_inv holds a scale that is NaN")])
def test_corrupt_codes_or_scales_are_refused_at_load_and_not_checked_again(
        fp8_bases: dict[str, tuple[Path, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tensor: str,
        bad: float, message: str) -> None:
    fp8 = shutil.copytree(fp8_bases["block-aligned"][0], tmp_path / "fp8")
    tensors = load_file(fp8 / "model.safetensors")
    name = f"model.layers.1.mlp.up_proj.{tensor}"
    if tensor == "weight":
        tensors[name].view(torch.uint8)[3, 5] = int(bad)
    else:
        tensors[name][0, 0] = bad
    save_file(tensors, fp8 / "model.safetensors")
    with pytest.raises(InputError, match=message):
        load_decoder(fp8, lora=LoraSpec())
    # a sound base: checked at load, then every decode (forward and backward) runs without the value checks
    checks, decode = [], fp8_module._codes_shifted

    def recorded(*args: Any, nan_check: bool, **kwargs: Any) -> torch.Tensor:
        checks.append(nan_check)
        return decode(*args, nan_check=nan_check, **kwargs)

    monkeypatch.setattr(fp8_module, "_codes_shifted", recorded)
    model = load_decoder(fp8_bases["block-aligned"][0], lora=LoraSpec(rank=4, dropout=0.0))
    ids, mask = batch(model.config.vocab_size, seed=5)
    _loss(model(ids, attention_mask=mask), ids, mask).backward()
    assert checks and not any(checks)


@pytest.mark.parametrize("case", ["block-partial", "ct-channel"])
def test_cli_trains_a_peft_adapter_on_an_fp8_base(fp8_bases: dict[str, tuple[Path, Path]], tiny: dict[str, Path],
                                                 tmp_path: Path, case: str) -> None:
    fp8, _ = fp8_bases[case]
    out = tmp_path / "adapter"
    args = ["train", str(fp8), str(tiny["train"]), str(out), "--eval", str(tiny["eval"]), "--rank", "4",
            "--seq-len", "16", "--max-steps", "12", "--lr", "1e-2", "--device", "cpu", "--warmup-steps", "2", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["steps"] == 12 and report["eval_loss"] < report["eval_loss_start"]
    config, weights, _ = open_adapter(out)
    with weights:
        assert len(weights) == 2 * 7 * 2  # A and B of 7 Linears in each of 2 layers
    assert config["base_model_name_or_path"] == str(fp8) and config["peft_type"] == "LORA"

"""Gemma 2, Gemma 3 (text) and Phi-3 in the native decoder against transformers 5.25 and PEFT 0.21,
in float32 on the CPU: logits, LoRA/DoRA gradients, the `train` CLI's adapter loaded by PEFT, and
QLoRA, gradient checkpointing and resume on each family.

The tiny random models (tests/train FAMILIES) exercise what each family adds: Gemma 2's attention
and final soft-caps (small enough to bend), sliding/global alternation, Gemma 3's q/k norms and
per-kind RoPE, Phi-3's fused projections, partial rotary and LongRoPE (long factors past 6 positions).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from adaptertool import AdapterToolError
from adaptertool.cli import cli
from adaptertool.io import open_adapter
from adaptertool.training import DecoderConfig, FourBitWeight, LoraSpec, load_decoder
from adaptertool.training.fused import geglu, head_cross_entropy, rms_norm
from tests.train import FAMILIES, assert_logits_match, batch, load_hf_model, next_token_targets, write_hf_model
from tests.train.test_lora import _loss, _peft_model, _randomise_b_

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

NAMES = list(FAMILIES)
LORA = LoraSpec(rank=4, alpha=8.0, dropout=0.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: write_hf_model(root / name, name, seed=10 + i) for i, name in enumerate(NAMES)}


@pytest.fixture(scope="module")
def word_models(tmp_path_factory: pytest.TempPathFactory, tiny: dict[str, Path]) -> dict[str, Path]:
    """The families with the `tiny` fixture's word-level tokenizer (17 words) beside them, for CLI runs."""
    root = tmp_path_factory.mktemp("families-words")
    vocab = len(json.loads((tiny["base"] / "tokenizer.json").read_text())["model"]["vocab"])
    folders = {}
    for i, name in enumerate(NAMES):
        folder = write_hf_model(root / name, name, seed=20 + i, vocab_size=vocab)
        for side in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tiny["base"] / side, folder / side)
        folders[name] = folder
    return folders


@pytest.mark.parametrize("length", [9, 6], ids=["long", "short"])  # Phi-3: LongRoPE's long / short factors
@pytest.mark.parametrize("name", NAMES)
def test_forward_matches_transformers(models: dict[str, Path], name: str, length: int) -> None:
    ours = load_decoder(models[name], lora=LORA).eval()
    theirs = load_hf_model(models[name])
    ids, mask = batch(ours.config.vocab_size, length=length)  # left- and right-padded rows and a full one
    assert_logits_match(ours, theirs, ids, mask, atol=1e-5)  # measured <= 5.4e-6


def test_config_reads_what_each_family_adds(models: dict[str, Path]) -> None:
    gemma2, gemma3, phi3 = (DecoderConfig.from_dict(json.loads((models[n] / "config.json").read_text())) for n in NAMES)
    assert (gemma2.attn_logit_softcapping, gemma2.final_logit_softcapping, gemma2.sliding_layers) == (1.5, 2.5, (0,))
    assert gemma2.gemma_norms and gemma2.embed_scale and gemma2.activation == "gelu_tanh" and gemma2.tie_word_embeddings
    assert gemma2.attention_scale == 12**-0.5 and not gemma2.qk_norm
    assert gemma3.qk_norm and gemma3.attn_logit_softcapping is None and gemma3.sliding_layers == (0,)
    assert (gemma3.rope_theta, gemma3.local_rope_theta, gemma3.rope_scaling) == (10000.0, 100.0, {"rope_type": "linear", "factor": 2.0})
    assert phi3.fused_projections and phi3.rotary_dim == 6 and phi3.sliding_layers == (0, 1)
    assert phi3.rope_scaling is not None and phi3.rope_scaling["original_max_position_embeddings"] == 6


def test_v4_configs_read_as_transformers_5_writes_them(models: dict[str, Path]) -> None:
    v5 = json.loads((models["gemma3_text"] / "config.json").read_text())
    flat = {k: v for k, v in v5.items() if k not in ("rope_parameters", "layer_types")}
    v4 = {**flat, "rope_theta": 10000.0, "rope_local_base_freq": 100.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0},
          "sliding_window_pattern": 2}  # layers 0 sliding, 1 global
    assert DecoderConfig.from_dict(v4) == DecoderConfig.from_dict(v5)
    phi = json.loads((models["phi3"] / "config.json").read_text())
    rope = dict(phi["rope_parameters"])
    old = {**{k: v for k, v in phi.items() if k != "rope_parameters"}, "rope_theta": rope.pop("rope_theta"), "partial_rotary_factor": rope.pop("partial_rotary_factor"),
           "rope_scaling": {**{k: v for k, v in rope.items() if k != "rope_type"}, "type": "su"}}  # su: LongRoPE's old name
    assert DecoderConfig.from_dict(old) == DecoderConfig.from_dict(phi)


def test_family_settings_train_cannot_honour_are_refused(models: dict[str, Path]) -> None:
    gemma3 = json.loads((models["gemma3_text"] / "config.json").read_text())
    with pytest.raises(AdapterToolError, match="use_bidirectional_attention is set"):
        DecoderConfig.from_dict({**gemma3, "use_bidirectional_attention": True})
    with pytest.raises(AdapterToolError, match="hidden_activation 'gelu' is not supported"):
        DecoderConfig.from_dict({**gemma3, "hidden_activation": "gelu"})
    phi3 = json.loads((models["phi3"] / "config.json").read_text())
    short = {**phi3, "rope_parameters": {**phi3["rope_parameters"], "short_factor": [1.0]}}
    with pytest.raises(AdapterToolError, match="short_factor must list 3 numbers"):
        DecoderConfig.from_dict(short)
    llama = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
             "num_hidden_layers": 1, "num_attention_heads": 2, "partial_rotary_factor": 0.5}
    with pytest.raises(AdapterToolError, match="partial_rotary_factor is supported by train for Phi3ForCausalLM only"):
        DecoderConfig.from_dict(llama)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("name", NAMES)
def test_gradients_match_peft(models: dict[str, Path], name: str, dora: bool) -> None:
    spec = LoraSpec(rank=4, alpha=8.0, dropout=0.0, dora=dora)
    ours = load_decoder(models[name], lora=spec, seed=1)
    _randomise_b_(ours)
    theirs = _peft_model(models[name], spec, ours)
    ids, mask = batch(ours.config.vocab_size, seed=2)
    _loss(ours(ids, attention_mask=mask), ids, mask).backward()
    _loss(theirs(input_ids=ids, attention_mask=mask.long()).logits, ids, mask).backward()
    peft_grads = {n.replace(".default", "").removesuffix(".weight"): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    our_grads = {f"base_model.model.{n}": p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert our_grads.keys() == peft_grads.keys()
    leaves = {n.split(".")[-2] for n in our_grads}  # all-linear: PEFT's fused names for Phi-3
    assert leaves == ({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"} if name == "phi3" else
                      {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
    for key, grad in our_grads.items():
        assert grad is not None and grad.abs().max() > 0, key
        torch.testing.assert_close(grad, peft_grads[key], atol=1e-5, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("name", NAMES)
def test_checkpointed_qlora_dora_gradients_equal_the_plain_run(models: dict[str, Path], name: str) -> None:
    """Gradient checkpointing (with dropout, replayed) gives the same gradients on a 4-bit DoRA model;
    the fused loss (soft-capped for Gemma 2) equals cross-entropy of the logits."""
    spec = LoraSpec(rank=4, dropout=0.1, dora=True)
    results = []
    for checkpointed in (False, True):
        model = load_decoder(models[name], lora=spec, qlora=True, seed=3, gradient_checkpointing=checkpointed)
        ids, mask = batch(model.config.vocab_size, seed=3)
        targets = next_token_targets(ids, mask)
        assert sum(isinstance(m, FourBitWeight) for m in model.modules()) == len(model.linear_names())
        _randomise_b_(model)
        torch.manual_seed(0)
        if checkpointed:
            loss = model.loss_sum(ids, targets, attention_mask=mask, chunk_tokens=5)
        else:
            logits = model(ids, attention_mask=mask)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-4, rtol=1e-6)
    for key, grad in results[0][1].items():
        assert grad.abs().max() > 0, key
        torch.testing.assert_close(results[1][1][key], grad, atol=1e-5, rtol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_trains(models: dict[str, Path], name: str) -> None:
    """The loop's CUDA mode (bf16 base, bf16 autocast), run on the CPU: GeGLU, the (1 + w) norms, the
    capped attention and loss and the fused projections' backwards cope with mixed dtypes."""
    spec = LoraSpec(rank=4, dora=True)
    model = load_decoder(models[name], lora=spec, qlora=True, dtype=torch.bfloat16, seed=2, gradient_checkpointing=True)
    reference = load_decoder(models[name], lora=spec, qlora=True, seed=2)  # the same NF4 weights, in float32
    ids, mask = batch(model.config.vocab_size, seed=3)
    targets = next_token_targets(ids, mask)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss_sum(ids, targets, attention_mask=mask)
    loss.backward()
    for param in (p for p in model.parameters() if p.requires_grad):
        assert param.grad is not None and param.grad.dtype == torch.float32 and torch.isfinite(param.grad).all()
    torch.manual_seed(0)
    with torch.no_grad():
        exact = reference.train().loss_sum(ids, targets, attention_mask=mask)
    torch.testing.assert_close(loss.detach(), exact, rtol=0.02, atol=0)  # bf16 keeps ~3 significant digits


def _train(base: Path, data: Path, out: Path, *extra: str) -> dict[str, object]:
    args = ["train", str(base), str(data), str(out), "--rank", "4", "--seq-len", "12", "--batch-size", "4",
            "--max-steps", "4", "--lr", "1e-2", "--device", "cpu", "--json", *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("name", NAMES)
def test_trained_adapter_loads_in_peft_and_gives_our_logits(word_models: dict[str, Path], tiny: dict[str, Path],
                                                            tmp_path: Path, name: str) -> None:
    report = _train(word_models[name], tiny["train"], tmp_path / "out", "--eval", str(tiny["eval"]), "--dropout", "0")
    assert report["eval_loss"] < report["eval_loss_start"]
    config, weights, _ = open_adapter(tmp_path / "out")
    with weights:
        tensors = {key: weights.read(key) for key in weights}
    assert config["target_modules"] == (["down_proj", "gate_up_proj", "o_proj", "qkv_proj"] if name == "phi3" else
                                        ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"])
    assert len(tensors) == 2 * 2 * len(config["target_modules"])  # A and B per Linear, 2 layers
    ours = load_decoder(word_models[name], lora=LoraSpec(rank=4, alpha=4.0, dropout=0.0)).eval()
    ours.load_adapter_state_dict(tensors)
    theirs = peft.PeftModel.from_pretrained(load_hf_model(word_models[name]), tmp_path / "out").eval()
    ids, mask = batch(ours.config.vocab_size, seed=4)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
        want = theirs(input_ids=ids, attention_mask=mask.long()).logits
        base = load_hf_model(word_models[name])(input_ids=ids, attention_mask=mask.long()).logits
    assert (want - base)[mask].abs().max() > 1e-2  # the adapter moved the logits
    torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_qlora_dora_checkpointed_run_resumes_to_the_same_adapter(word_models: dict[str, Path], tiny: dict[str, Path],
                                                                 tmp_path: Path, name: str) -> None:
    options = ("--qlora", "--dora", "--gradient-checkpointing", "--save-every", "2", "--checkpoint-dir")
    whole = _train(word_models[name], tiny["train"], tmp_path / "whole", *options, str(tmp_path / "ckpts"))
    assert math.isfinite(whole["train_loss"])
    resumed = _train(word_models[name], tiny["train"], tmp_path / "resumed", *options, str(tmp_path / "ckpts2"),
                     "--resume", str(tmp_path / "ckpts" / "step-000002"))
    assert resumed["train_loss"] == whole["train_loss"]
    file = "adapter_model.safetensors"
    assert (tmp_path / "resumed" / file).read_bytes() == (tmp_path / "whole" / file).read_bytes()
    config, _, _ = open_adapter(tmp_path / "whole")
    assert config["use_dora"] is True


@pytest.mark.parametrize("softcap", [None, 0.7])
def test_head_cross_entropy_softcap_against_float64_autograd(softcap: float | None) -> None:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 5, generator=generator).requires_grad_()
    weight, targets = torch.randn(11, 5, generator=generator), torch.randint(0, 11, (7,), generator=generator)
    loss = head_cross_entropy(hidden, weight, targets, 3, softcap=softcap)  # 3 rows a chunk: a short last chunk
    loss.backward()
    wide = hidden.detach().double().requires_grad_()
    logits = wide @ weight.double().T
    logits = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    want = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden.grad.double(), wide.grad, atol=1e-6, rtol=0)


def test_geglu_and_offset_rms_norm_match_autograd() -> None:
    generator = torch.Generator().manual_seed(1)
    gate, up, grad = (torch.randn(3, 4, 6, dtype=torch.float64, generator=generator) for _ in range(3))
    leaves = [t.clone().requires_grad_() for t in (gate, up)]
    (torch.nn.functional.gelu(leaves[0], approximate="tanh") * leaves[1]).backward(grad)
    ours = [t.clone().requires_grad_() for t in (gate, up)]
    geglu(*[t * 1 for t in ours]).backward(grad)  # the backward works in its inputs: give it copies
    for mine, want in zip(ours, leaves):
        torch.testing.assert_close(mine.grad, want.grad, atol=1e-12, rtol=1e-10)
    # the norm works in float32 whatever x's dtype: a float32 x against the float64 formula
    x, weight = gate.float().requires_grad_(), torch.randn(6, dtype=torch.float64, generator=generator) * 0.1
    y = rms_norm(x, weight.float(), 1e-6, offset=True)
    y.backward(grad.float())
    reference = gate.clone().requires_grad_()
    want = reference * torch.rsqrt(reference.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + weight)
    want.backward(grad)
    torch.testing.assert_close(y.double(), want.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(x.grad.double(), reference.grad, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_gemma3_270m_matches_transformers(gemma3_270m: Path, tmp_path: Path) -> None:
    # The real weights and config, in float64 (as SmolLM2's test, for the same reason: float32's
    # summation noise through 18 layers), with the sliding window cut from 512 to 16 in the config
    # both models read, so the 48-token rows cross it.
    folder = tmp_path / "gemma3"
    folder.mkdir()
    for path in gemma3_270m.iterdir():
        if path.name != "config.json":
            (folder / path.name).symlink_to(path)
    config = json.loads((gemma3_270m / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["layer_types"].count("full_attention") == 3
    (folder / "config.json").write_text(json.dumps({**config, "sliding_window": 16}))
    ours = load_decoder(folder, lora=LORA, dtype=torch.float64).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    ids, mask = batch(ours.config.vocab_size, length=48)
    assert_logits_match(ours, theirs, ids, mask, atol=1e-5)  # measured 6.2e-6 (ours are returned in float32)


@pytest.mark.slow
def test_gemma3_270m_short_run_lowers_held_out_loss(gemma3_270m: Path, tmp_path: Path) -> None:
    """The real Gemma 3 270M learns the arithmetic prompts SmolLM2's run learns (tests/ops/test_train.py),
    with the same settings, and the adapter holds every block Linear's factors."""
    from adaptertool.ops.train import TrainConfig, train
    from tests.ops.test_train import SMOL, _arithmetic, _write_jsonl

    data = _write_jsonl(tmp_path / "train.jsonl", _arithmetic(0, 24))
    held_out = _write_jsonl(tmp_path / "val.jsonl", _arithmetic(1, 8))
    report = train(TrainConfig(base=gemma3_270m, data=data, out=tmp_path / "adapter", eval_data=held_out, **SMOL))
    assert report.steps == 6 and report.data.truncated == 0
    # Measured: 1.21 -> 0.31 nats per completion token in 6 steps (8.5 s on 2 cores)
    assert report.eval_loss_start is not None and report.eval_loss < 0.5 * report.eval_loss_start
    _, weights, _ = open_adapter(tmp_path / "adapter")
    with weights:
        assert len(weights) == 2 * 7 * 18  # A and B of 7 Linears in each of 18 layers

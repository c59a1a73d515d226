"""The native decoder against transformers 5.24 (the oracle), in float32 on the CPU.

Tiny random models of each supported architecture are built and saved with transformers itself
(tests/train/__init__.py); the slow case loads the real SmolLM2-135M (3 bf16 shards, tied embeddings)
and compares in float64, where float32's CPU-dependent summation noise is out of the way.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from adaptertool import AdapterToolError
from adaptertool.ops.examples import TINY, write_llama
from adaptertool.training import (
    SUPPORTED_ARCHITECTURES,
    Decoder,
    DecoderConfig,
    LoraSpec,
    load_decoder,
)
from tests.train import ARCHITECTURES, batch, load_hf_model, write_hf_model

transformers = pytest.importorskip("transformers")

NO_DROPOUT = LoraSpec(dropout=0.0)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {name: write_hf_model(root / name, name, seed=i) for i, name in enumerate(ARCHITECTURES)}


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_forward_matches_transformers(hf_models: dict[str, Path], name: str, padded: bool) -> None:
    ours = load_decoder(hf_models[name], lora=NO_DROPOUT).eval()
    theirs = load_hf_model(hf_models[name])
    ids, mask = batch(ours.config.vocab_size, length=9)  # 9 > sliding_window 4 of mistral/qwen2
    with torch.no_grad():
        got = ours(ids, attention_mask=mask if padded else None)
        want = theirs(ids, attention_mask=mask.long() if padded else None).logits
    assert got.dtype == torch.float32 and got.shape == (3, 9, ours.config.vocab_size)
    real = mask if padded else torch.ones_like(mask)  # padded positions' logits mean nothing in either model
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=0)
    assert torch.isfinite(got).all()  # padded rows too: they may be fed to a masked loss


def test_config_reads_each_architecture(hf_models: dict[str, Path]) -> None:
    configs = {name: DecoderConfig.from_dict(json.loads((folder / "config.json").read_text())) for name, folder in hf_models.items()}
    assert configs["llama3"].rope_scaling is not None and configs["llama3"].rope_scaling["rope_type"] == "llama3"
    assert configs["llama3"].attention_bias and configs["llama3"].o_proj_bias and configs["llama3"].mlp_bias
    assert configs["mistral"].sliding_window == 4 and configs["mistral"].sliding_layers == (0, 1)
    assert configs["qwen2"].attention_bias and not configs["qwen2"].o_proj_bias and configs["qwen2"].sliding_layers == (1,)
    assert configs["qwen3"].qk_norm and configs["qwen3"].head_dim == 16 and configs["qwen3"].tie_word_embeddings


def test_position_ids_match_transformers(hf_models: dict[str, Path]) -> None:
    ours = load_decoder(hf_models["llama3"], lora=NO_DROPOUT).eval()
    theirs = load_hf_model(hf_models["llama3"])
    ids, _ = batch(ours.config.vocab_size, length=9)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]]).expand(3, -1)  # packed documents restart at 0
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, position_ids=positions), theirs(ids, position_ids=positions).logits,
                                   atol=1e-4, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients(hf_models: dict[str, Path]) -> None:
    grads = []
    for flag in (False, True):
        model = load_decoder(hf_models["qwen3"], lora=LoraSpec(rank=4, dropout=0.1), seed=3, gradient_checkpointing=flag)
        with torch.no_grad():  # B = 0 at init would leave A's gradient zero
            for name, param in model.named_parameters():
                if name.endswith("lora_B"):
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
        ids, mask = batch(model.config.vocab_size)
        torch.manual_seed(0)  # dropout: the recomputation must replay the same masks
        model(ids, attention_mask=mask)[mask].logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7 * 2
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("chunk", [4, 1024])
def test_loss_sum_equals_cross_entropy_of_the_logits(hf_models: dict[str, Path], chunk: int) -> None:
    results = []
    for fused in (False, True):
        model = load_decoder(hf_models["qwen3"], lora=LoraSpec(rank=4, dropout=0.0), seed=5)  # tied output embedding
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("lora_B"):
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
        ids, mask = batch(model.config.vocab_size)
        targets = torch.where(mask, ids, -100).roll(-1, dims=1)
        targets[:, -1] = -100
        targets[2, :4] = -100  # a prompt: no loss there
        if fused:
            loss = model.loss_sum(ids, targets, attention_mask=mask, chunk_tokens=chunk)
        else:
            logits = model(ids, attention_mask=mask)
            loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1), reduction="sum")
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-4, rtol=1e-6)
    for name, grad in results[0][1].items():
        assert grad.abs().max() > 0
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-5, rtol=1e-5)  # float32 sums in another order
    with torch.no_grad():
        assert torch.isclose(model.loss_sum(ids, targets, attention_mask=mask), results[0][0], atol=1e-4, rtol=1e-6)


def test_only_lora_tensors_train(hf_models: dict[str, Path]) -> None:
    model = load_decoder(hf_models["qwen2"], lora=LoraSpec(targets=("q_proj", "mlp.down_proj"), dora=True))
    trainable = sorted(n.split(".", 3)[-1] for n, p in model.named_parameters() if p.requires_grad)
    expected = [f"{m}.{p}" for m in ("mlp.down_proj", "self_attn.q_proj") for p in ("lora_A", "lora_B", "lora_magnitude_vector")]
    assert trainable == sorted(expected * 2)


def test_bf16_compute_returns_float32_logits(hf_models: dict[str, Path]) -> None:
    wide = load_decoder(hf_models["mistral"], lora=NO_DROPOUT).eval()
    narrow = load_decoder(hf_models["mistral"], lora=NO_DROPOUT, dtype=torch.bfloat16).eval()
    assert narrow.model.embed_tokens.weight.dtype == torch.bfloat16
    ids, mask = batch(wide.config.vocab_size)
    with torch.no_grad():
        got, want = narrow(ids, attention_mask=mask), wide(ids, attention_mask=mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got[mask], want[mask], atol=0.1, rtol=0.05)  # bf16 keeps ~3 significant digits


def test_sharded_and_single_file_checkpoints_load_alike(tiny_models: dict[tuple[str, bool], Path]) -> None:
    single, sharded = (load_decoder(tiny_models[("bf16", s)], lora=NO_DROPOUT).eval() for s in (False, True))
    ids, mask = batch(TINY.vocab)
    with torch.no_grad():
        assert torch.equal(single(ids, attention_mask=mask), sharded(ids, attention_mask=mask))
    assert single.model.embed_tokens.weight.dtype == torch.float32  # bf16 on disk, float32 as asked


def test_unsupported_architecture_lists_the_supported(tmp_path: Path) -> None:
    write_llama(tmp_path / "m", TINY, dtype=torch.float32)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(AdapterToolError, match="GPT2LMHeadModel is not supported.*" + ", ".join(SUPPORTED_ARCHITECTURES)):
        load_decoder(tmp_path / "m", lora=LoraSpec())


def test_checkpoint_that_does_not_fit_its_config(tmp_path: Path) -> None:
    write_llama(tmp_path / "m", TINY, dtype=torch.float32)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(AdapterToolError, match=r"tensor model\.layers\.2\..* is missing"):
        load_decoder(tmp_path / "m", lora=LoraSpec())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(AdapterToolError, match=r"gate_proj\.weight has shape \[64, 32\] but config.json implies \[48, 32\]"):
        load_decoder(tmp_path / "m", lora=LoraSpec())
    shutil.copy(tmp_path / "m" / "model.safetensors", tmp_path / "bare.safetensors")
    with pytest.raises(AdapterToolError, match="no config.json"):
        load_decoder(tmp_path / "bare.safetensors", lora=LoraSpec())


def test_unknown_target_is_refused(tmp_path: Path) -> None:
    write_llama(tmp_path / "m", TINY, dtype=torch.float32)
    with pytest.raises(AdapterToolError, match="'lm_head' matches no Linear.*q_proj"):
        load_decoder(tmp_path / "m", lora=LoraSpec(targets=("lm_head",)))


def test_decoder_builds_on_meta() -> None:
    config = DecoderConfig.from_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
                                      "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2})
    with torch.device("meta"):
        model = Decoder(config)
    assert config.head_dim == 4 and config.num_key_value_heads == 2
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2: Path) -> None:
    # Both in float64. In float32 the two implementations sum in other orders through 30 layers, by
    # amounts that depend on MKL's kernels and the thread count (measured on an AVX-512 CPU: 6.3e-5
    # with 1 thread, 5.6e-5 with 2, against atol 1e-4). In float64 that noise is ~1e-12; what is
    # left is the same on every CPU: our logits are returned in float32 (half an ulp: 2e-6 at
    # |logit| 34) and both sides normalise RMSNorm inputs in float32, as transformers does
    # (measured 1.9e-6 in all, 1 and 2 threads). 1e-5 keeps a 5x margin.
    ours = load_decoder(smollm2, lora=NO_DROPOUT, dtype=torch.float64).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float64).eval()
    ids, mask = batch(ours.config.vocab_size, length=48)
    with torch.no_grad():
        for attention_mask in (None, mask):
            got = ours(ids, attention_mask=attention_mask)
            want = theirs(ids, attention_mask=None if attention_mask is None else attention_mask.long()).logits
            real = mask if attention_mask is not None else torch.ones_like(mask)
            torch.testing.assert_close(got[real].double(), want[real], atol=1e-5, rtol=0)

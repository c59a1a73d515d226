"""LoRA layers against PEFT 0.21 (gradients, saved adapters) and QLoRA's 4-bit base against our
quantize / dequantize pipelines and transformers + bitsandbytes, in float32 on the CPU."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from adaptertool import AdapterToolError
from adaptertool.io import TensorSpec, write_adapter
from adaptertool.ops.examples import TINY, write_llama
from adaptertool.ops.dequantize import DequantConfig, dequantize
from adaptertool.ops.quantize import QuantConfig, quantize
from adaptertool.quant import (
    codebook,
    dequantize_4bit,
    dequantize_absmax,
    nested_codebook,
)
from adaptertool.training import (
    Decoder,
    FourBitWeight,
    FrozenLinear,
    LoRALinear,
    LoraSpec,
    load_decoder,
)
from adaptertool.training.lora import dropout_mask
from tests.quant.fourbit_reference import decode_quant_state
from tests.train import batch, load_hf_model, write_hf_model

peft = pytest.importorskip("peft")

VARIANTS = {
    "lora": LoraSpec(rank=4, alpha=8.0, dropout=0.0),
    "rslora": LoraSpec(rank=4, alpha=8.0, dropout=0.0, rslora=True),
    "dora": LoraSpec(rank=4, alpha=8.0, dropout=0.0, dora=True),
    "dora-some": LoraSpec(rank=3, alpha=5.0, dropout=0.0, dora=True, targets=("q_proj", "v_proj", "mlp.down_proj")),
    "rank1-some": LoraSpec(rank=1, alpha=2.0, dropout=0.0, targets=("k_proj", "up_proj")),
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf_model(tmp_path_factory.mktemp("hf") / "llama3", "llama3")


@pytest.fixture(scope="module")
def fourbit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A bf16 tiny Llama, its ``adaptertool quantize`` output and that output dequantised to float32."""
    root = tmp_path_factory.mktemp("qlora")
    write_llama(root / "base", TINY, dtype=torch.bfloat16)
    quantize(QuantConfig(source=root / "base", out=root / "nf4"))
    dequantize(DequantConfig(source=root / "nf4", out=root / "dense", dtype=torch.float32))
    return {"base": root / "base", "nf4": root / "nf4", "dense": root / "dense"}


def _randomise_b_(model: Decoder, seed: int = 7) -> None:
    """Give every B (zero at init) trained-looking values, so A's gradient and the update are not zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def _loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over real tokens."""
    keep = mask[:, 1:] & mask[:, :-1]
    return torch.nn.functional.cross_entropy(logits[:, :-1][keep], ids[:, 1:][keep])


def _peft_model(folder: Path, spec: LoraSpec, ours: Decoder) -> torch.nn.Module:
    """PEFT on transformers' model with our initial A, B and magnitude copied in (PEFT's own DoRA init is checked)."""
    targets = "all-linear" if spec.targets == ("all-linear",) else list(spec.targets)
    config = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0, target_modules=targets,
                             use_rslora=spec.rslora, use_dora=spec.dora)
    model = peft.get_peft_model(load_hf_model(folder), config)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in ours.adapter_state_dict().items():
            stem, part = key.rsplit(".lora_", 1)
            name = f"{stem}.lora_{part.removesuffix('.weight')}.default.weight"
            if part == "magnitude_vector":  # computed by PEFT from the same W: must already agree
                torch.testing.assert_close(params[name], tensor, atol=1e-6, rtol=0)
            params[name].copy_(tensor)
    return model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_one_step_gradients_match_peft(llama: Path, variant: str) -> None:
    spec = VARIANTS[variant]
    ours = load_decoder(llama, lora=spec, seed=1)
    _randomise_b_(ours)
    theirs = _peft_model(llama, spec, ours)
    ids, mask = batch(ours.config.vocab_size, seed=2)
    _loss(ours(ids, attention_mask=mask), ids, mask).backward()
    _loss(theirs(input_ids=ids, attention_mask=mask.long()).logits, ids, mask).backward()
    peft_grads = {n.replace(".default", "").removesuffix(".weight"): p.grad
                  for n, p in theirs.named_parameters() if p.requires_grad}
    our_grads = {f"base_model.model.{n}": p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert our_grads.keys() == peft_grads.keys()
    for name, grad in our_grads.items():
        assert grad is not None and grad.abs().max() > 0, name
        torch.testing.assert_close(grad, peft_grads[name], atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("variant", ["lora", "dora-some"])
def test_saved_adapter_loads_in_peft(llama: Path, tmp_path: Path, variant: str) -> None:
    spec = VARIANTS[variant]
    ours = load_decoder(llama, lora=spec, seed=4).eval()
    _randomise_b_(ours)
    state, config = ours.adapter_state_dict(), ours.adapter_config(base_model_name_or_path=str(llama))
    write_adapter(tmp_path, config, [TensorSpec(k, "F32", tuple(t.shape)) for k, t in state.items()], state.__getitem__)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(load_hf_model(llama), tmp_path).eval()
    assert not [str(w.message) for w in caught if "missing" in str(w.message) or "nexpected" in str(w.message)]
    saved = peft.utils.get_peft_model_state_dict(theirs)
    assert saved.keys() == state.keys()  # PEFT would save exactly our names
    ids, mask = batch(ours.config.vocab_size, seed=5)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
        want = theirs(input_ids=ids, attention_mask=mask.long()).logits
        base = load_hf_model(llama)(input_ids=ids, attention_mask=mask.long()).logits
    torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=0)
    assert (got - base)[mask].abs().max() > 1e-2  # the adapter changes the output: the comparison means something


def test_adapter_config_names_what_peft_would(llama: Path) -> None:
    config = load_decoder(llama, lora=LoraSpec()).adapter_config(base_model_name_or_path="org/model")
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (16, 16.0, 0.05)
    assert config["base_model_name_or_path"] == "org/model"
    # every key is a LoraConfig field, so PEFT neither warns about nor drops any
    assert set(config) <= set(peft.LoraConfig().to_dict())


def test_adapter_state_round_trip(llama: Path) -> None:
    spec = VARIANTS["dora"]
    trained = load_decoder(llama, lora=spec, seed=1).eval()
    _randomise_b_(trained)
    resumed = load_decoder(llama, lora=spec, seed=2).eval()
    ids, mask = batch(trained.config.vocab_size)
    with torch.no_grad():
        assert not torch.equal(resumed(ids), trained(ids))
        resumed.load_adapter_state_dict(trained.adapter_state_dict())
        assert torch.equal(resumed(ids, attention_mask=mask), trained(ids, attention_mask=mask))
    state = trained.adapter_state_dict()
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in state.values())
    with pytest.raises(AdapterToolError, match="lacks base_model.model.*lora_magnitude_vector"):
        resumed.load_adapter_state_dict({k: v for k, v in state.items() if "magnitude" not in k})
    with pytest.raises(AdapterToolError, match="has shape"):
        load_decoder(llama, lora=LoraSpec(rank=2, dora=True)).load_adapter_state_dict(state)


def test_init_is_peft_and_seeded(llama: Path) -> None:
    base = load_hf_model(llama)
    model = load_decoder(llama, lora=LoraSpec(dropout=0.0), seed=11).eval()
    ids, _ = batch(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), base(ids).logits, atol=1e-4, rtol=0)  # B = 0: a no-op at start
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 14
    for layer in layers:  # kaiming_uniform(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
        bound = 1 / math.sqrt(layer.base.in_features)
        assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.8 * bound
        assert not layer.lora_B.any()
    again = load_decoder(llama, lora=LoraSpec(), seed=11).adapter_state_dict()
    other = load_decoder(llama, lora=LoraSpec(), seed=12).adapter_state_dict()
    state = model.adapter_state_dict()
    assert all(torch.equal(state[k], again[k]) for k in state)
    assert not torch.equal(state[next(iter(state))], other[next(iter(state))])


def test_dropout_update_matches_autograd_with_the_same_mask() -> None:
    generator = torch.Generator().manual_seed(0)
    base = FrozenLinear(torch.randn(6, 10, generator=generator))
    layer = LoRALinear(base, LoraSpec(rank=3, alpha=6.0, dropout=0.3), generator=generator).train()
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(6, 3, generator=generator))
    x = torch.randn(2, 5, 10, generator=generator, requires_grad=True)
    torch.manual_seed(1)
    keep = dropout_mask(x, 0.3)  # the draw the layer makes after the same seed
    torch.manual_seed(1)
    out = layer(x)
    out.square().sum().backward()
    got = (out.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad)
    x.grad = None
    a, b = (layer.lora_A.detach().requires_grad_(), layer.lora_B.detach().requires_grad_())
    want_out = x @ base.weight.T + 2.0 * ((x * keep / 0.7) @ a.T) @ b.T  # plain autograd, scaling 6 / 3
    want_out.square().sum().backward()
    for ours, theirs in zip(got, (want_out.detach(), x.grad, a.grad, b.grad), strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert 0 < int(keep.sum()) < keep.numel()
    layer.eval()
    torch.testing.assert_close(layer(x), x @ base.weight.T + 2.0 * (x @ a.T) @ b.T)  # no dropout in eval


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_dropout_mask_is_a_fair_seeded_draw(p: float) -> None:
    x = torch.empty(64, 4097)  # an odd count: the last 16-bit draw of the hash is cut off
    torch.manual_seed(3)
    first, second = dropout_mask(x, p), dropout_mask(x, p)
    torch.manual_seed(3)
    assert torch.equal(dropout_mask(x, p), first)  # drawn from torch's generator: seeding replays it
    n = x.numel()
    for mask in (first, second):
        assert mask.shape == x.shape and mask.dtype == torch.bool
        assert abs(float(mask.float().mean()) - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    # independent draws and independent neighbours (the two halves of one hash, rows, columns)
    kept = 1 - p
    both = [(first & second), (first[:, :-1] & first[:, 1:]), (first[:-1] & first[1:])]
    for pair in both:
        assert abs(float(pair.float().mean()) - kept * kept) < 5 * math.sqrt(kept * kept * (1 - kept * kept) / pair.numel())


@pytest.mark.parametrize("bad", [{"rank": 0}, {"alpha": 0.0}, {"dropout": 1.0}, {"targets": ()}])
def test_spec_validation(bad: dict) -> None:
    with pytest.raises(AdapterToolError, match="LoRA"):
        LoraSpec(**bad)


@pytest.mark.parametrize("double_quant", [True, False], ids=["nested", "plain"])
@pytest.mark.parametrize("shape", [(32, 64), (5, 37), (1, 2)], ids=["blocks", "odd", "tiny"])
def test_fourbit_weight_expands_like_quant(shape: tuple[int, int], double_quant: bool) -> None:
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    book = codebook("nf4")
    packed = FourBitWeight.quantize(weight, book, code_map=nested_codebook() if double_quant else None)
    absmax = packed.absmax
    if double_quant:
        absmax = dequantize_absmax(absmax, packed.nested_absmax, packed.nested_quant_map, packed.nested_offset)
    want = dequantize_4bit(packed.packed, absmax, book.values, shape=shape, blocksize=64)
    assert torch.equal(packed.dequantize(torch.float32), want)
    assert packed.dequantize(torch.bfloat16).dtype == torch.bfloat16
    assert (packed.dequantize(torch.float32) - weight).abs().max() <= weight.abs().max() * 0.2  # NF4's widest half-step


def test_qlora_checkpoint_equals_its_dequantised_model(fourbit: dict[str, Path]) -> None:
    spec = LoraSpec(rank=4, dropout=0.0)
    models = {name: load_decoder(fourbit[name], lora=spec, seed=3) for name in ("nf4", "dense")}
    models["16-bit+qlora"] = load_decoder(fourbit["base"], lora=spec, seed=3, qlora=True)
    assert sum(isinstance(m, FourBitWeight) for m in models["nf4"].modules()) == 14
    ids, mask = batch(TINY.vocab, seed=9)
    grads = {}
    for name, model in models.items():
        _randomise_b_(model)
        logits = model(ids, attention_mask=mask)
        _loss(logits, ids, mask).backward()
        grads[name] = (logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name in ("nf4", "16-bit+qlora"):  # the 4-bit backward expands W again: same gradients as the dense W
        torch.testing.assert_close(grads[name][0], grads["dense"][0], atol=1e-5, rtol=0)
        for param, grad in grads["dense"][1].items():
            torch.testing.assert_close(grads[name][1][param], grad, atol=1e-6, rtol=1e-5)


def test_qlora_keeps_less_resident(fourbit: dict[str, Path]) -> None:
    def resident_bytes(model: Decoder) -> int:
        tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}  # tied tensors once
        return sum(t.numel() * t.element_size() for t in tensors.values())

    spec = LoraSpec(rank=4)
    full = resident_bytes(load_decoder(fourbit["base"], lora=spec, dtype=torch.bfloat16))
    small = load_decoder(fourbit["base"], lora=spec, dtype=torch.bfloat16, qlora=True)
    assert resident_bytes(small) < 0.85 * full  # tiny model: embeddings and the code tables weigh a lot
    for weight in (m for m in small.modules() if isinstance(m, FourBitWeight)):
        # per weight: 4 bits + one absmax code per 64 (+ 4 bytes per 256 blocks) instead of 16 bits;
        # the 16 + 256 float32 code tables are the same for every weight, a fixed 1 KB
        data = [weight.packed, weight.absmax, weight.nested_absmax]
        assert sum(t.numel() * t.element_size() for t in data) < 0.27 * math.prod(weight.shape) * 2


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("qlora", [False, True], ids=["16-bit", "qlora"])
def test_bf16_autocast_trains(fourbit: dict[str, Path], qlora: bool, dora: bool) -> None:
    """The loop's CUDA mode (bf16 autocast), run on the CPU: every custom backward copes with mixed dtypes."""
    spec = LoraSpec(rank=4, dora=dora)
    model = load_decoder(fourbit["base"], lora=spec, qlora=qlora, seed=2, gradient_checkpointing=True)
    reference = load_decoder(fourbit["base"], lora=spec, qlora=qlora, seed=2)
    ids, mask = batch(TINY.vocab, seed=3)
    targets = torch.where(mask, ids, -100).roll(-1, dims=1)
    targets[:, -1] = -100
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss_sum(ids, targets, attention_mask=mask)
    loss.backward()
    assert loss.dtype == torch.float32
    for param in (p for p in model.parameters() if p.requires_grad):
        assert param.grad is not None and param.grad.dtype == torch.float32 and torch.isfinite(param.grad).all()
    torch.manual_seed(0)
    with torch.no_grad():
        exact = reference.train().loss_sum(ids, targets, attention_mask=mask)
    torch.testing.assert_close(loss.detach(), exact, rtol=0.02, atol=0)


def test_transformers_fourbit_checkpoint(fourbit: dict[str, Path], tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    bnb = pytest.importorskip("bitsandbytes")
    settings = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                               bnb_4bit_compute_dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(fourbit["base"], quantization_config=settings,
                                                           dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path / "hf-nf4")
    ours = load_decoder(tmp_path / "hf-nf4", lora=LoraSpec(dropout=0.0)).eval()
    fourbits = {name.removesuffix(".base.quantized"): m for name, m in ours.named_modules() if isinstance(m, FourBitWeight)}
    assert len(fourbits) == 14
    # bitsandbytes' CPU forward is no oracle: on CPUs with AVX512-BF16, Linear4bit's inference path
    # repacks each weight for a fused kernel that needs in_features to be a multiple of the blocksize
    # (here 32: "shape '[32, 0]' is invalid") and rounds absmax to bf16; with AVX-512F its
    # dequantise kernel misreads absmax on 32-wide rows (tests/quant/fourbit_reference.py). So each
    # 4-bit weight transformers quantised and saved is decoded by the format's definition from
    # bitsandbytes' stored codes and tables: our loader must give exactly those weights, and
    # transformers' model, run with them, the same logits as ours.
    for name, module in list(hf.named_modules()):
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        weight = decode_quant_state(module.weight.data, module.weight.quant_state, torch.float32)
        assert torch.equal(fourbits.pop(name).dequantize(torch.float32), weight), name
        dense = torch.nn.Linear(module.in_features, module.out_features, bias=False)
        dense.weight = torch.nn.Parameter(weight, requires_grad=False)
        hf.set_submodule(name, dense)
    assert not fourbits, sorted(fourbits)
    ids, mask = batch(TINY.vocab, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask)[mask],
                                   hf(input_ids=ids, attention_mask=mask.long()).logits[mask], atol=1e-4, rtol=0)

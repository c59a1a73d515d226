"""One stored 4-bit weight: quantise it, read and check its entries, dequantise it.

Oracles: bitsandbytes 0.50.2's ``quantize_4bit`` and ``QuantState.as_dict(packed=True)`` (what
transformers saves) for the entries; the format's definition (tests/quant/fourbit_reference.py,
float64 rounded once) for the dense weight read back.
"""

from __future__ import annotations

import functools

import pytest
import torch

from adaptertool import AdapterToolError
from adaptertool.quant import (
    Codebook,
    FourBitState,
    NestedCodebook,
    StoredWeight,
    codebook,
    dequantize_stored,
    dynamic_map,
    find_quantized_weights,
    nested_codebook,
    quant_state_key,
    quantize_weight,
    read_state,
    read_stored,
)
from tests.quant.fourbit_reference import decode_4bit, decode_absmax

F = pytest.importorskip("bitsandbytes.functional")

CASES = {  # id -> (quant type, double quant, dtype, shape, blocksize)
    "nf4-dq-bf16": ("nf4", True, torch.bfloat16, (96, 64), 64),
    "nf4-fp16-odd": ("nf4", False, torch.float16, (33, 71), 64),
    "fp4-dq-fp32-b128": ("fp4", True, torch.float32, (5, 1000), 128),
    "fp4-bf16-tiny": ("fp4", False, torch.bfloat16, (1, 3), 32),
}


@functools.cache
def _book(quant_type: str) -> Codebook:
    return codebook(quant_type)  # built once per type: the 2**20-entry lookup table takes ~0.1 s


@functools.cache
def _code_map() -> NestedCodebook:
    return nested_codebook()


def _weight(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05).to(dtype)


def _bnb_entries(weight: torch.Tensor, quant_type: str, double_quant: bool, blocksize: int) -> dict[str, torch.Tensor]:
    packed, state = F.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)
    return {"w.weight": packed, **{f"w.weight.{k}": v for k, v in state.as_dict(packed=True).items()}}


def _stored(weight: torch.Tensor, quant_type: str, double_quant: bool, blocksize: int) -> StoredWeight:
    done = quantize_weight(weight, _book(quant_type), blocksize=blocksize, code_map=_code_map() if double_quant else None)
    nested = {"nested_absmax": done.nested.scales, "nested_quant_map": dynamic_map()} if done.nested else {}
    return StoredWeight(state=done.state, packed=done.packed, absmax=done.absmax, quant_map=_book(quant_type).values, **nested)


def _definition(stored: StoredWeight, dtype: torch.dtype) -> torch.Tensor:
    absmax = stored.absmax
    if stored.state.nested:
        absmax = decode_absmax(absmax, stored.nested_absmax, stored.nested_quant_map, stored.state.nested_offset)
    return decode_4bit(stored.packed, absmax, stored.quant_map, stored.state.shape, stored.state.blocksize, dtype)


@pytest.mark.parametrize("case", list(CASES))
def test_quantize_weight_makes_bitsandbytes_entries(case: str) -> None:
    quant_type, double_quant, dtype, shape, blocksize = CASES[case]
    weight = _weight(dtype, shape)
    theirs = _bnb_entries(weight, quant_type, double_quant, blocksize)
    done = quantize_weight(weight, _book(quant_type), blocksize=blocksize, code_map=_code_map() if double_quant else None)
    assert torch.equal(done.packed, theirs["w.weight"])
    assert done.state.to_json() == bytes(theirs[quant_state_key("w.weight", quant_type)].tolist())
    if double_quant:  # the codes themselves: exact nearest vs bitsandbytes' CPU table (test_nested.py)
        assert done.nested is not None and done.absmax is done.nested.codes
        assert torch.equal(done.nested.scales, theirs["w.weight.nested_absmax"])
    else:
        assert done.nested is None and torch.equal(done.absmax, theirs["w.weight.absmax"])


@pytest.mark.parametrize("case", list(CASES))
def test_read_stored_and_dequantize_follow_the_definition(case: str) -> None:
    quant_type, double_quant, dtype, shape, blocksize = CASES[case]
    tensors = _bnb_entries(_weight(dtype, shape), quant_type, double_quant, blocksize)
    (keys,) = find_quantized_weights(tensors).values()
    stored = read_stored(tensors.__getitem__, keys)
    assert stored.state.shape == shape and stored.state.nested == double_quant
    assert stored.packed is tensors["w.weight"] and stored.quant_map is tensors["w.weight.quant_map"]
    recorded = dequantize_stored(stored, dtype=None)
    assert recorded.dtype == dtype and torch.equal(recorded, _definition(stored, dtype))
    assert torch.equal(dequantize_stored(stored), _definition(stored, torch.float32))


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_stays_within_half_a_step(case: str) -> None:
    quant_type, double_quant, dtype, shape, blocksize = CASES[case]
    weight = _weight(dtype, shape)
    back = dequantize_stored(_stored(weight, quant_type, double_quant, blocksize), dtype=None)
    assert back.dtype == dtype and back.shape == shape
    # NF4's widest half-gap is 0.16 of absmax, FP4's 0.17; double quantisation adds a little
    assert torch.all((back.float() - weight.float()).abs() <= weight.float().abs().max() * 0.2)


def test_dequantize_stored_uses_the_stored_tables_and_device() -> None:
    stored = _stored(_weight(torch.float32, (4, 64)), "nf4", True, 64)
    plain = dequantize_stored(stored)
    doubled = StoredWeight(state=stored.state, packed=stored.packed, absmax=stored.absmax, quant_map=stored.quant_map * 2,
                           nested_absmax=stored.nested_absmax, nested_quant_map=stored.nested_quant_map)
    assert torch.equal(dequantize_stored(doubled), plain * 2)
    assert torch.equal(dequantize_stored(stored, device="cpu"), plain)
    elsewhere = dequantize_stored(stored, dtype=torch.bfloat16, device="meta")  # a device with no data: placement only
    assert (elsewhere.device.type, elsewhere.dtype, elsewhere.shape) == ("meta", torch.bfloat16, (4, 64))


def test_read_state_reads_only_the_quant_state() -> None:
    tensors = _bnb_entries(_weight(torch.float16, (2, 64)), "nf4", True, 64)
    (keys,) = find_quantized_weights(tensors).values()
    seen: list[str] = []
    state = read_state(lambda key: seen.append(key) or tensors[key], keys)
    assert seen == [keys.quant_state] and state.dtype == "float16" and state.nested
    assert FourBitState.from_tensor(tensors[keys.quant_state], key=keys.quant_state) == state


@pytest.mark.parametrize(("key", "replace", "message"), [
    ("w.weight.absmax", lambda t: t[:1], r"ckpt: w.weight.absmax is torch.uint8 x1 but the quant_state for shape \[2, 64\] needs torch.uint8 x2"),
    ("w.weight", lambda t: t.view(torch.int8), r"w.weight is torch.int8 x64 .* needs torch.uint8 x64; the checkpoint is corrupt"),
    ("w.weight.quant_map", lambda t: t[:8], r"w.weight.quant_map is torch.float32 x8 .* needs torch.float32 x16"),
    ("w.weight.nested_absmax", lambda t: torch.cat([t, t]), r"w.weight.nested_absmax is torch.float32 x2 .* x1"),
])
def test_read_stored_refuses_entries_that_do_not_fit(key: str, replace: object, message: str) -> None:
    tensors = _bnb_entries(_weight(torch.float32, (2, 64)), "nf4", True, 64)
    (keys,) = find_quantized_weights(tensors).values()
    tensors[key] = replace(tensors[key])  # type: ignore[operator]
    with pytest.raises(AdapterToolError, match=message):
        read_stored(tensors.__getitem__, keys, source="ckpt")


def test_read_stored_refuses_a_state_that_disagrees_with_the_keys() -> None:
    tensors = _bnb_entries(_weight(torch.float32, (2, 64)), "nf4", False, 64)
    (keys,) = find_quantized_weights(tensors).values()
    fp4 = FourBitState.from_tensor(tensors[keys.quant_state], key="k")
    blob = FourBitState(quant_type="fp4", blocksize=64, dtype=fp4.dtype, shape=fp4.shape).to_json()
    tensors[keys.quant_state] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    with pytest.raises(AdapterToolError, match="ckpt: w.weight.quant_state.bitsandbytes__nf4 says quant_type fp4; the checkpoint is corrupt"):
        read_stored(tensors.__getitem__, keys, source="ckpt")
    nested = FourBitState(quant_type="nf4", blocksize=64, dtype=fp4.dtype, shape=fp4.shape, nested_blocksize=256,
                          nested_dtype="float32", nested_offset=0.5).to_json()
    tensors[keys.quant_state] = torch.frombuffer(bytearray(nested), dtype=torch.uint8)
    with pytest.raises(AdapterToolError, match="disagree on double quantisation"):
        read_stored(tensors.__getitem__, keys, source="ckpt")


@pytest.mark.parametrize("double_quant", [True, False], ids=["nested", "plain"])
def test_quantize_weight_refuses_nan_and_odd_blocksizes(double_quant: bool) -> None:
    weight = _weight(torch.bfloat16, (4, 64))
    weight[2, 7] = float("inf")
    code_map = _code_map() if double_quant else None
    with pytest.raises(AdapterToolError, match=r"^a.safetensors: tensor m.weight holds NaN or Inf; it cannot be quantised"):
        quantize_weight(weight, _book("nf4"), code_map=code_map, name="m.weight", source="a.safetensors")
    with pytest.raises(AdapterToolError, match="4-bit blocksize must be one of .*, not 48"):
        quantize_weight(weight, _book("nf4"), blocksize=48, code_map=code_map)

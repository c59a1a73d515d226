"""The bitsandbytes 4-bit state-dict layout: JSON blob, entry keys/dtypes/shapes, finding and reading.

Oracles: bitsandbytes 0.50.2's ``QuantState.as_dict(packed=True)`` (what ``Linear4bit`` saves) and
``dequantize_4bit``; transformers 5.24's ``BitsAndBytesConfig`` for ``quantization_config``.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch

from adaptertool import AdapterToolError
from adaptertool.quant import (
    Codebook,
    FourBitState,
    QuantizedKeys,
    codebook,
    dequantize_weight,
    dynamic_map,
    entry_layout,
    find_quantized_weights,
    quant_state_key,
    quantization_config,
    quantize_4bit,
    quantize_absmax,
)

F = pytest.importorskip("bitsandbytes.functional")


@functools.cache
def _book(quant_type: str) -> Codebook:
    return codebook(quant_type)  # built once per type: the 2**20-entry lookup table takes ~0.1 s


CASES = {  # id -> (quant type, double quant, dtype, shape)
    "nf4-dq-bf16": ("nf4", True, torch.bfloat16, (96, 64)),
    "nf4-fp16": ("nf4", False, torch.float16, (33, 70)),
    "fp4-dq-fp32": ("fp4", True, torch.float32, (5, 1000)),
    "fp4-bf16-odd": ("fp4", False, torch.bfloat16, (3, 7)),
}


def _weight(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05).to(dtype)


def _bnb_entries(weight: torch.Tensor, quant_type: str, double_quant: bool) -> dict[str, torch.Tensor]:
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
    return {"w.weight": packed, **{f"w.weight.{k}": v for k, v in state.as_dict(packed=True).items()}}


def _our_entries(weight: torch.Tensor, quant_type: str, double_quant: bool) -> dict[str, torch.Tensor]:
    book = _book(quant_type)
    packed, absmax = quantize_4bit(weight, book)
    nested = quantize_absmax(absmax, dynamic_map()) if double_quant else None
    state = FourBitState(quant_type=quant_type, blocksize=64, dtype=str(weight.dtype).removeprefix("torch."),
                         shape=tuple(weight.shape), **({"nested_blocksize": 256, "nested_dtype": "float32",
                                                        "nested_offset": nested.offset} if nested else {}))
    blob = torch.frombuffer(bytearray(state.to_json()), dtype=torch.uint8)
    tensors = {"w.weight": packed, "w.weight.absmax": nested.codes if nested else absmax, "w.weight.quant_map": book.values}
    if nested:
        tensors |= {"w.weight.nested_absmax": nested.scales, "w.weight.nested_quant_map": dynamic_map()}
    return tensors | {quant_state_key("w.weight", quant_type): blob}


@pytest.mark.parametrize("case", list(CASES))
def test_entries_match_bitsandbytes_state_dict(case: str) -> None:
    quant_type, double_quant, dtype, shape = CASES[case]
    weight = _weight(dtype, shape)
    theirs, ours = _bnb_entries(weight, quant_type, double_quant), _our_entries(weight, quant_type, double_quant)
    assert list(ours) == list(theirs)  # same keys in the same order
    layout = entry_layout("w.weight", shape, quant_type=quant_type, blocksize=64, double_quant=double_quant,
                          state_bytes=theirs[quant_state_key("w.weight", quant_type)].numel())
    assert [(k, getattr(torch, d), s) for k, d, s in layout] == [(k, v.dtype, tuple(v.shape)) for k, v in theirs.items()]
    for key, want in theirs.items():
        got = ours[key]
        if key.endswith(".absmax") and double_quant:
            continue  # nested codes: exact nearest vs bitsandbytes' CPU table (test_nested.py)
        assert torch.equal(got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8)), key


@pytest.mark.parametrize("case", list(CASES))
def test_json_blob_is_byte_identical(case: str) -> None:
    quant_type, double_quant, dtype, shape = CASES[case]
    weight = _weight(dtype, shape)
    theirs = bytes(_bnb_entries(weight, quant_type, double_quant)[quant_state_key("w.weight", quant_type)].tolist())
    ours = bytes(_our_entries(weight, quant_type, double_quant)[quant_state_key("w.weight", quant_type)].tolist())
    assert ours == theirs
    parsed = FourBitState.from_json(ours, key="k")
    assert parsed.to_json() == ours and parsed.shape == shape and parsed.nested == double_quant


@pytest.mark.parametrize("case", list(CASES))
def test_dequantize_weight_reads_bitsandbytes_entries(case: str) -> None:
    quant_type, double_quant, dtype, shape = CASES[case]
    weight = _weight(dtype, shape)
    tensors = _bnb_entries(weight, quant_type, double_quant)
    (keys,) = find_quantized_weights(tensors).values()
    assert keys.keys == tuple(tensors) and keys.nested == double_quant and keys.module == "w"
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
    expected = F.dequantize_4bit(packed, state)
    ours = dequantize_weight(tensors, keys, dtype=None)
    assert ours.dtype == dtype and ours.shape == shape
    if quant_type == "fp4":  # bitsandbytes' C kernel writes -0.0 for code 8; the stored table says +0.0
        assert torch.equal(ours, expected)
    else:
        assert torch.equal(ours.view(torch.uint8), expected.view(torch.uint8))
    assert dequantize_weight(tensors, keys).dtype == torch.float32


def test_dequantize_weight_uses_the_stored_tables() -> None:
    tensors = _our_entries(_weight(torch.float32, (4, 64)), "nf4", True)
    (keys,) = find_quantized_weights(tensors).values()
    plain = dequantize_weight(tensors, keys)
    tensors["w.weight.quant_map"] = tensors["w.weight.quant_map"] * 2
    assert torch.equal(dequantize_weight(tensors, keys), plain * 2)


def test_find_quantized_weights_among_other_tensors() -> None:
    names = ["model.embed.weight", "a.q.weight", "a.q.bias", "a.q.weight.absmax", "a.q.weight.quant_map",
             "a.q.weight.quant_state.bitsandbytes__fp4", "norm.weight"]
    found = find_quantized_weights(names)
    assert found == {"a.q.weight": QuantizedKeys(weight="a.q.weight", quant_type="fp4", absmax="a.q.weight.absmax",
                                                 quant_map="a.q.weight.quant_map",
                                                 quant_state="a.q.weight.quant_state.bitsandbytes__fp4",
                                                 nested_absmax=None, nested_quant_map=None)}
    assert find_quantized_weights(["x.weight", "y.bias"]) == {}


@pytest.mark.parametrize(("drop", "message"), [
    ("w.weight.absmax", "lacks w.weight.absmax"),
    ("w.weight", "lacks w.weight;"),
    ("w.weight.nested_quant_map", "lacks w.weight.nested_quant_map"),
    ("w.weight.quant_state.bitsandbytes__nf4", "w.weight has no quant_state"),
])
def test_incomplete_entries_are_refused(drop: str, message: str) -> None:
    names = [n for n in _our_entries(_weight(torch.float32, (2, 64)), "nf4", True) if n != drop]
    with pytest.raises(AdapterToolError, match=message):
        find_quantized_weights(names, source="ckpt")


def test_corrupt_entries_are_refused() -> None:
    tensors = _our_entries(_weight(torch.float32, (2, 64)), "nf4", True)
    (keys,) = find_quantized_weights(tensors).values()
    broken = dict(tensors, **{"w.weight.absmax": tensors["w.weight.absmax"][:1]})
    with pytest.raises(AdapterToolError, match=r"ckpt: w.weight.absmax is torch.uint8 x1 .* needs torch.uint8 x2"):
        dequantize_weight(broken, keys, source="ckpt")
    with pytest.raises(AdapterToolError, match="not JSON"):
        FourBitState.from_json(b"\xff{", key="k")
    with pytest.raises(AdapterToolError, match="blocksize 48"):
        FourBitState.from_json(b'{"quant_type": "nf4", "blocksize": 48, "dtype": "float16", "shape": [2]}', key="k")
    with pytest.raises(AdapterToolError, match="lacks or mangles"):
        FourBitState.from_json(b'{"quant_type": "nf4"}', key="k")


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantization_config_equals_transformers(quant_type: str, double_quant: bool) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                             bnb_4bit_use_double_quant=double_quant,
                                             bnb_4bit_compute_dtype=torch.float16, llm_int8_skip_modules=["lm_head"])
    theirs = json.loads(config.to_json_string(use_diff=False))
    ours = quantization_config(quant_type=quant_type, double_quant=double_quant, compute_dtype="float16",
                               skip_modules=["lm_head"])
    assert json.dumps(ours, sort_keys=True) == json.dumps(theirs, sort_keys=True)

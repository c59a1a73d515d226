"""MXFP4 expert weights as gpt-oss stores them: layout from the header, dequantise, quantise.

Oracles: the format's definition (OCP Microscaling Formats v1.0: the E2M1 value times
2**(byte - 127)) computed in float64 and rounded once (``round_once`` of test_fp8.py); transformers
5.25's own MXFP4 dequantisation (``integrations/mxfp4._convert_moe_packed_tensors``, what loading
gpt-oss on a CPU runs), bit for bit; for quantising, the nearest E2M1 value by a table search in
float64 and the scale byte from ``math.frexp``.
"""

from __future__ import annotations

import math

import pytest
import torch

from adaptertool import AdapterToolError
from adaptertool.quant import (
    E2M1_VALUES,
    Mxfp4Weight,
    dequantize_mxfp4,
    find_mxfp4_weights,
    quantize_mxfp4,
    requantize_mxfp4,
)
from tests.quant.test_fp8 import DTYPES, round_once

_LUT = torch.tensor(E2M1_VALUES, dtype=torch.float64)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _stored(experts: int, rows: int, groups: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = torch.randint(0, 256, (experts, rows, groups, 16), generator=_gen(seed), dtype=torch.uint8)
    scales = torch.randint(110, 140, (experts, rows, groups), generator=_gen(seed + 1), dtype=torch.uint8)
    scales[0, 0, 0], scales[0, 1, 0], scales[-1, -1, -1] = 0, 1, 252  # the extremes: 2**-127, 2**-126, 2**125
    return blocks, scales


def _definition(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(E, out, in) by the definition: element i of a group is nibble i % 2 (low first) of byte i // 2."""
    cols = blocks.shape[2] * 32
    i = torch.arange(cols)
    byte = blocks.long().reshape(*blocks.shape[:2], -1)[..., i // 2]
    nibble = (byte >> (4 * (i % 2))) & 0xF
    values = _LUT[nibble] * torch.pow(2.0, scales.double() - 127)[..., i // 32]
    return round_once(values, dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("transposed", [False, True], ids=["eoi", "eio"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_is_the_definition_and_matches_transformers(dtype: str, transposed: bool) -> None:
    from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

    blocks, scales = _stored(3, 40, 3, seed=0)
    got = dequantize_mxfp4(blocks, scales, dtype=DTYPES[dtype], transposed=transposed)
    want = _definition(blocks, scales, DTYPES[dtype])
    assert torch.equal(_bits(got), _bits(want.transpose(1, 2) if transposed else want))
    if transposed:  # transformers returns gpt-oss' parameter layout (E, in, out)
        theirs = _convert_moe_packed_tensors(blocks, scales, dtype=DTYPES[dtype])
        assert torch.equal(_bits(got), _bits(theirs))


def test_dequantize_unpacks_the_low_nibble_first() -> None:
    blocks = torch.zeros(1, 1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0, :3] = torch.tensor([0x21, 0xF8, 0x7D], dtype=torch.uint8)
    got = dequantize_mxfp4(blocks, torch.full((1, 1, 1), 128, dtype=torch.uint8))[0, 0, :6]
    assert got.tolist() == [1.0, 2.0, -0.0, -12.0, -6.0, 12.0]  # scale 2
    assert torch.signbit(got[2])


def test_dequantize_refuses_nan_scales_and_overflow() -> None:
    blocks, scales = _stored(2, 8, 2, seed=1)
    scales[1, 3, 1] = 255
    with pytest.raises(AdapterToolError, match="^src: MXFP4 scales l.gate_up_proj_scales hold byte 255, which is NaN"):
        dequantize_mxfp4(blocks, scales, name="l.gate_up_proj", source="src")
    scales[1, 3, 1] = 253  # 2**126: 3 * 2**126 fits float32, 4 * 2**126 does not
    blocks[1, 3, 1] = 0x55
    assert dequantize_mxfp4(blocks, scales)[1, 3, 32:64].eq(3 * 2.0 ** 126).all()
    blocks[1, 3, 1, 5] = 0x65
    with pytest.raises(AdapterToolError, match="make values beyond float32 in expert 1"):
        dequantize_mxfp4(blocks, scales, name="l.gate_up_proj")
    with pytest.raises(AdapterToolError, match="expected uint8 \\(E, out, G, 16\\) and \\(E, out, G\\)"):
        dequantize_mxfp4(blocks, scales[:, :, :1])


def _nearest(v: torch.Tensor) -> torch.Tensor:
    """Codes of the E2M1 values nearest float64 ``v`` (|v| <= 6), ties to the even code, sign from the sign bit."""
    distance = (v.abs().unsqueeze(-1) - _LUT[:8]).abs()
    nearest = distance == distance.min(-1, keepdim=True).values  # two adjacent codes on a tie
    code = (nearest.long() * 2 - torch.arange(8) % 2).argmax(-1)  # a nearest even code before a nearest odd one
    return code.to(torch.uint8) | (torch.signbit(v).to(torch.uint8) << 3)


def _expected(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    experts, rows, cols = weight.shape
    groups = weight.reshape(experts, rows, cols // 32, 32).double()
    scale_bytes = torch.zeros(groups.shape[:-1], dtype=torch.uint8)
    for index in torch.cartesian_prod(*(torch.arange(n) for n in groups.shape[:-1])).tolist():
        amax = groups[tuple(index)].abs().max().item()
        if amax:
            mantissa, exponent = math.frexp(amax / 6)  # exact here: amax / 6 is never within 2**-53 of a power of two
            scale_bytes[tuple(index)] = max(1, 127 + (exponent - 1 if mantissa == 0.5 else exponent))
    v = groups / torch.pow(2.0, scale_bytes.double() - 127).unsqueeze(-1)
    codes = _nearest(v).reshape(experts, rows, cols // 32, 16, 2)
    return codes[..., 0] | (codes[..., 1] << 4), scale_bytes


def _planted(seed: int) -> torch.Tensor:
    weight = torch.randn(2, 24, 96, generator=_gen(seed)) * 0.02
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    weight[0, 0, :32] = torch.cat([ties, -ties, ties * 0.5, -ties * 0.5]) * 2.0 ** -5  # scale 2**-5, every tie
    weight[0, 1, :32] = 0  # an all-zero group
    weight[1, 2, 32:64] = 6 * 2.0 ** -3 * (1 + 2 ** -20)  # just above 6 * 2**k: the next power of two
    weight[1, 3, 64:96] = torch.linspace(-3.2, 3.2, 32)  # scale 1, largest value rounds to 3
    return weight


def test_quantize_follows_the_recipe() -> None:
    weight = _planted(2)
    kept = weight.clone()
    blocks, scales = quantize_mxfp4(weight)
    assert torch.equal(weight, kept)
    want_blocks, want_scales = _expected(weight)
    assert torch.equal(scales, want_scales) and torch.equal(blocks, want_blocks)
    assert scales[0, 0, 0] == 127 - 5 and scales[0, 1, 0] == 0 and not blocks[0, 1, 0].any()
    assert scales[1, 2, 1] == 127 - 2
    values = dequantize_mxfp4(blocks, scales)[0, 0, :16] * 2 ** 5
    assert values.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0, -6.0]


def test_quantize_keeps_the_sign_of_zero() -> None:
    weight = torch.zeros(1, 1, 32)
    weight[0, 0, 1] = -0.0
    weight[0, 0, 2], weight[0, 0, 3] = 6.0, -0.1  # scale 1: -0.1 rounds to -0
    blocks, scales = quantize_mxfp4(weight)
    assert scales.item() == 127 and blocks[0, 0, 0, :2].tolist() == [0x80, 0x87]


def test_quantize_transposed_takes_gpt_oss_layout() -> None:
    weight = _planted(3)
    eio = weight.transpose(1, 2).contiguous()
    assert all(torch.equal(a, b) for a, b in zip(quantize_mxfp4(eio, transposed=True), quantize_mxfp4(weight)))
    assert torch.equal(dequantize_mxfp4(*quantize_mxfp4(weight), transposed=True), dequantize_mxfp4(*quantize_mxfp4(weight)).transpose(1, 2))


def test_round_trip_changes_bytes_only_where_the_largest_value_rounds_to_3() -> None:
    # the scale is the least power of two >= amax / 6, so amax / scale lies in (3, 6]; below 3.5 it rounds to 3,
    # and quantising those values again halves the scale and doubles every value's code: same values, other bytes
    weight = _planted(4)
    blocks, scales = quantize_mxfp4(weight)
    values = dequantize_mxfp4(blocks, scales)
    again_blocks, again_scales = quantize_mxfp4(values)
    largest = (blocks & 0x7).maximum(blocks >> 4 & 0x7).amax(-1)  # largest magnitude code per group
    assert largest[1, 3, 2] == 5  # the planted group: 3.2 -> 3
    moved = largest == 5
    assert torch.equal(again_scales != scales, moved)
    assert torch.equal(again_scales[moved], scales[moved] - 1)
    assert torch.equal(again_blocks[~moved], blocks[~moved])
    assert torch.equal(dequantize_mxfp4(again_blocks, again_scales), values)
    assert torch.equal(quantize_mxfp4(dequantize_mxfp4(again_blocks, again_scales))[1], again_scales)  # then stable


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_quantize_refuses_nan_inf_and_bad_shapes(bad: float) -> None:
    weight = torch.zeros(2, 4, 64)
    weight[1, 2, 40] = bad
    with pytest.raises(AdapterToolError, match="^src: tensor l.down_proj holds NaN or Inf in expert 1"):
        quantize_mxfp4(weight, name="l.down_proj", source="src")
    with pytest.raises(AdapterToolError, match="l.down_proj has 48 inputs; MXFP4 needs a multiple of 32"):
        quantize_mxfp4(torch.zeros(2, 4, 48), name="l.down_proj")
    with pytest.raises(AdapterToolError, match="must be a 3-D float tensor"):
        quantize_mxfp4(torch.zeros(4, 64))


def test_find_mxfp4_weights_pairs_blocks_and_scales() -> None:
    specs = {
        "model.layers.0.mlp.experts.gate_up_proj_blocks": ("U8", (4, 96, 2, 16)),
        "model.layers.0.mlp.experts.gate_up_proj_scales": ("U8", (4, 96, 2)),
        "model.layers.0.mlp.experts.gate_up_proj_bias": ("BF16", (4, 96)),
        "model.layers.0.mlp.experts.down_proj_scales": ("U8", (4, 64, 3)),
        "model.layers.0.mlp.experts.down_proj_blocks": ("U8", (4, 64, 3, 16)),
        "model.layers.0.mlp.router.weight": ("BF16", (4, 64)),
    }
    found = find_mxfp4_weights(specs)
    assert found == {
        "model.layers.0.mlp.experts.gate_up_proj": Mxfp4Weight(
            name="model.layers.0.mlp.experts.gate_up_proj", blocks="model.layers.0.mlp.experts.gate_up_proj_blocks",
            scales="model.layers.0.mlp.experts.gate_up_proj_scales", shape=(4, 96, 64)),
        "model.layers.0.mlp.experts.down_proj": Mxfp4Weight(
            name="model.layers.0.mlp.experts.down_proj", blocks="model.layers.0.mlp.experts.down_proj_blocks",
            scales="model.layers.0.mlp.experts.down_proj_scales", shape=(4, 64, 96)),
    }


@pytest.mark.parametrize("specs, message", [
    ({"e.w_blocks": ("U8", (2, 4, 1, 16))}, "MXFP4 blocks e.w_blocks have no e.w_scales"),
    ({"e.w_scales": ("U8", (2, 4, 1))}, "MXFP4 scales e.w_scales have no e.w_blocks"),
    ({"e.w_blocks": ("U8", (2, 4, 1, 16)), "e.w_scales": ("BF16", (2, 4, 1))}, "are U8 and BF16; both must be U8"),
    ({"e.w_blocks": ("U8", (2, 4, 2, 16)), "e.w_scales": ("U8", (2, 4, 1))}, "do not pair as \\(E, out, G, 16\\)"),
    ({"e.w_blocks": ("U8", (4, 1, 16)), "e.w_scales": ("U8", (4, 1))}, "blocks e.w_blocks \\[4, 1, 16\\]"),
])
def test_find_mxfp4_weights_refuses_broken_pairs(specs: dict, message: str) -> None:
    with pytest.raises(AdapterToolError, match=f"^model.safetensors: .*{message}"):
        find_mxfp4_weights(specs, source="model.safetensors")


@pytest.mark.parametrize("transposed", [False, True])
def test_requantize_keeps_the_bytes_of_groups_a_delta_left_alone(transposed: bool) -> None:
    blocks, scales = _stored(3, 8, 4, seed=21)
    # a group whose largest value is 3 quantises afresh to half the scale: its bytes change, its values do not
    blocks[0, 0, 0] = 0
    blocks[0, 0, 0, 0] = 0x05  # code 5 = 3.0
    weight = dequantize_mxfp4(blocks, scales, transposed=transposed)
    fresh = quantize_mxfp4(weight, transposed=transposed)
    assert not torch.equal(fresh[1], scales)  # so keeping bytes is not what quantising does anyway
    delta = torch.zeros_like(weight)
    touched = (1, 5, 2 * 32 + 3) if not transposed else (1, 2 * 32 + 3, 5)  # expert 1, output row 5, group 2
    delta[touched] = 0.75
    new_blocks, new_scales = requantize_mxfp4(weight + delta, blocks, scales, transposed=transposed)
    changed = (new_scales != scales) | (new_blocks != blocks).any(-1)
    assert changed.nonzero().tolist() == [[1, 5, 2]]
    want_blocks, want_scales = quantize_mxfp4(weight + delta, transposed=transposed)
    assert torch.equal(new_blocks[1, 5, 2], want_blocks[1, 5, 2]) and new_scales[1, 5, 2] == want_scales[1, 5, 2]

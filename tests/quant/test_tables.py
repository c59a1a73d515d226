"""Code tables and the lookup table behind fast coding.

Oracles: bitsandbytes 0.50.2's own tables (``get_4bit_type``, ``create_dynamic_map`` in
bitsandbytes/functional.py), the float32 bit patterns of the 16 NF4 values that the QLoRA paper lists
(Dettmers et al. 2023, https://arxiv.org/abs/2305.14314, appendix), and a check of every entry of the
2**20-entry lookup table against the exact rule (one binary search per input, ``Codebook.exact_codes``).
"""

from __future__ import annotations

import hashlib
import struct

import pytest
import torch

from adaptertool.quant import (
    QUANT_TYPES,
    Codebook,
    codebook,
    dynamic_map,
    fourbit_values,
)
from adaptertool.quant.lookup import KEY_BITS, KEY_SHIFT

F = pytest.importorskip("bitsandbytes.functional")

# The QLoRA paper's NF4 values as float32 bit patterns, code 0..15 (bitsandbytes 0.50.2 holds the same).
NF4_BITS = "bf800000 bf3239b1 bf066b30 beca32a0 be91a24d be3d353f bdba7871 00000000 3da2faff 3e24cae3 3e7c04dd 3ead033a 3ee1a4b8 3f1007ab 3f3913b3 3f800000"
DYNAMIC_MAP_SHA256 = "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c"


def _bits(t: torch.Tensor) -> list[int]:
    return t.contiguous().view(torch.int32).tolist()


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_fourbit_values_equal_bitsandbytes(quant_type: str) -> None:
    # bit patterns, not values: code 8 of FP4 is +0.0 in bitsandbytes (a -0.0 would compare equal)
    assert _bits(fourbit_values(quant_type)) == _bits(F.get_4bit_type(quant_type, device="cpu"))


def test_nf4_values_match_reference_bit_patterns() -> None:
    expected = [struct.unpack("<i", bytes.fromhex(h)[::-1])[0] for h in NF4_BITS.split()]
    assert _bits(fourbit_values("nf4")) == expected


def test_dynamic_map_equals_bitsandbytes() -> None:
    ours = dynamic_map()
    assert _bits(ours) == _bits(F.create_dynamic_map(signed=True))
    assert hashlib.sha256(ours.numpy().tobytes()).hexdigest() == DYNAMIC_MAP_SHA256
    assert ours[127].item() == 0.0 and ours[255].item() == 1.0
    assert torch.all(ours[1:] > ours[:-1])  # sorted, no repeats: nearest-code search relies on it


def test_unknown_quant_type_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown 4-bit type"):
        fourbit_values("int4")


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_thresholds_are_float32_midpoints_of_sorted_values(quant_type: str) -> None:
    book = codebook(quant_type)
    ordered = book.values[book.order]
    assert torch.all(ordered[1:] >= ordered[:-1])
    assert torch.equal(book.thresholds, (ordered[:-1] + ordered[1:]) / 2)
    assert book.zero_code == {"nf4": 7, "fp4": 0}[quant_type]


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_exact_codes_match_brute_force_nearest(quant_type: str) -> None:
    # Away from the thresholds the rule is "nearest code value" (float64 brute force); at a
    # threshold the lower value wins, which the tie tests in test_fourbit.py check against bitsandbytes.
    book = codebook(quant_type)
    x = torch.rand(20_000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    distance = (x.double().unsqueeze(1) - book.values.double()).abs()  # (n, 16)
    nearest = distance.min(dim=1).values
    codes = book.exact_codes(x)
    assert torch.equal(distance.gather(1, codes.long().unsqueeze(1)).squeeze(1), nearest)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_lookup_table_is_exact_for_every_key(quant_type: str) -> None:
    # For each of the 2**20 keys (top bits of a float32) probe the lowest, highest and middle low-bit
    # patterns, plus the exact threshold bit patterns +-2 ulps: unflagged entries must give the
    # exact code, flagged ones must be keys whose range really straddles a threshold.
    book = codebook(quant_type)
    assert book.lookup.shape == (1 << KEY_BITS,)
    keys = torch.arange(1 << KEY_BITS, dtype=torch.int64)
    top = (1 << KEY_SHIFT) - 1
    lows = torch.tensor([0, 1, top // 3, top // 2, top - 1, top], dtype=torch.int64)
    bits = (keys.unsqueeze(1) << KEY_SHIFT | lows).reshape(-1)
    probe = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)
    threshold_bits = book.thresholds.view(torch.int32).to(torch.int64)
    near = (threshold_bits.unsqueeze(1) + torch.arange(-2, 3)).reshape(-1)
    probe = torch.cat([probe, near.to(torch.int32).view(torch.float32)])
    finite = probe[torch.isfinite(probe)]
    key = (finite.view(torch.int32).to(torch.int64) >> KEY_SHIFT) & ((1 << KEY_BITS) - 1)
    entry = book.lookup[key]
    exact = book.exact_codes(finite)
    plain = entry < 16
    assert torch.equal(entry[plain], exact[plain])
    straddling = set(((threshold_bits >> KEY_SHIFT) & ((1 << KEY_BITS) - 1)).tolist())
    flagged = set((book.lookup >= 16).nonzero().squeeze(1).tolist())
    negative_infinity = 0xFF800000 >> KEY_SHIFT  # its range runs from -inf into NaNs: no finite x lands there
    assert flagged - {negative_infinity} <= straddling | {0}  # key 0: FP4's +0 vs tiny positives


def test_custom_codebook_needs_sixteen_values() -> None:
    with pytest.raises(ValueError, match="16 values"):
        Codebook.from_values(torch.zeros(8))

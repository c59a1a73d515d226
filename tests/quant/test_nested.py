"""Double quantisation of the absmax against bitsandbytes 0.50.2 (CPU) and a brute-force oracle.

bitsandbytes' offset (mean), nested scales and 8-bit map must be identical. The 8-bit codes follow
the exact nearest rule (oracle: float64 distance to all 256 map values, exact ties to the even
index); where bitsandbytes' CPU lookup table differs, nested_oracle.py bounds the difference.
"""

from __future__ import annotations

import functools

import pytest
import torch

from adaptertool.quant import (
    Codebook,
    codebook,
    dequantize_absmax,
    dynamic_map,
    nearest_codes,
    nested_codebook,
    quantize_4bit,
    quantize_absmax,
)
from tests.quant.nested_oracle import assert_nested_close

F = pytest.importorskip("bitsandbytes.functional")


@functools.cache
def _book(quant_type: str) -> Codebook:
    return codebook(quant_type)  # built once per type: the 2**20-entry lookup table takes ~0.1 s



def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "normal": torch.randn(300, 640, generator=g) * 0.02,  # 3000 blocks: 11 full nested blocks + a partial one
        "heavy": torch.randn(97, 256, generator=g) / (torch.rand(97, 256, generator=g) + 1e-3).sqrt(),
        "rows-scaled": torch.randn(64, 512, generator=g) * torch.logspace(-3, 1, 64).unsqueeze(1),
        "constant": torch.ones(40, 64),  # every absmax equal: d = 0, nested scale 0
        "tiny": torch.randn(1, 64, generator=g),  # one block
    }


def _brute_force_nearest(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    distance = (x.double().unsqueeze(1) - table.double()).abs()  # (n, 256)
    best = distance.min(dim=1, keepdim=True).values
    candidates = distance == best  # one or two (a tie) per row
    index = torch.arange(table.numel()).expand_as(candidates)
    even_first = torch.where(candidates, index + (index % 2) * table.numel(), 10 * table.numel())
    return (even_first.min(dim=1).values % table.numel()).to(torch.uint8)


@pytest.mark.parametrize("name", list(_weights()))
def test_offset_scales_and_map_equal_bitsandbytes(name: str) -> None:
    weight = _weights()[name].to(torch.bfloat16)
    _, absmax = quantize_4bit(weight, _book("nf4"))
    nested = quantize_absmax(absmax, dynamic_map())
    _, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert nested.offset == state.offset.item()  # the float32 mean, as a Python float
    assert torch.equal(nested.scales.view(torch.int32), state.state2.absmax.view(torch.int32))
    assert torch.equal(state.state2.code.view(torch.int32), dynamic_map().view(torch.int32))
    assert nested.codes.dtype == torch.uint8 and nested.codes.shape == absmax.shape


@pytest.mark.parametrize("name", list(_weights()))
def test_codes_are_exactly_nearest(name: str) -> None:
    _, absmax = quantize_4bit(_weights()[name], _book("nf4"))
    nested = quantize_absmax(absmax, dynamic_map())
    centred = absmax - torch.tensor(nested.offset, dtype=torch.float32)
    scale = nested.scales.repeat_interleave(256)[: absmax.numel()]
    x = torch.nan_to_num(centred * (1.0 / scale), nan=0.0).clamp(-1, 1)
    assert torch.equal(nested.codes, _brute_force_nearest(x, dynamic_map()))


def test_exact_ties_go_to_the_even_index() -> None:
    table = dynamic_map()
    midpoints = ((table[:-1].double() + table[1:].double()) / 2).float()
    exact = midpoints.double() == (table[:-1].double() + table[1:].double()) / 2  # representable midpoints
    codes = nearest_codes(midpoints[exact], table)
    lower = torch.nonzero(exact).squeeze(1)
    assert torch.equal(codes.long(), torch.where(lower % 2 == 0, lower, lower + 1))


@pytest.mark.parametrize("name", list(_weights()))
def test_differences_from_bitsandbytes_are_small(name: str) -> None:
    weight = _weights()[name]
    _, absmax = quantize_4bit(weight, _book("nf4"))
    nested = quantize_absmax(absmax, dynamic_map())
    _, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    codes, differ = assert_nested_close(nested.codes, state.absmax, nested.scales, nested.offset)
    assert differ <= 0.01 * max(1, codes)  # about 0.2 % of codes on N(0, s) weights
    # where the scale is 0 every code reads back as the offset: bitsandbytes writes 0, we the code of 0.0
    zero = nested.scales.repeat_interleave(256)[: absmax.numel()] == 0
    assert torch.all(nested.codes[zero] == 127)


@pytest.mark.parametrize("name", list(_weights()))
def test_reading_stored_codes_equals_bitsandbytes(name: str) -> None:
    # the same stored tensors (bitsandbytes' codes) read back bit for bit as bitsandbytes reads them
    _, state = F.quantize_4bit(_weights()[name], blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = dequantize_absmax(state.absmax, state.state2.absmax, state.state2.code, state.offset.item())
    theirs = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))


def test_dequantize_absmax_checks_sizes() -> None:
    with pytest.raises(ValueError, match="nested scales"):
        dequantize_absmax(torch.zeros(300, dtype=torch.uint8), torch.ones(1), dynamic_map(), 0.0)
    with pytest.raises(ValueError, match="uint8"):
        dequantize_absmax(torch.zeros(3), torch.ones(1), dynamic_map(), 0.0)


def test_lookup_coding_equals_exact_nearest() -> None:
    # the fast path (pipeline) and the exact search (oracle above) agree everywhere: random values,
    # every midpoint and its neighbours within 8 ulps, zeros, +-1
    book = nested_codebook()
    table = dynamic_map()
    midpoints = ((table[:-1].double() + table[1:].double()) / 2).float()
    bits = midpoints.view(torch.int32).to(torch.int64)
    near = (bits.unsqueeze(1) + torch.arange(-8, 9)).reshape(-1).to(torch.int32).view(torch.float32)
    x = torch.cat([torch.rand(100_000, generator=torch.Generator().manual_seed(1)) * 2 - 1, near,
                   torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30])])
    assert torch.equal(book.codes(x), nearest_codes(x, table))
    absmax = torch.rand(1000, generator=torch.Generator().manual_seed(2))
    fast, slow = quantize_absmax(absmax, book), quantize_absmax(absmax, table)
    assert torch.equal(fast.codes, slow.codes) and torch.equal(fast.scales, slow.scales) and fast.offset == slow.offset

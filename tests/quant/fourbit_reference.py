"""The 4-bit format's definition as an oracle: decode stored codes and tables, independent of any kernel.

bitsandbytes 0.50.2's CPU ``dequantize_4bit`` is not a portable oracle: with AVX-512F it takes a
vectorised C path (last dimension a multiple of 16) that assumes every 64-block lies inside one row,
so it reads the wrong absmax whenever the last dimension is not a multiple of the blocksize (e.g.
(48, 80): off by 0.031; (32, 32): every row reads absmax[0]), while AVX2-only CPUs take its correct
scalar path. What the format defines (blockwise absmax quantisation with double quantisation, QLoRA
paper, Dettmers et al. 2023, https://arxiv.org/abs/2305.14314; the stored fields are those of
bitsandbytes' ``QuantState`` in bitsandbytes/functional.py) is simple enough to compute here, from
the codes and tables bitsandbytes (or transformers through it) actually stored:

    w[i]   = to_dtype(float32(quant_map[code[i]] * absmax[i // blocksize]))
    absmax = float32(float32(nested_map[q[j]] * nested_absmax[j // 256]) + offset)   (double quant)

Each step is one float32 multiply or add. It is computed in float64 and then rounded once to
float32: a product of two float32 values is exact in float64, and for a sum float64's 53 bits are
more than 2 * 24 + 2, so rounding through float64 gives the correctly rounded float32 result on any
CPU, with no dependence on vector width, FMA contraction or thread count.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def unpack_codes(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The 4-bit codes, first element in the high nibble, as int64 indices."""
    data = packed.contiguous().view(torch.uint8).reshape(-1).long()
    return torch.stack([data >> 4, data & 15], dim=1).reshape(-1)[:n]


def decode_absmax(codes: torch.Tensor, nested_absmax: torch.Tensor, nested_quant_map: torch.Tensor,
                  offset: float | torch.Tensor, nested_blocksize: int = 256) -> torch.Tensor:
    """Float32 first-level absmax from double-quantised codes: map8[q] * a2 in float32, plus the offset."""
    index = torch.arange(codes.numel()) // nested_blocksize
    scaled = (nested_quant_map.double()[codes.reshape(-1).long()] * nested_absmax.double()[index]).float()
    offset32 = torch.as_tensor(offset, dtype=torch.float32).double()
    return (scaled.double() + offset32).float()


def decode_4bit(packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor, shape: Sequence[int],
                blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    """The weight a 4-bit entry stands for, by the definition above (float32 absmax)."""
    n = 1
    for size in shape:
        n *= size
    values = quant_map.double()[unpack_codes(packed, n)]
    scales = absmax.double()[torch.arange(n) // blocksize]
    return (values * scales).float().to(dtype).reshape(tuple(shape))


def decode_quant_state(packed: torch.Tensor, state: object, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode bitsandbytes' stored data + ``QuantState`` (nested or not) by the definition, not its kernel."""
    absmax = state.absmax
    if state.nested:
        nested = state.state2
        absmax = decode_absmax(absmax, nested.absmax, nested.code, state.offset, nested.blocksize)
    return decode_4bit(packed, absmax, state.code, tuple(state.shape), state.blocksize, dtype or state.dtype)

"""Double quantisation: the first-level absmax values stored as 8-bit codes (QLoRA, section 3).

    offset    = mean(absmax)                              (float32, torch's mean)
    d         = absmax - offset
    scale[j]  = max |d| over nested blocks of 256         -> nested_absmax (float32)
    x         = float32(d * float32(1 / scale[j]))
    code      = nearest value of the 8-bit dynamic map to x, exact ties to the even index -> absmax (uint8)
    read:       absmax' = float32(float32(map[code] * scale[j]) + offset)

"Nearest" is exact: x is compared with the exact (float64) midpoints of neighbouring map values,
which is what bitsandbytes' CUDA kernel does. bitsandbytes 0.50 on the CPU picks the code through a
65,536-entry lookup table instead and lands one code away for a small fraction of values; both
dequantise within one map step of each other. A nested block whose ``d`` is all zero has scale 0
and gets the code of 0.0 (any code reads back as ``offset`` there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["NESTED_BLOCKSIZE", "NestedAbsmax", "dequantize_absmax", "nearest_codes", "quantize_absmax"]

NESTED_BLOCKSIZE = 256  # what bitsandbytes uses for the second level (stored in the quant_state)


@dataclass(frozen=True, eq=False)
class NestedAbsmax:
    """Second-level quantised absmax.

    Attributes:
        codes: uint8 ``(n_blocks,)``, stored as ``weight.absmax``.
        scales: float32 ``(ceil(n_blocks / 256),)``, stored as ``weight.nested_absmax``.
        offset: the float32 mean subtracted first, as a Python float (``nested_offset`` in the JSON).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    offset: float


def quantize_absmax(absmax: torch.Tensor, code_map: torch.Tensor, *, blocksize: int = NESTED_BLOCKSIZE) -> NestedAbsmax:
    """Double-quantise first-level ``absmax`` (float32, one per block) with the 8-bit ``code_map``.

    ``code_map`` must be sorted ascending (the dynamic map is). Computed in float32; inputs are not modified.
    """
    absmax = absmax.reshape(-1).to(torch.float32)
    offset = absmax.mean()  # same reduction as bitsandbytes on the same tensor, so the same float32
    centred = absmax - offset
    count = centred.numel()
    padded = torch.nn.functional.pad(centred, (0, -count % blocksize))  # zeros never raise a block's max
    scales = padded.view(-1, blocksize).abs().amax(dim=1)  # (n_nested,)
    per_element = scales.repeat_interleave(blocksize)[:count]
    x = centred * (1.0 / per_element)
    # scale 0 (a block of equal absmax values): 0 * inf is NaN there; those values read back as offset anyway
    x = torch.nan_to_num(x, nan=0.0).clamp(-1.0, 1.0)
    return NestedAbsmax(codes=nearest_codes(x, code_map), scales=scales, offset=float(offset))


def nearest_codes(x: torch.Tensor, code_map: torch.Tensor) -> torch.Tensor:
    """uint8 index of the value of sorted ``code_map`` nearest to each ``x``; exact ties go to the even index."""
    table = code_map.to(torch.float64)
    midpoints = (table[:-1] + table[1:]) / 2  # exact: neighbouring float32 values sum exactly in float64
    wide = x.to(torch.float64)
    index = torch.bucketize(wide, midpoints)  # count of midpoints strictly below x: ties land on the lower index
    below = index.clamp(max=midpoints.numel() - 1)
    tie = (wide == midpoints[below]) & (index % 2 == 1) & (index < midpoints.numel())
    return (index + tie.to(index.dtype)).to(torch.uint8)


def dequantize_absmax(codes: torch.Tensor, scales: torch.Tensor, code_map: torch.Tensor, offset: float, *,
                      blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    """First-level absmax back from its codes: ``float32(float32(code_map[code] * scale) + offset)``.

    ``code_map`` is the checkpoint's stored ``nested_quant_map`` and ``offset`` its ``nested_offset``.
    """
    codes = codes.reshape(-1)
    if codes.dtype != torch.uint8:
        raise ValueError(f"nested absmax codes must be uint8, got {codes.dtype}")
    count = codes.numel()
    if scales.numel() != -(-count // blocksize):
        raise ValueError(f"{count} absmax codes need {-(-count // blocksize)} nested scales, got {scales.numel()}")
    values = torch.index_select(code_map.reshape(-1).to(torch.float32), 0, codes.to(torch.int32))
    per_element = scales.reshape(-1).to(torch.float32).repeat_interleave(blocksize)[:count]
    return values * per_element + torch.tensor(offset, dtype=torch.float32)

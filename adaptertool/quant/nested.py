"""Double quantisation: the first-level absmax values stored as 8-bit codes (QLoRA, section 3).

    offset    = mean(absmax)                              (float32, torch's mean)
    d         = absmax - offset
    scale[j]  = max |d| over nested blocks of 256         -> nested_absmax (float32)
    x         = float32(d * float32(1 / scale[j]))
    code      = nearest value of the 8-bit dynamic map to x, exact ties to the even index -> absmax (uint8)
    read:       absmax' = float32(float32(map[code] * scale[j]) + offset)

"Nearest" is exact: x is compared with the exact (float64) midpoints of neighbouring map values,
the rule of bitsandbytes' CUDA kernel. bitsandbytes 0.50 on the CPU picks the code through a
65,536-entry lookup table instead, which is not exactly nearest: on SmolLM2-135M's weights 0.23 %
of its codes differ from ours, by one index except a few dozen by two or three where |x| < 6e-6
(the map's densest region, steps of 1e-6..1e-5); read back, the two never differ by more than the
map's widest step times the scale. A nested block whose ``d`` is all zero has scale 0 and gets the
code of 0.0 (bitsandbytes writes code 0; any code reads back as ``offset`` there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaptertool.quant.lookup import build_lookup, lookup_codes
from adaptertool.quant.tables import dynamic_map

__all__ = [
    "NESTED_BLOCKSIZE", "NestedAbsmax", "NestedCodebook", "dequantize_absmax", "nearest_codes", "nested_codebook",
    "quantize_absmax",
]

NESTED_BLOCKSIZE = 256  # what bitsandbytes uses for the second level (stored in the quant_state)
_AMBIGUOUS = 0x100  # flag in a lookup entry (codes use all 8 bits, so the table is int16)


@dataclass(frozen=True, eq=False)
class NestedCodebook:
    """The sorted 8-bit map with a lookup table for exact nearest coding (see :mod:`.lookup`).

    Building the table takes ~0.2 s: build it once (:func:`nested_codebook`) and reuse it for every weight.
    """

    values: torch.Tensor  # (256,) float32, sorted: what nested_quant_map stores
    lookup: torch.Tensor  # (2**20,) int16

    @classmethod
    def from_values(cls, values: torch.Tensor) -> NestedCodebook:
        values = values.to(torch.float32).contiguous()
        if values.shape != (256,) or not bool(torch.all(values[1:] > values[:-1])):
            raise ValueError("an 8-bit map needs 256 increasing values")
        return cls(values, build_lookup(lambda x: nearest_codes(x, values), flag=_AMBIGUOUS, dtype=torch.int16))

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 nearest codes of float32 ``x``, exactly as :func:`nearest_codes`."""
        flat = x.reshape(-1).to(torch.float32)
        codes = lookup_codes(flat, self.lookup, lambda v: nearest_codes(v, self.values), flag=_AMBIGUOUS)
        return codes.to(torch.uint8).view(x.shape)


def nested_codebook() -> NestedCodebook:
    """:class:`NestedCodebook` of the signed 8-bit dynamic map."""
    return NestedCodebook.from_values(dynamic_map())


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


def quantize_absmax(absmax: torch.Tensor, code_map: torch.Tensor | NestedCodebook, *,
                    blocksize: int = NESTED_BLOCKSIZE) -> NestedAbsmax:
    """Double-quantise first-level ``absmax`` (float32, one per block) with an 8-bit map.

    ``code_map`` is a :class:`NestedCodebook` (fast) or the sorted map itself (exact search per
    value; same result). Computed in float32; inputs are not modified.
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
    codes = code_map.codes(x) if isinstance(code_map, NestedCodebook) else nearest_codes(x, code_map)
    return NestedAbsmax(codes=codes, scales=scales, offset=float(offset))


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

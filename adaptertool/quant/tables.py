"""The 4-bit code tables (NF4, FP4), the 8-bit dynamic map, and a lookup table for fast exact coding.

NF4 is the 4-bit NormalFloat of QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314):
16 values at normal quantiles, scaled to [-1, 1], with an exact zero. FP4 is a sign + 3-bit float
(bitsandbytes' layout: sign bit 0b1000). The 8-bit dynamic map is the signed "dynamic tree" type
of 8-bit optimisers (Dettmers 2015, https://arxiv.org/abs/1511.04561) that double quantisation uses
for the absmax values. Values are fixed float32 bit patterns: the checkpoint stores them as
``quant_map`` / ``nested_quant_map`` and readers must use the stored copies.

Coding rule (as bitsandbytes 0.50 on the CPU): sort the 16 values (stably: FP4's two zeros, codes 0
and 8, keep that order), take the float32 midpoints of neighbours as 15 thresholds, and give ``x``
the sorted position ``#{k: x > t_k}`` (ties go to the lower value), mapped back to its code. So 0.0
codes as 0 and FP4's tiny positive values (0 < x <= 1/384) as 8, as bitsandbytes does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

from adaptertool.quant.lookup import build_lookup

__all__ = ["AMBIGUOUS", "QUANT_TYPES", "Codebook", "codebook", "dynamic_map", "fourbit_values"]

QUANT_TYPES = ("nf4", "fp4")

# NF4 as float32 bit patterns, code 0..15 (format reference; equal to bitsandbytes' table).
_NF4_BITS = (
    0xBF800000, 0xBF3239B1, 0xBF066B30, 0xBECA32A0, 0xBE91A24D, 0xBE3D353F, 0xBDBA7871, 0x00000000,
    0x3DA2FAFF, 0x3E24CAE3, 0x3E7C04DD, 0x3EAD033A, 0x3EE1A4B8, 0x3F1007AB, 0x3F3913B3, 0x3F800000,
)
# FP4 magnitudes for codes 0..7 (exponent/mantissa layout scaled so the largest is 1); codes 8..15
# are the same with the sign bit set, except that code 8 is stored as +0.0, not -0.0: that is
# bitsandbytes 0.50's quant_map bit for bit (a sign-bit reading would give -0; the library's table has +0).
_FP4_MAGNITUDES = (0.0, 1 / 192, 2 / 3, 1.0, 1 / 3, 0.5, 1 / 6, 0.25)

AMBIGUOUS = 0x10  # flag in a lookup entry: a threshold falls inside this key's range


def fourbit_values(quant_type: str) -> torch.Tensor:
    """The 16 code values of ``quant_type`` ("nf4" or "fp4") as float32, code order (the ``quant_map``)."""
    if quant_type == "nf4":
        return torch.tensor([struct.unpack("<f", struct.pack("<I", bits))[0] for bits in _NF4_BITS], dtype=torch.float32)
    if quant_type == "fp4":
        magnitudes = torch.tensor(_FP4_MAGNITUDES, dtype=torch.float32)
        return torch.cat([magnitudes, torch.zeros(1), -magnitudes[1:]])
    raise ValueError(f"unknown 4-bit type {quant_type!r}; expected one of {QUANT_TYPES}")


def dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic map: 256 sorted float32 values in [-1, 1], index 127 = 0, 255 = 1.

    For each decimal exponent e = -6..0 the map holds 2**(e+6) values ``±10**e * m``, where m runs
    over the midpoints of ``2**(e+6) + 1`` points evenly spaced on [0.1, 1] (float32), plus 0 and 1.
    That is 2 * 127 + 2 = 256 values; sorted ascending.
    """
    values: list[float] = []
    for level in range(7):
        edges = torch.linspace(0.1, 1.0, 2**level + 1, dtype=torch.float32)
        midpoints = (edges[:-1] + edges[1:]) / 2
        scale = 10.0 ** (level - 6)
        values += (midpoints * scale).tolist() + (midpoints * -scale).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


@dataclass(frozen=True, eq=False)
class Codebook:
    """A 4-bit code table with everything the quantiser needs, built once and reused for every tensor.

    Attributes:
        quant_type: "nf4" or "fp4" (or "custom" for a table given by the caller).
        values: (16,) float32, code order: what ``quant_map`` stores.
        thresholds: (15,) float32 midpoints between the sorted values.
        order: (16,) int64, sorted position -> code.
        lookup: (2**20,) uint8, the code of every float32 whose top 20 bits are the index, or
            ``0x10 | low code`` where a threshold falls inside that range (see :mod:`.lookup`).
        zero_code: the code of 0.0, which pads an odd element count.
    """

    quant_type: str
    values: torch.Tensor
    thresholds: torch.Tensor
    order: torch.Tensor
    lookup: torch.Tensor
    zero_code: int

    @classmethod
    def from_values(cls, values: torch.Tensor, quant_type: str = "custom") -> Codebook:
        """Build the thresholds and the lookup table for 16 float32 code values."""
        if values.shape != (16,):
            raise ValueError(f"a 4-bit codebook needs 16 values, got shape {tuple(values.shape)}")
        values = values.to(torch.float32).contiguous()
        sorted_values, order = torch.sort(values, stable=True)
        thresholds = (sorted_values[:-1] + sorted_values[1:]) / 2
        partial = cls(quant_type, values, thresholds, order, torch.empty(0, dtype=torch.uint8), 0)
        zero_code = int(partial.exact_codes(torch.zeros(1))[0])
        lookup = build_lookup(partial.exact_codes, flag=AMBIGUOUS, dtype=torch.uint8)
        return cls(quant_type, values, thresholds, order, lookup, zero_code)

    def exact_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Codes (uint8) of float32 ``x`` by the coding rule, one binary search per element (slow, exact)."""
        return self.order[torch.bucketize(x, self.thresholds)].to(torch.uint8)


def codebook(quant_type: str) -> Codebook:
    """The :class:`Codebook` of "nf4" or "fp4"."""
    return Codebook.from_values(fourbit_values(quant_type), quant_type)

"""Shared check for double-quantised absmax codes against bitsandbytes 0.50's (quant and ops tests).

bitsandbytes 0.50 on the CPU picks 8-bit codes through a 65,536-entry lookup table, not by exact
nearest value. Measured on every quantised weight of SmolLM2-135M (1,658,880 codes): 0.23 % differ
from the exact nearest code, by one index except 58 codes that differ by two or three indices, all
with |x| < 6e-6, where the dynamic map's steps are ~1e-6..1e-5 (MiniLM: 379 of 165,888, 6 by more
than one). So: index differences of one anywhere, of up to three only in that dense region, and in
value never more than one step of the map's coarsest resolution (its widest gap) times the scale.
"""

from __future__ import annotations

import torch

from adaptertool.quant import dequantize_absmax, dynamic_map

DENSE_REGION = 1e-4  # |map value| (ours and theirs) below which the CPU table's codes may be up to three indices off


def assert_nested_close(ours: torch.Tensor, theirs: torch.Tensor, scales: torch.Tensor, offset: float) -> tuple[int, int]:
    """Check our codes against bitsandbytes' (same scales and offset); returns (codes, codes differing)."""
    table = dynamic_map()
    steps = (ours.int() - theirs.int()).abs()
    live = scales.repeat_interleave(256)[: ours.numel()] > 0  # a zero scale reads back as offset whatever the code
    far = live & (steps > 1)
    assert int((steps * live).max()) <= 3
    assert torch.all(table[theirs[far].long()].abs() < DENSE_REGION) and torch.all(table[ours[far].long()].abs() < DENSE_REGION)
    ours_value = dequantize_absmax(ours, scales, table, offset).double()
    theirs_value = dequantize_absmax(theirs, scales, table, offset).double()
    widest_step = (table[1:].double() - table[:-1].double()).max()
    rounding = 2 * torch.finfo(torch.float32).eps * theirs_value.abs()  # both sums round to float32
    bound = widest_step * scales.double().repeat_interleave(256)[: ours.numel()] + rounding
    assert torch.all((ours_value - theirs_value).abs() <= bound)
    return int(live.sum()), int((live & (steps > 0)).sum())

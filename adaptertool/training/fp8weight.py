"""A frozen FP8 base weight (block FP8 as DeepSeek-V3 / Qwen3-FP8 ship it, or compressed-tensors
per channel / per tensor): the float8_e4m3fn codes (1 byte a weight) and their scales stay
resident, and the dense weight is expanded on the fly, in the forward and again in the backward
(:mod:`adaptertool.training.lora`), as QLoRA does with NF4. The decode is ``adaptertool dequantize``'s
(:func:`adaptertool.quant.dequantize_fp8`): ``W[i, j] = q[i, j] * s[i // bn, j // bk]``, rounded
once to the compute dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from adaptertool.quant import Fp8Scheme, check_fp8, dequantize_fp8

__all__ = ["Fp8Weight"]


class Fp8Weight(nn.Module):
    """A frozen weight held as FP8 codes and scales.

    Buffers: ``codes`` float8_e4m3fn ``(out, in)``; ``scale`` as stored (float32, bfloat16 or
    float8_e8m0fnu), shaped as ``scheme`` lays it out. Their values are checked once, here
    (:func:`~adaptertool.quant.check_fp8`), not at every decode.

    Raises:
        AdapterToolError: NaN codes, or scales that are not finite and positive (from the constructor).
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, scheme: Fp8Scheme, *, source: str = "checkpoint") -> None:
        super().__init__()
        check_fp8(codes, scale, scheme, source=source)
        self.scheme = scheme
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def codes_as_parameters(self) -> None:
        """Hold the codes and scales as frozen parameters instead of buffers, so that FSDP2, which
        shards parameters and replicates buffers, shards them; a second call (on the whole model, after
        its blocks) changes nothing."""
        for name in ("codes", "scale"):
            tensor = self._buffers.pop(name, None)
            if tensor is not None:
                self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense weight on the codes' device: ``q * s`` per block, rounded once to ``dtype``."""
        return dequantize_fp8(self.codes, self.scale, self.scheme, dtype=dtype, checked=True)

    def extra_repr(self) -> str:
        block = f"block={list(self.scheme.block)}" if self.scheme.block else f"per {self.scheme.strategy}"
        return f"shape={list(self.shape)}, {block}, scale_fmt={self.scheme.scale_fmt}"

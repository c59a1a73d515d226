"""QLoRA's frozen 4-bit base weight (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314).

Only the packed codes and their absmax stay resident; the dense weight is expanded on the fly,
in the forward and again in the backward (:mod:`adaptertool.training.lora`), by the same reader
``adaptertool dequantize`` uses (:func:`adaptertool.quant.dequantize_stored`).
"""

from __future__ import annotations

import torch
from torch import nn

from adaptertool.quant import (
    Codebook,
    NestedCodebook,
    StoredWeight,
    dequantize_stored,
    dynamic_map,
    quantize_weight,
)

__all__ = ["FourBitWeight"]


class FourBitWeight(nn.Module):
    """A frozen weight held as bitsandbytes 4-bit codes (the layout of :mod:`adaptertool.quant.bnb_format`).

    Buffers: ``packed`` uint8 ``(ceil(n/2), 1)``, two codes per byte, high nibble first;
    ``absmax`` float32 per block, or uint8 codes with ``nested_absmax`` / ``nested_quant_map``
    under double quantisation; ``quant_map`` the 16 code values. ``W[i] = quant_map[code[i]] *
    absmax[i // blocksize]`` in float32, cast once.
    """

    def __init__(self, stored: StoredWeight) -> None:
        super().__init__()
        self.state = stored.state
        self.register_buffer("packed", stored.packed)
        self.register_buffer("absmax", stored.absmax.reshape(-1))
        self.register_buffer("quant_map", stored.quant_map.reshape(-1))
        if stored.nested_absmax is not None and stored.nested_quant_map is not None:
            self.register_buffer("nested_absmax", stored.nested_absmax.reshape(-1))
            self.register_buffer("nested_quant_map", stored.nested_quant_map.reshape(-1))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.state.shape

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nested_offset(self) -> float | None:
        return self.state.nested_offset

    @classmethod
    def from_stored(cls, stored: StoredWeight) -> FourBitWeight:
        """Wrap one weight read from a 4-bit checkpoint (:func:`adaptertool.quant.read_stored` checked its sizes)."""
        return cls(stored)

    @classmethod
    def quantize(cls, weight: torch.Tensor, book: Codebook, *, code_map: NestedCodebook | None, blocksize: int = 64,
                 name: str = "weight", source: str = "checkpoint") -> FourBitWeight:
        """Quantise a CPU ``weight`` from its own dtype, as ``adaptertool quantize`` does (double quant with ``code_map``).

        ``name`` and ``source`` name the tensor and its file in errors.
        """
        done = quantize_weight(weight, book, blocksize=blocksize, code_map=code_map, name=name, source=source)
        nested = {}
        if done.nested is not None:
            nested = {"nested_absmax": done.nested.scales, "nested_quant_map": dynamic_map()}
        # a copy of the table: every weight owns its buffers, as when read from a checkpoint
        return cls(StoredWeight(state=done.state, packed=done.packed, absmax=done.absmax,
                                quant_map=book.values.clone(), **nested))

    def codes_as_parameters(self) -> None:
        """Hold the codes and scales as frozen parameters instead of buffers, so that FSDP2, which
        shards parameters and replicates buffers, shards them; the two small code tables stay buffers."""
        for name in ("packed", "absmax", "nested_absmax"):
            if name in self._buffers:
                tensor = self._buffers.pop(name)
                self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense weight on the buffers' device: ``float32(quant_map[code] * absmax)``, cast once to ``dtype``."""
        return dequantize_stored(self._stored(), dtype=dtype)

    def _stored(self) -> StoredWeight:
        # the buffers, wherever .to() has moved them
        nested = {}
        if self.state.nested:
            nested = {"nested_absmax": self.nested_absmax, "nested_quant_map": self.nested_quant_map}
        return StoredWeight(state=self.state, packed=self.packed, absmax=self.absmax, quant_map=self.quant_map, **nested)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, blocksize={self.state.blocksize}, double_quant={self.state.nested}"


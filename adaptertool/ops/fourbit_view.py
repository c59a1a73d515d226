"""A bitsandbytes 4-bit checkpoint seen as the 16-bit checkpoint it stands for.

Each quantised weight ``P.weight`` (packed codes plus absmax, quant_map, nested tables and
quant_state) appears as one tensor ``P.weight`` of its original dtype and shape, dequantised with
its stored tables when read; the companion entries disappear. Every other tensor passes through
untouched, so pipelines written for plain checkpoints (merge) work on 4-bit bases unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from adaptertool.io import Checkpoint, TensorInfo, TensorSpec, code_of_name
from adaptertool.ops.quantize import read_quantized_weight, read_state
from adaptertool.quant import FourBitState, QuantizedKeys, find_quantized_weights

if TYPE_CHECKING:
    import torch

__all__ = ["FourBitView", "open_fourbit_view"]



class FourBitView:
    """Read-only, checkpoint-like view: ``in``, ``[name]``, iteration, ``specs()``, ``read()``, ``copy_bytes()``."""

    path: Path

    def __init__(self, ckpt: Checkpoint, quantized: dict[str, QuantizedKeys], states: dict[str, FourBitState]) -> None:
        self.checkpoint = ckpt
        self.path = ckpt.path
        self.quantized = quantized
        self.states = states
        hidden = {key for keys in quantized.values() for key in keys.keys}
        self.tensors: dict[str, TensorInfo] = {}
        for name, info in ckpt.tensors.items():
            if name in quantized:
                state = states[name]
                spec = TensorSpec(name, code_of_name(state.dtype), state.shape)
                self.tensors[name] = TensorInfo(spec, info.file, info.offset)
            elif name not in hidden:
                self.tensors[name] = info

    @property
    def root(self) -> Path | None:
        return self.checkpoint.root

    @property
    def metadata(self) -> dict[str, str]:
        return self.checkpoint.metadata

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __getitem__(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def specs(self) -> list[TensorSpec]:
        return [info.spec for info in self.tensors.values()]

    def read(self, name: str, *, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """A plain tensor; quantised weights come back dequantised to the dtype they were quantised from."""
        keys = self.quantized.get(name)
        if keys is None:
            return self.checkpoint.read(name, buffer=buffer)
        return read_quantized_weight(self.checkpoint, keys, dtype=None)

    def copy_bytes(self, name: str, dst: BinaryIO) -> None:
        if name in self.quantized:
            raise ValueError(f"{name} is quantised; it cannot be copied as 16-bit bytes")
        self.checkpoint.copy_bytes(name, dst)


def open_fourbit_view(ckpt: Checkpoint) -> FourBitView | None:
    """The 16-bit view of ``ckpt`` if it holds bitsandbytes 4-bit weights, else None."""
    quantized = find_quantized_weights(ckpt.tensors, source=str(ckpt.path))
    if not quantized:
        return None
    states = {name: read_state(ckpt, keys) for name, keys in quantized.items()}
    return FourBitView(ckpt, quantized, states)

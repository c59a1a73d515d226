"""Reading a bitsandbytes 4-bit checkpoint: one weight, a summary for info, or the whole as a 16-bit view.

The maths and the checks are :mod:`adaptertool.quant.stored`'s; this module only binds them to an
opened checkpoint. In the view, each quantised weight ``P.weight`` (packed codes plus absmax,
quant_map, nested tables and quant_state) appears as one tensor ``P.weight`` of its original
dtype and shape, dequantised with its stored tables when read; the companion entries disappear.
Every other tensor passes through untouched, so pipelines written for plain checkpoints (merge)
work on 4-bit bases unchanged.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from adaptertool.io import Checkpoint, TensorInfo, TensorSpec, TensorTable, code_of_name
from adaptertool.quant import (
    FourBitState,
    QuantizedKeys,
    dequantize_stored,
    find_quantized_weights,
    read_state,
    read_stored,
)

__all__ = [
    "QuantSummary", "QuantizedView", "describe_quantization", "open_quantized_view", "read_quantized_state",
    "read_quantized_weight",
]


def read_quantized_weight(ckpt: Checkpoint, keys: QuantizedKeys, *, dtype: torch.dtype | None = torch.float32,
                          device: torch.device | str | None = None) -> torch.Tensor:
    """Read one 4-bit weight's entries from ``ckpt`` and dequantise it with its stored tables.

    Args:
        ckpt: the opened 4-bit checkpoint.
        keys: from :func:`adaptertool.quant.find_quantized_weights` over ``ckpt``'s names.
        dtype: output dtype (float32 by default, for adding deltas); None for the recorded dtype.
        device: where to expand it; None for the CPU, where the entries are read.

    Raises:
        AdapterToolError: a malformed quant_state or entries whose sizes do not fit it.
    """
    stored = read_stored(ckpt.read, keys, source=str(ckpt[keys.weight].file))
    return dequantize_stored(stored, dtype=dtype, device=device)


def read_quantized_state(ckpt: Checkpoint, keys: QuantizedKeys) -> FourBitState:
    """Parse one 4-bit weight's stored quant_state (a few hundred bytes; the weight is not read)."""
    return read_state(ckpt.read, keys, source=str(ckpt[keys.quant_state].file))


class QuantizedView(TensorTable):
    """Read-only, checkpoint-like view: a :class:`~adaptertool.io.TensorSource` over ``ckpt``."""

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

    def read(self, name: str, *, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """A plain tensor; quantised weights come back dequantised to the dtype they were quantised from."""
        keys = self.quantized.get(name)
        if keys is None:
            return self.checkpoint.read(name, buffer=buffer)
        return read_quantized_weight(self.checkpoint, keys, dtype=None)

    def copyable(self, name: str) -> bool:
        """Whether ``name``'s stored bytes are the tensor (a quantised weight's are its codes)."""
        return name not in self.quantized

    def copy_bytes(self, name: str, dst: BinaryIO) -> None:
        if name in self.quantized:
            raise ValueError(f"{name} is quantised; it cannot be copied as 16-bit bytes")
        self.checkpoint.copy_bytes(name, dst)


def open_quantized_view(ckpt: Checkpoint) -> QuantizedView | None:
    """The 16-bit view of ``ckpt`` if it holds bitsandbytes 4-bit weights, else None."""
    quantized = find_quantized_weights(ckpt.tensors, source=str(ckpt.path))
    if not quantized:
        return None
    states = {name: read_quantized_state(ckpt, keys) for name, keys in quantized.items()}
    return QuantizedView(ckpt, quantized, states)


@dataclass(frozen=True, kw_only=True)
class QuantSummary:
    quant_types: dict[str, int]  # "nf4" -> weights
    blocksizes: dict[int, int]  # blocksize -> weights
    double_quant: int  # weights with double-quantised absmax
    weights: int
    parameters: int  # elements the 4-bit weights stand for
    stored_bytes: int  # bytes of all their entries
    original_bytes: int  # bytes at the dtype they were quantised from
    bytes_saved: int
    compute_dtype: str | None  # from config.json, where present
    skip_modules: list[str] | None


def describe_quantization(ckpt: Checkpoint, config: dict[str, Any] | None = None) -> QuantSummary | None:
    """Summarise a checkpoint's bitsandbytes 4-bit weights (reads only their small quant_state entries).

    Returns:
        None when the checkpoint holds no 4-bit weights.
    """
    found = find_quantized_weights(ckpt, source=str(ckpt.path))
    if not found:
        return None
    states = [read_quantized_state(ckpt, keys) for keys in found.values()]
    stored = sum(ckpt[key].nbytes for keys in found.values() for key in keys.keys)
    original = sum(s.numel * getattr(torch, s.dtype).itemsize for s in states)
    settings = (config or {}).get("quantization_config") or {}
    return QuantSummary(
        quant_types=dict(Counter(s.quant_type for s in states)), blocksizes=dict(Counter(s.blocksize for s in states)),
        double_quant=sum(s.nested for s in states), weights=len(states), parameters=sum(s.numel for s in states),
        stored_bytes=stored, original_bytes=original, bytes_saved=original - stored,
        compute_dtype=settings.get("bnb_4bit_compute_dtype"), skip_modules=settings.get("llm_int8_skip_modules"),
    )

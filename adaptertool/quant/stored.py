"""One bitsandbytes 4-bit weight as stored: read and checked once, dequantised by one function, made by one.

Every reader of 4-bit data (dequantize, merge's 4-bit base, info, QLoRA's loader) goes through
:func:`read_stored` and :func:`dequantize_stored`; every writer (quantize, merge --requantize,
QLoRA's quantise-at-load) through :func:`quantize_weight`. The entries are fetched through a
``read(key) -> Tensor`` callable, so this stays free of files: a checkpoint's ``read``, or a
dict's ``__getitem__``. The layout itself is :mod:`adaptertool.quant.bnb_format`.

A sibling module per further format (FP8, MXFP4) would offer the same functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from adaptertool.errors import InputError, OptionError
from adaptertool.quant.bnb_format import FourBitState, QuantizedKeys
from adaptertool.quant.fourbit import BLOCKSIZES, block_count, dequantize_4bit, packed_size, quantize_4bit
from adaptertool.quant.nested import NESTED_BLOCKSIZE, NestedAbsmax, NestedCodebook, dequantize_absmax, quantize_absmax
from adaptertool.quant.tables import Codebook

__all__ = [
    "QuantizedWeight", "StoredWeight", "check_entries", "dequantize_stored", "dequantize_weight", "quantize_weight",
    "read_state", "read_stored",
]

_Read = Callable[[str], torch.Tensor]  # a checkpoint's read, or a dict's __getitem__


@dataclass(frozen=True, eq=False)
class StoredWeight:
    """One weight's stored tensors, as the checkpoint holds them, with its parsed quant_state."""

    state: FourBitState
    packed: torch.Tensor  # uint8, ceil(n/2) bytes
    absmax: torch.Tensor  # float32 per block, or uint8 codes under double quantisation
    quant_map: torch.Tensor  # (16,) float32
    nested_absmax: torch.Tensor | None = None  # float32 per nested block (double quantisation only)
    nested_quant_map: torch.Tensor | None = None  # (256,) float32 (double quantisation only)


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """What :func:`quantize_weight` makes of one weight; its quant_map is the codebook's values."""

    packed: torch.Tensor  # uint8 (ceil(n/2), 1)
    absmax: torch.Tensor  # float32 per block, or uint8 codes (= nested.codes) under double quantisation
    nested: NestedAbsmax | None
    state: FourBitState


def read_state(read: _Read, keys: QuantizedKeys, *, source: str = "checkpoint") -> FourBitState:
    """Parse one weight's quant_state entry (a few hundred bytes; the weight is not read)."""
    return FourBitState.from_tensor(read(keys.quant_state), key=keys.quant_state, source=source)


def read_stored(read: _Read, keys: QuantizedKeys, *, source: str = "checkpoint") -> StoredWeight:
    """Read one weight's entries, parse its quant_state and check the entries against it.

    Raises:
        AdapterToolError: a malformed quant_state or entries whose sizes do not fit it.
    """
    state = read_state(read, keys, source=source)
    entries = {key: read(key) for key in keys.keys if key != keys.quant_state}
    check_entries(entries, keys, state, source=source)
    nested = {}
    if keys.nested_absmax is not None and keys.nested_quant_map is not None:
        nested = {"nested_absmax": entries[keys.nested_absmax], "nested_quant_map": entries[keys.nested_quant_map]}
    return StoredWeight(state=state, packed=entries[keys.weight], absmax=entries[keys.absmax],
                        quant_map=entries[keys.quant_map], **nested)


def check_entries(tensors: Mapping[str, torch.Tensor], keys: QuantizedKeys, state: FourBitState, *,
                  source: str = "checkpoint") -> None:
    """Raise AdapterToolError unless the entries have the dtypes and sizes ``state`` implies."""
    if state.quant_type != keys.quant_type:
        raise InputError(f"{source}: {keys.quant_state} says quant_type {state.quant_type}; the checkpoint is corrupt")
    if state.nested != keys.nested:
        raise InputError(f"{source}: {keys.quant_state} and the stored entries disagree on double quantisation")
    blocks = block_count(state.numel, state.blocksize)
    expected = {keys.weight: (torch.uint8, packed_size(state.numel)), keys.quant_map: (torch.float32, 16),
                keys.absmax: (torch.uint8 if state.nested else torch.float32, blocks)}
    if keys.nested_absmax is not None and keys.nested_quant_map is not None:
        expected[keys.nested_absmax] = (torch.float32, block_count(blocks, _nested_blocksize(state)))
        expected[keys.nested_quant_map] = (torch.float32, 256)
    for key, (want_dtype, want_numel) in expected.items():
        got = tensors[key]
        if got.dtype != want_dtype or got.numel() != want_numel:
            raise InputError(
                f"{source}: {key} is {got.dtype} x{got.numel()} but the quant_state for shape {list(state.shape)} "
                f"needs {want_dtype} x{want_numel}; the checkpoint is corrupt"
            )


def dequantize_stored(weight: StoredWeight, *, dtype: torch.dtype | None = torch.float32,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """The dense weight, with the stored code tables (never constants): ``float32(quant_map[code] * absmax)``.

    Args:
        weight: from :func:`read_stored`.
        dtype: output dtype, cast once; None for the dtype recorded when the weight was quantised.
        device: where to expand it; None for the packed codes' device.
    """
    state = weight.state
    absmax = weight.absmax
    if state.nested:
        assert weight.nested_absmax is not None and weight.nested_quant_map is not None and state.nested_offset is not None
        absmax = dequantize_absmax(absmax, weight.nested_absmax, weight.nested_quant_map, state.nested_offset,
                                   blocksize=_nested_blocksize(state))
    return dequantize_4bit(weight.packed, absmax, weight.quant_map, shape=state.shape, blocksize=state.blocksize,
                           dtype=dtype if dtype is not None else getattr(torch, state.dtype), device=device)


def dequantize_weight(tensors: Mapping[str, torch.Tensor], keys: QuantizedKeys, *,
                      dtype: torch.dtype | None = torch.float32, source: str = "checkpoint") -> torch.Tensor:
    """:func:`dequantize_stored` of entries already in memory (``tensors`` holds at least those of ``keys``)."""
    return dequantize_stored(read_stored(tensors.__getitem__, keys, source=source), dtype=dtype)


def quantize_weight(weight: torch.Tensor, book: Codebook, *, blocksize: int = 64, code_map: NestedCodebook | None = None,
                    name: str = "weight", source: str = "checkpoint") -> QuantizedWeight:
    """Quantise ``weight`` from its own dtype (cast it first for another); double quantisation with ``code_map``.

    ``name`` and ``source`` name the tensor and its file in errors.

    Raises:
        AdapterToolError: a blocksize bitsandbytes does not use, or NaN/Inf in the weight.
    """
    if blocksize not in BLOCKSIZES:
        raise OptionError(f"4-bit blocksize must be one of {BLOCKSIZES}, not {blocksize}")
    packed, absmax = quantize_4bit(weight, book, blocksize=blocksize)
    # a NaN or Inf anywhere in a block makes its absmax non-finite: one cheap check per weight
    if not bool(torch.isfinite(absmax).all()):
        raise InputError(
            f"{source}: tensor {name} holds NaN or Inf; it cannot be quantised (find them with adaptertool verify --nan)"
        )
    nested = None if code_map is None else quantize_absmax(absmax, code_map)
    state = FourBitState(quant_type=book.quant_type, blocksize=blocksize, dtype=str(weight.dtype).removeprefix("torch."),
                         shape=tuple(weight.shape), **_nested_fields(nested))
    return QuantizedWeight(packed=packed, absmax=absmax if nested is None else nested.codes, nested=nested, state=state)


def _nested_fields(nested: NestedAbsmax | None) -> dict[str, Any]:
    if nested is None:
        return {}
    return {"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32", "nested_offset": nested.offset}


def _nested_blocksize(state: FourBitState) -> int:
    return state.nested_blocksize or NESTED_BLOCKSIZE

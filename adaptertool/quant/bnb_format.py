"""The bitsandbytes 4-bit checkpoint layout, as transformers saves and loads it; pure functions over tensors.

A quantised Linear weight ``P.weight`` becomes these state-dict entries, in this order (a bias, if
any, keeps its own key ``P.bias`` and dtype):

    P.weight                                   uint8 (ceil(n/2), 1)       packed codes
    P.weight.absmax                            uint8 (nb,), float32 without double quantisation
    P.weight.quant_map                         float32 (16,)              the code values
    P.weight.nested_absmax                     float32 (ceil(nb/256),)    double quantisation only
    P.weight.nested_quant_map                  float32 (256,)             double quantisation only
    P.weight.quant_state.bitsandbytes__nf4     uint8 (len(json),)         the JSON below, UTF-8

The JSON is ``json.dumps`` (default separators) of, in this key order: quant_type, blocksize, dtype
(of the weight when quantised), shape, and with double quantisation nested_blocksize, nested_dtype,
nested_offset (a float32 value printed as a Python float). ``fp4`` replaces ``nf4`` in the key.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from adaptertool.errors import InputError
from adaptertool.quant.fourbit import BLOCKSIZES, block_count, packed_size
from adaptertool.quant.nested import NESTED_BLOCKSIZE
from adaptertool.quant.tables import QUANT_TYPES

__all__ = [
    "FLOAT_DTYPES",
    "FourBitState",
    "QuantizedKeys",
    "entry_layout",
    "find_quantized_weights",
    "quant_state_key",
    "quantization_config",
]

FLOAT_DTYPES = ("float32", "float16", "bfloat16")  # what bitsandbytes quantises (names as in the JSON)
_QUANT_STATE = ".quant_state.bitsandbytes__"
_COMPANIONS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")


def quant_state_key(weight: str, quant_type: str) -> str:
    """``P.weight`` -> ``P.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``)."""
    return f"{weight}{_QUANT_STATE}{quant_type}"


@dataclass(frozen=True, kw_only=True)
class FourBitState:
    """The non-tensor part of a quantised weight: what its ``quant_state.bitsandbytes__*`` JSON holds."""

    quant_type: str
    blocksize: int
    dtype: str  # torch dtype name of the weight when it was quantised, e.g. "bfloat16"
    shape: tuple[int, ...]
    nested_blocksize: int | None = None  # the next three are set with double quantisation only
    nested_dtype: str | None = None
    nested_offset: float | None = None

    @property
    def nested(self) -> bool:
        return self.nested_offset is not None

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    def to_json(self) -> bytes:
        """The UTF-8 JSON bytes bitsandbytes writes (key order and separators matter: byte-identical)."""
        state: dict[str, Any] = {"quant_type": self.quant_type, "blocksize": self.blocksize, "dtype": self.dtype,
                                 "shape": list(self.shape)}
        if self.nested:
            state.update(nested_blocksize=self.nested_blocksize, nested_dtype=self.nested_dtype,
                         nested_offset=self.nested_offset)
        return json.dumps(state).encode("utf-8")

    @classmethod
    def from_json(cls, blob: bytes, *, key: str, source: str = "checkpoint") -> FourBitState:
        """Parse and validate a stored quant_state; errors name ``source`` and ``key``."""
        try:
            raw = json.loads(blob.decode("utf-8"))
        except (ValueError, RecursionError) as err:  # bad UTF-8 or JSON, an integer past 4300 digits, deep nesting
            raise InputError(f"{source}: tensor {key} is not a bitsandbytes quant_state (not JSON: {err})") from None
        if not isinstance(raw, dict):
            raise InputError(f"{source}: tensor {key} is not a bitsandbytes quant_state (not a JSON object)")
        try:
            state = cls(quant_type=raw["quant_type"], blocksize=int(raw["blocksize"]), dtype=raw["dtype"],
                        shape=tuple(int(d) for d in raw["shape"]), nested_blocksize=raw.get("nested_blocksize"),
                        nested_dtype=raw.get("nested_dtype"), nested_offset=raw.get("nested_offset"))
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"{source}: quant_state {key} lacks or mangles {err}; the checkpoint is corrupt") from err
        problem = state._problem()
        if problem:
            raise InputError(f"{source}: quant_state {key} has {problem}; adaptertool reads bitsandbytes 4-bit checkpoints only")
        return state

    @classmethod
    def from_tensor(cls, blob: torch.Tensor, *, key: str, source: str = "checkpoint") -> FourBitState:
        """:meth:`from_json` of a stored quant_state entry (uint8, the JSON's UTF-8 bytes)."""
        return cls.from_json(bytes(blob.reshape(-1).tolist()), key=key, source=source)

    def _problem(self) -> str | None:
        if self.quant_type not in QUANT_TYPES:
            return f"quant_type {self.quant_type!r}"
        if self.blocksize not in BLOCKSIZES:
            return f"blocksize {self.blocksize}"
        if self.dtype not in FLOAT_DTYPES:
            return f"dtype {self.dtype!r}"
        nested_fields = (self.nested_blocksize, self.nested_dtype, self.nested_offset)
        if any(f is not None for f in nested_fields) and (
            self.nested_blocksize not in BLOCKSIZES or self.nested_dtype != "float32" or not isinstance(self.nested_offset, float)
        ):
            return f"nested_blocksize {self.nested_blocksize} / nested_dtype {self.nested_dtype!r} / nested_offset {self.nested_offset!r}"
        return None


@dataclass(frozen=True, kw_only=True)
class QuantizedKeys:
    """The keys of one quantised weight's entries in a checkpoint (names only; nothing is read)."""

    weight: str  # P.weight: the packed uint8 codes
    quant_type: str  # from the quant_state key's suffix
    absmax: str
    quant_map: str
    quant_state: str
    nested_absmax: str | None
    nested_quant_map: str | None

    @property
    def module(self) -> str:
        """``P`` for weight ``P.weight``."""
        return self.weight.removesuffix(".weight")

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def keys(self) -> tuple[str, ...]:
        """All entries in transformers' order."""
        nested = (self.nested_absmax, self.nested_quant_map) if self.nested else ()
        return (self.weight, self.absmax, self.quant_map, *nested, self.quant_state)  # type: ignore[return-value]


def find_quantized_weights(names: Iterable[str], *, source: str = "checkpoint") -> dict[str, QuantizedKeys]:
    """Find the bitsandbytes 4-bit weights among a checkpoint's tensor names.

    Returns:
        ``{weight key: QuantizedKeys}`` in the order the quant_state keys appear in ``names``;
        empty for a checkpoint without 4-bit weights.

    Raises:
        AdapterToolError: a weight whose companion entries are incomplete (the checkpoint is cut or mixed).
    """
    names = list(names)
    present = set(names)
    found: dict[str, QuantizedKeys] = {}
    for name in names:
        weight, marker, quant_type = name.rpartition(_QUANT_STATE)
        if not marker:
            continue
        if quant_type not in QUANT_TYPES:
            raise InputError(f"{source}: tensor {name} has unknown 4-bit type {quant_type!r}; expected nf4 or fp4")
        if weight in found:
            raise InputError(f"{source}: weight {weight} has two quant_state entries; the checkpoint is corrupt")
        missing = [weight + s for s in ("", ".absmax", ".quant_map") if weight + s not in present]
        nested = [weight + s in present for s in (".nested_absmax", ".nested_quant_map")]
        if nested[0] != nested[1]:
            missing.append(weight + (".nested_quant_map" if nested[0] else ".nested_absmax"))
        if missing:
            raise InputError(f"{source}: quantised weight {weight} lacks {missing[0]}; the checkpoint is incomplete")
        found[weight] = QuantizedKeys(
            weight=weight, quant_type=quant_type, absmax=weight + ".absmax", quant_map=weight + ".quant_map",
            quant_state=name, nested_absmax=weight + ".nested_absmax" if nested[0] else None,
            nested_quant_map=weight + ".nested_quant_map" if nested[0] else None,
        )
    claimed = {key for keys in found.values() for key in keys.keys}
    for name in names:
        base = next((name.removesuffix(s) for s in _COMPANIONS if name.endswith(s)), None)
        if base is not None and base in present and name not in claimed:
            raise InputError(f"{source}: tensor {name} belongs to a 4-bit weight but {base} has no quant_state; the checkpoint is incomplete")
    return found


def entry_layout(weight: str, shape: tuple[int, ...], *, quant_type: str, blocksize: int, double_quant: bool,
                 state_bytes: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(key, torch dtype name, shape)`` of every entry a quantised ``weight`` of ``shape`` becomes, in order.

    ``state_bytes`` is the length of the quant_state JSON (it depends on the nested offset's digits).
    """
    numel = 1
    for dim in shape:
        numel *= dim
    blocks = block_count(numel, blocksize)
    layout = [
        (weight, "uint8", (packed_size(numel), 1)),
        (weight + ".absmax", "uint8" if double_quant else "float32", (blocks,)),
        (weight + ".quant_map", "float32", (16,)),
    ]
    if double_quant:
        layout += [(weight + ".nested_absmax", "float32", (block_count(blocks, NESTED_BLOCKSIZE),)),
                   (weight + ".nested_quant_map", "float32", (256,))]
    layout.append((quant_state_key(weight, quant_type), "uint8", (state_bytes,)))
    return layout


def quantization_config(*, quant_type: str, double_quant: bool, compute_dtype: str,
                        skip_modules: list[str] | None) -> dict[str, Any]:
    """config.json's ``quantization_config`` exactly as transformers writes it for a 4-bit bitsandbytes model.

    ``compute_dtype`` is a torch dtype name ("bfloat16"); ``skip_modules`` None means transformers'
    default skips (output embedding, tied weights), a list replaces them.
    """
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }

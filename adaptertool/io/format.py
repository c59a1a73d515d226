"""The safetensors file layout: dtype codes, header parsing and header building.

Layout (https://github.com/huggingface/safetensors#format): an 8-byte little-endian header length N,
N bytes of JSON (padded with spaces to a multiple of 8 by writers), then the raw little-endian tensor
bytes, contiguous, with ``data_offsets`` relative to the end of the header.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from adaptertool.errors import AdapterToolError, InputError
from adaptertool.io import header_json

if TYPE_CHECKING:
    import torch

__all__ = [
    "DTYPES",
    "FLOAT_CODES",
    "HEADER_LIMIT",
    "TensorSpec",
    "build_header",
    "cast_specs",
    "code_of_name",
    "dtype_code",
    "dtype_name",
    "parse_header",
    "torch_dtype",
    "valid_utf8",
]

# The safetensors library refuses headers above 100 MB; so do we, before allocating anything.
HEADER_LIMIT = 100_000_000

# code -> (bytes per element, name of the torch dtype). Names, not dtypes: importing torch costs
# seconds of start-up that header-only commands (info, verify, byte copies) never need.
DTYPES: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U64": (8, "uint64"),
    "U32": (4, "uint32"),
    "U16": (2, "uint16"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
    "F8_E8M0": (1, "float8_e8m0fnu"),  # power-of-two scales (FP8 ue8m0); torch >= 2.7
    "C64": (8, "complex64"),
}


@cache
def _codes() -> dict[torch.dtype, str]:
    import torch

    return {getattr(torch, name): code for code, (_, name) in DTYPES.items() if hasattr(torch, name)}


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    try:
        return _codes()[dtype]
    except KeyError:
        raise InputError(f"dtype {dtype} has no safetensors code; cast the tensor first") from None


def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype as configs and quant states spell it (``torch.bfloat16`` -> ``"bfloat16"``)."""
    return str(dtype).removeprefix("torch.")


def code_of_name(name: str) -> str:
    """The safetensors code of a torch dtype name (``"bfloat16"`` -> ``"BF16"``), as configs and
    bitsandbytes quant states spell dtypes; no torch import needed."""
    for code, (_, torch_name) in DTYPES.items():
        if torch_name == name:
            return code
    raise InputError(f"dtype {name!r} is not one adaptertool knows")


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors code; an error where this torch build has none."""
    import torch

    dtype = getattr(torch, DTYPES[code][1], None)
    if dtype is None:
        raise InputError(f"dtype {code} is not supported by torch {torch.__version__}; upgrade torch")
    return dtype


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype code and shape of one tensor: all a writer needs to lay out a file."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * DTYPES[self.dtype][0]


# The dtypes a checkpoint's weights come in, and that --dtype may convert between.
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})


def cast_specs(specs: list[TensorSpec], code: str | None) -> list[TensorSpec]:
    """``specs`` with every float tensor's dtype set to ``code`` (None: unchanged)."""
    if code is None:
        return list(specs)
    return [TensorSpec(s.name, code, s.shape) if s.dtype in FLOAT_CODES else s for s in specs]


@dataclass(frozen=True)
class ParsedHeader:
    """A validated header: tensors in data order with offsets relative to the data start."""

    data_start: int
    tensors: list[tuple[TensorSpec, int]]  # (spec, begin offset), sorted by begin
    metadata: dict[str, str]


# A header of more tensors than this is refused, after reading that many: each costs about 12 us and
# 1 KB to parse, and safetensors' own limit (100 MB of header, some 1.4 million tensors) would cost
# half a minute and over a GB. The largest published checkpoints hold under 100,000 tensors in all.
MAX_TENSORS = 300_000
_U64 = (1 << 64) - 1
_FIELDS = ("dtype", "shape", "data_offsets")
_FIELD_SET = frozenset(_FIELDS)
# dtype codes safetensors knows and adaptertool cannot compute with (sub-byte floats): refused by name.
_UNREADABLE_CODES = ("F4", "F6_E2M3", "F6_E3M2")


def parse_header(path: Path, head: bytes, file_size: int) -> ParsedHeader:
    """Validate a safetensors header against the file's size, accepting what safetensors accepts.

    ``head`` holds the file's first 8 + N bytes (N from its first 8). Checks that every tensor
    entry is well typed (a known dtype, a shape of non-negative integers that fit u64, two integer
    offsets), that its byte size equals its offsets, and that the offsets tile the data area
    exactly (no gaps, overlaps, or bytes missing at the end: a truncated file). Stricter than
    safetensors only where it would guess: a tensor named twice (it keeps the last entry), a dtype
    adaptertool cannot compute with, and more than :data:`MAX_TENSORS` entries.

    Raises:
        AdapterToolError: naming the file and, where it applies, the tensor.
    """
    (length,) = struct.unpack("<Q", head[:8])
    metadata: dict[str, str] | None = None
    entries: dict[str, tuple[TensorSpec, int, int]] = {}
    try:
        for name, entry in header_json.members(head[8 : 8 + length]):
            if name == "__metadata__":
                if metadata is not None:
                    raise InputError(f"{path}: __metadata__ appears twice in the header; the file is corrupt")
                metadata = _parse_metadata(path, entry)
                continue
            if name in entries:
                raise InputError(f"{path}: tensor {_shown(name)} appears twice in the header; the file is corrupt")
            if len(entries) == MAX_TENSORS:
                raise InputError(f"{path}: header lists more than {MAX_TENSORS} tensors, too many for adaptertool "
                                 "to read from one file; split the checkpoint into shards")
            entries[name] = _parse_entry(path, name, entry)
    except ValueError as err:  # bad UTF-8, bad JSON, or JSON that safetensors' parser refuses
        raise InputError(f"{path}: header is not valid JSON ({err}); the file is corrupt") from None
    # Sizes are checked only now, as safetensors checks them: after a repeated name is known (which
    # it would resolve by keeping the last entry), and in data order, by (begin, end).
    tensors = sorted(entries.values(), key=lambda item: (item[1], item[2]))
    cursor = 0
    for spec, begin, end in tensors:
        _check_size(path, spec, begin, end)
        if begin != cursor:
            what = "overlaps the previous tensor" if begin < cursor else "leaves a gap before it"
            raise InputError(f"{path}: tensor {_shown(spec.name)} {what} (offset {begin}, expected {cursor}); the file is corrupt")
        cursor = end
    data_size = file_size - 8 - length
    if cursor > data_size:
        last = _shown(tensors[-1][0].name)
        raise InputError(
            f"{path}: truncated: tensor {last} ends at byte {8 + length + cursor} but the file has {file_size}; "
            "re-download or re-create it"
        )
    if cursor < data_size:
        raise InputError(f"{path}: {data_size - cursor} bytes after the last tensor; the file is corrupt")
    return ParsedHeader(data_start=8 + length, tensors=[(spec, begin) for spec, begin, _ in tensors], metadata=metadata or {})


def _parse_metadata(path: Path, value: object) -> dict[str, str]:
    # null is allowed (an absent map); a repeated key keeps its last value, as in safetensors.
    if value is None:
        return {}
    if not isinstance(value, header_json.Pairs) or not all(isinstance(v, str) for _, v in value):
        raise InputError(f"{path}: __metadata__ must map strings to strings; the file is corrupt")
    return dict(value)


def _parse_entry(path: Path, name: str, entry: object) -> tuple[TensorSpec, int, int]:
    if type(entry) is header_json.Pairs:
        fields = dict(entry)
        if len(entry) != len(_FIELDS) or fields.keys() != _FIELD_SET:  # not just the three: look closer
            fields = _entry_fields(path, name, entry)
            if len(fields) != len(_FIELDS):
                missing = next(f for f in _FIELDS if f not in fields)
                raise _corrupt(path, name, f"has no {missing!r}")
        dtype, shape, offsets = (fields[f] for f in _FIELDS)
    elif type(entry) is list and len(entry) == len(_FIELDS):  # serde also reads a struct from an array
        dtype, shape, offsets = entry
    else:
        raise _corrupt(path, name, "is not an entry of dtype, shape and data_offsets")
    if type(dtype) is header_json.Pairs and len(dtype) == 1 and dtype[0][1] is None:
        dtype = dtype[0][0]  # {"F32": null}: serde's map form of a unit variant
    if type(dtype) is not str or dtype not in DTYPES:
        if dtype in _UNREADABLE_CODES:
            raise InputError(f"{path}: tensor {_shown(name)} has dtype {dtype}, a sub-byte type adaptertool cannot compute with")
        raise _corrupt(path, name, f"has dtype {_short(dtype)}, which is not a safetensors dtype")
    if type(shape) is not list or not all(type(d) is int and 0 <= d <= _U64 for d in shape):  # bools are not ints
        raise _corrupt(path, name, f"has an invalid shape {_short(shape)}")
    if type(offsets) is not list or len(offsets) != 2 or not all(type(o) is int and 0 <= o <= _U64 for o in offsets):
        raise _corrupt(path, name, f"has invalid data_offsets {_short(offsets)}")
    begin, end = offsets
    return TensorSpec(name, dtype, tuple(shape)), begin, end


def _check_size(path: Path, spec: TensorSpec, begin: int, end: int) -> None:
    numel = 1
    for dim in spec.shape:  # safetensors multiplies in order and refuses a product, then its bit count, past u64
        numel *= dim
        if numel > _U64:
            break
    if numel > _U64 or numel * 8 * DTYPES[spec.dtype][0] > _U64:
        raise _corrupt(path, spec.name, f"has a shape {_short(list(spec.shape))} too large to address")
    if end - begin != spec.nbytes:
        shape = list(spec.shape)
        raise _corrupt(path, spec.name, f"is {spec.dtype}{shape} ({spec.nbytes} bytes) but its offsets span {end - begin} bytes")


def _entry_fields(path: Path, name: str, entry: header_json.Pairs) -> dict[str, object]:
    """An entry's dtype, shape and data_offsets: each at most once; other fields are ignored, as
    safetensors ignores them, once they parse (nested no deeper than its parser allows)."""
    fields: dict[str, object] = {}
    for key, value in entry:
        if key in fields:
            raise _corrupt(path, name, f"has {key!r} twice in its entry")
        if key in _FIELDS:
            fields[key] = value
        elif header_json.depth(value) + 2 > header_json.MAX_DEPTH:  # the header and the entry hold it
            raise _corrupt(path, name, f"has a field {_short(key)} nested deeper than JSON parsers allow")
    return fields


def _corrupt(path: Path, name: str, what: str) -> AdapterToolError:
    return InputError(f"{path}: tensor {_shown(name)} {what}; the file is corrupt")


def _shown(name: str) -> str:
    """A tensor name from a header, for a one-line message: quoted and escaped if it holds a newline
    or another character that does not print."""
    return name if name.isprintable() else ascii(name)


def _short(value: object) -> str:
    text = json.dumps(value, ensure_ascii=True)  # never a lone surrogate or a control character in a message
    return text if len(text) <= 60 else f"{text[:57]}..."


def build_header(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    """The 8-byte length plus JSON header for ``specs`` stored back to back in the given order.

    The JSON is padded with spaces to a multiple of 8 so the data area starts 8-byte aligned.
    Metadata is made valid UTF-8 first (see :func:`valid_utf8`): safetensors refuses a header
    holding a lone surrogate.
    """
    entries: dict[str, object] = {"__metadata__": {valid_utf8(k): valid_utf8(v) for k, v in metadata.items()}}
    offset = 0
    for spec in specs:
        entries[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    body = json.dumps(entries, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


def valid_utf8(text: str) -> str:
    """``text`` with what UTF-8 cannot encode written out as escapes: the bytes of a non-UTF-8 file
    name, which Python carries as lone surrogates, become ``\\xNN``; any other lone surrogate ``\\uNNNN``."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")

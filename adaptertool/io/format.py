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

from adaptertool.errors import AdapterToolError

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
        raise AdapterToolError(f"dtype {dtype} has no safetensors code; cast the tensor first") from None


def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype as configs and quant states spell it (``torch.bfloat16`` -> ``"bfloat16"``)."""
    return str(dtype).removeprefix("torch.")


def code_of_name(name: str) -> str:
    """The safetensors code of a torch dtype name (``"bfloat16"`` -> ``"BF16"``), as configs and
    bitsandbytes quant states spell dtypes; no torch import needed."""
    for code, (_, torch_name) in DTYPES.items():
        if torch_name == name:
            return code
    raise AdapterToolError(f"dtype {name!r} is not one adaptertool knows")


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors code; an error where this torch build has none."""
    import torch

    dtype = getattr(torch, DTYPES[code][1], None)
    if dtype is None:
        raise AdapterToolError(f"dtype {code} is not supported by torch {torch.__version__}; upgrade torch")
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


def parse_header(path: Path, head: bytes, file_size: int) -> ParsedHeader:
    """Validate a safetensors header against the file's size.

    ``head`` holds the file's first 8 + N bytes (N from its first 8). Checks that every tensor has
    a known dtype, a shape whose byte size equals its offsets, and that the offsets tile the data
    area exactly (no gaps, overlaps, or bytes missing at the end: a truncated file).

    Raises:
        AdapterToolError: naming the file and, where it applies, the tensor.
    """
    (length,) = struct.unpack("<Q", head[:8])
    try:
        raw = json.loads(head[8 : 8 + length], object_pairs_hook=_unique_keys)
    except _DuplicateKey as dup:
        raise AdapterToolError(f"{path}: tensor {dup} appears twice in the header; the file is corrupt") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterToolError(f"{path}: header is not valid JSON ({err}); the file is corrupt") from err
    if not isinstance(raw, dict):
        raise AdapterToolError(f"{path}: header is not a JSON object; the file is corrupt")
    metadata = raw.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterToolError(f"{path}: __metadata__ must map strings to strings; the file is corrupt")
    tensors = [(_parse_entry(path, name, entry)) for name, entry in raw.items()]
    tensors.sort(key=lambda item: item[1])
    cursor = 0
    for spec, begin in tensors:
        if begin != cursor:
            what = "overlaps the previous tensor" if begin < cursor else "leaves a gap before it"
            raise AdapterToolError(f"{path}: tensor {spec.name} {what} (offset {begin}, expected {cursor}); the file is corrupt")
        cursor = begin + spec.nbytes
    data_size = file_size - 8 - length
    if cursor > data_size:
        last = tensors[-1][0].name
        raise AdapterToolError(
            f"{path}: truncated: tensor {last} ends at byte {8 + length + cursor} but the file has {file_size}; "
            "re-download or re-create it"
        )
    if cursor < data_size:
        raise AdapterToolError(f"{path}: {data_size - cursor} bytes after the last tensor; the file is corrupt")
    return ParsedHeader(data_start=8 + length, tensors=tensors, metadata=metadata)


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # json.loads keeps the last of repeated keys silently; a repeated tensor name is corruption.
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return result


def _parse_entry(path: Path, name: str, entry: object) -> tuple[TensorSpec, int]:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise AdapterToolError(f"{path}: tensor {name} lacks dtype/shape/data_offsets; the file is corrupt")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise AdapterToolError(f"{path}: tensor {name} has dtype {dtype!r}, which adaptertool does not know")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise AdapterToolError(f"{path}: tensor {name} has an invalid shape {shape!r}; the file is corrupt")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and o >= 0 for o in offsets)):
        raise AdapterToolError(f"{path}: tensor {name} has invalid data_offsets {offsets!r}; the file is corrupt")
    spec = TensorSpec(name, dtype, tuple(shape))
    begin, end = offsets
    if end - begin != spec.nbytes:
        raise AdapterToolError(
            f"{path}: tensor {name} is {dtype}{list(shape)} ({spec.nbytes} bytes) but its offsets span "
            f"{end - begin} bytes; the file is corrupt"
        )
    return spec, begin


def build_header(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    """The 8-byte length plus JSON header for ``specs`` stored back to back in the given order.

    The JSON is padded with spaces to a multiple of 8 so the data area starts 8-byte aligned.
    """
    entries: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        entries[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    body = json.dumps(entries, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body

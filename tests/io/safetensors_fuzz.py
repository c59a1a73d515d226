"""Differential fuzzing of the reader against the safetensors library: mutated files, one oracle.

:func:`files` is a hypothesis strategy for safetensors files mutated from a few valid ones: JSON
mutations of dtype, shape, data_offsets, metadata and whole entries (written with a raw emitter, so
that repeated keys, ``-0``, ``NaN``, integers past u64, lone surrogate escapes and deep nesting can
be expressed), then byte flips, insertions and deletions in the header text, and byte flips,
truncation, appended bytes and a rewritten length field in the file. :func:`check` feeds one file to
``safetensors.safe_open`` and to ``open_checkpoint``, ``info`` and ``verify --nan``: ours must
accept exactly when safetensors does, except for the reader's three declared refusals (a tensor
named twice, a sub-byte dtype, more tensors than MAX_TENSORS, which these small files never reach),
and every refusal must be an AdapterToolError of one line. ``tests/io/test_fuzz_reader.py`` runs a
bounded number of cases in the suite; ``tests/io/fuzz_long.py`` runs a long one.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save

from adaptertool.errors import AdapterToolError
from adaptertool.io import open_checkpoint
from adaptertool.ops.info import info
from adaptertool.ops.verify import verify

__all__ = ["Outcome", "check", "files"]


class Obj(list):  # type: ignore[type-arg]
    """A JSON object as (key, value) pairs: keys may repeat."""


class Raw(str):
    """JSON text written as it is: literals Python's json would not write (-0, NaN, 1e400...)."""


def emit(value: object) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, Obj):
        return "{" + ",".join(f"{json.dumps(k)}:{emit(v)}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(map(emit, value)) + "]"
    return json.dumps(value)  # a lone surrogate becomes its \\u escape


def _parse(text: bytes) -> Obj:
    return json.loads(text, object_pairs_hook=Obj)


def _bases() -> list[tuple[Obj, bytes]]:
    g = torch.Generator().manual_seed(0)
    made = [
        ({"a": torch.randn(2, 3, generator=g), "b": torch.randn(4, generator=g).bfloat16(),
          "c": torch.tensor([7], dtype=torch.int64), "s": torch.tensor(1.5, dtype=torch.float16),
          "e": torch.zeros(0, 3, dtype=torch.uint8)}, {"format": "pt", "note": "x"}),
        ({"w": torch.randn(8, generator=g).to(torch.float8_e4m3fn), "m": torch.tensor([True, False, True]),
          "u": torch.arange(4, dtype=torch.int16).reshape(2, 2), "i": torch.arange(5, dtype=torch.int8),
          "f": torch.tensor([float("nan"), float("inf"), 1.0])}, None),
        ({}, None),
        ({"d": torch.randn(1, generator=g).double(), "z": torch.zeros(0), "q": torch.zeros(2, 0, dtype=torch.int32)},
         {"k": "v", "long": "y" * 40}),
    ]
    bases = []
    for tensors, metadata in made:
        data = save(tensors, metadata=metadata)
        (length,) = struct.unpack("<Q", data[:8])
        bases.append((_parse(data[8 : 8 + length]), data[8 + length :]))
    return bases


BASES = _bases()

_CODES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL",
          "F8_E4M3", "F8_E5M2", "F8_E8M0", "C64")
_SIZE = {"F64": 8, "I64": 8, "U64": 8, "C64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
         "U16": 2}
_U64 = (1 << 64) - 1
_INTS = (0, 1, 2, 3, 4, 6, 8, 12, 2**31, 2**32, 2**63, _U64, _U64 + 1, 10**30)
_SPECIAL = (Raw("-0"), Raw("-1"), Raw("1.0"), Raw("1e2"), Raw("1e400"), Raw("NaN"), Raw("Infinity"),
            Raw("-9223372036854775809"), Raw("9" * 310), True, False, None, "2", [2], Obj([("a", 1)]))
_DTYPES = (*_CODES, "F4", "F6_E2M3", "F6_E3M2", "f32", "", "F33", " F32", Raw('{"F32":null}'), Raw('{"U8":null}'),
           Raw('{"F32":[]}'), Raw("{}"), Raw('{"F32":null,"I32":null}'), Raw('["F32"]'), 1, None, True)
_METADATA = (None, "", [], Obj(), Obj([("a", "b")]), Obj([("a", 1)]), Obj([("a", "b"), ("a", "c")]),
             Obj([("a", None)]), Obj([("a", Obj())]), Obj([("\ud800", "x")]), Obj([("a", "\udc00")]),
             Obj([("a", "\ud83d\ude00")]), Raw("0"), Raw('"x"'))
_NAMES = ("", "__metadata__", "a", "w", "x\ny", "\u00e9", "\ud800", "t" * 200, "a.b.c", " ")
_SPACES = ("", " ", "\t", "\n", "\r", "\x0c", "\x00", "\ufeff", "  \n", " " * 7)
T = TypeVar("T")
_DEPTHS = (0, 1, 124, 125, 126, 127, 300, 5000)
_OPS = ("dtype", "same-size dtype", "shape", "reshape", "offsets", "drop field", "repeat field", "unknown field",
        "array entry", "metadata", "repeat metadata", "rename", "repeat tensor", "delete tensor", "swap offsets",
        "not an object")


def _pick(draw: st.DrawFn, choices: Sequence[T]) -> T:
    """One of ``choices``, by an index drawn as an integer (cheap, and it shrinks to the first)."""
    return choices[draw(st.integers(0, len(choices) - 1))]


def _numbers(draw: st.DrawFn, most: int) -> list[object]:
    """Up to ``most`` values, mostly valid dimensions or offsets, some not."""
    pools: tuple[Sequence[object], ...] = (_INTS, range(65), _SPECIAL)
    return [_pick(draw, _pick(draw, pools)) for _ in range(draw(st.integers(0, most)))]


def _tensors(header: Obj) -> list[int]:
    return [i for i, (k, _) in enumerate(header) if k != "__metadata__"]


def _set(entry: Obj, key: str, value: object) -> None:
    for j, (k, _) in enumerate(entry):
        if k == key:
            entry[j] = (k, value)
            return
    entry.append((key, value))


def _get(entry: Obj, key: str) -> object:
    return next((v for k, v in entry if k == key), None)


def _mutate_header(draw: st.DrawFn, header: Obj) -> Obj | Raw:
    op = _pick(draw, _OPS)
    tensors = _tensors(header)
    entries = [i for i in tensors if isinstance(header[i][1], Obj)]
    if op == "not an object":
        return _pick(draw, (Raw("[]"), Raw("null"), Raw('"x"'), Raw("1"), Raw("[{}]")))
    if op == "metadata":
        header[:] = [pair for pair in header if pair[0] != "__metadata__"]
        header.insert(draw(st.integers(0, len(header))), ("__metadata__", _pick(draw, _METADATA)))
    elif op == "repeat metadata":
        header.append(("__metadata__", _pick(draw, _METADATA)))
    elif op == "rename" and tensors:
        i = _pick(draw, tensors)
        header[i] = (_pick(draw, _NAMES), header[i][1])
    elif op == "repeat tensor" and tensors:
        header.insert(draw(st.integers(0, len(header))), header[_pick(draw, tensors)])
    elif op == "delete tensor" and tensors:
        del header[_pick(draw, tensors)]
    elif op == "swap offsets" and len(entries) >= 2:
        i = _pick(draw, entries)
        j = _pick(draw, [k for k in entries if k != i])
        a, b = _get(header[i][1], "data_offsets"), _get(header[j][1], "data_offsets")
        _set(header[i][1], "data_offsets", b)
        _set(header[j][1], "data_offsets", a)
    elif entries:
        i = _pick(draw, entries)
        _mutate_entry(draw, header, i, op)
    return header


def _mutate_entry(draw: st.DrawFn, header: Obj, i: int, op: str) -> None:
    entry = header[i][1]
    dtype, shape = _get(entry, "dtype"), _get(entry, "shape")
    if op == "dtype":
        _set(entry, "dtype", _pick(draw, _DTYPES))
    elif op == "same-size dtype" and isinstance(dtype, str):
        size = _SIZE.get(dtype, 1)
        _set(entry, "dtype", _pick(draw, [c for c in _CODES if _SIZE.get(c, 1) == size]))
    elif op == "shape":
        odd = (Raw("null"), Raw('"x"'), Obj(), [[2, 3]], 6)
        _set(entry, "shape", _numbers(draw, 4) if draw(st.integers(0, 3)) else _pick(draw, odd))
    elif op == "reshape" and isinstance(shape, list) and all(type(d) is int for d in shape):
        numel = 1
        for d in shape:
            numel *= d
        options = [[numel], [1, numel], [numel, 1], [numel, 1, 1], [] if numel == 1 else [numel]]
        options += [[d, numel // d] for d in range(2, min(numel, 64)) if numel % d == 0]
        options += [[0, 2**40, 2**40], [2**40, 2**40, 0]] if numel == 0 else []
        _set(entry, "shape", _pick(draw, options))
    elif op == "offsets":
        odd = (Raw("null"), Obj([("0", 0)]), "0,4")
        _set(entry, "data_offsets", _numbers(draw, 3) if draw(st.integers(0, 3)) else _pick(draw, odd))
    elif op == "drop field" and entry:
        del entry[draw(st.integers(0, len(entry) - 1))]
    elif op == "repeat field" and entry:
        entry.append(entry[draw(st.integers(0, len(entry) - 1))])
    elif op == "unknown field":
        depth = _pick(draw, _DEPTHS)
        value = _pick(draw, (Raw("[" * depth + "]" * depth), Raw('{"a":' * depth + "1" + "}" * depth), Raw("-0"),
                             Raw("1e400"), Raw("1.7976931348623157e308"), Raw("NaN"), Raw("9" * 5000), "\ud800",
                             "\ud83d\ude00", Obj([("a", 1), ("a", 2)])))
        entry.insert(draw(st.integers(0, len(entry))), (_pick(draw, ("x", "extra", "__metadata__")), value))
    elif op == "array entry":
        fields = [_get(entry, "dtype"), shape, _get(entry, "data_offsets")]
        header[i] = (header[i][0], fields[: draw(st.integers(2, 3))] + ([5] if draw(st.booleans()) else []))


def _edit(draw: st.DrawFn, data: bytes) -> bytes:
    """One byte-level edit: a bit flipped, a byte set, bytes inserted, a byte deleted."""
    if not data:
        return data
    at = draw(st.integers(0, len(data) - 1))
    op = draw(st.integers(0, 3))
    if op == 0:
        return data[:at] + bytes([data[at] ^ (1 << draw(st.integers(0, 7)))]) + data[at + 1 :]
    if op == 1:
        return data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]
    if op == 2:
        return data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]
    return data[:at] + data[at + 1 :]


@st.composite
def files(draw: st.DrawFn) -> bytes:
    """A safetensors file: valid, then mutated in its header JSON, header text and bytes."""
    header, data = _pick(draw, BASES)
    mutated: Obj | Raw = _parse(emit(header).encode())  # a fresh copy to mutate
    for _ in range(draw(st.integers(0, 3))):
        mutated = _mutate_header(draw, mutated) if isinstance(mutated, Obj) else mutated
    text = emit(mutated).encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        text = _pick(draw, _SPACES).encode() + text + _pick(draw, _SPACES).encode()
    for _ in range(_pick(draw, (0, 0, 0, 1, 2))):
        text = _edit(draw, text)
    length = len(text)
    if draw(st.integers(0, 9)) == 0:
        length = _pick(draw, (0, 1, max(length - 1, 0), length + 1, length + 8, 100_000_000, 100_000_001, _U64))
    blob = struct.pack("<Q", length) + text + data
    for _ in range(_pick(draw, (0, 0, 0, 0, 1, 2))):
        blob = _edit(draw, blob)
    cut = _pick(draw, (None, None, None, None, None, None, 0, 4, 8, 9, len(blob) - 1, len(blob) // 2))
    return blob if cut is None else blob[:cut]


@dataclass(frozen=True)
class Outcome:
    accepted: bool
    message: str = ""  # ours, when refused
    declared: bool = False  # refused by one of the reader's declared refusals; safetensors accepts it


def _safetensors_accepts(path: Path) -> bool:
    try:
        with safe_open(path, framework="pt") as f:
            f.keys()
            f.metadata()
        return True
    except Exception:  # noqa: BLE001  (SafetensorError, and whatever else it raises, is a refusal)
        return False


def _declared(message: str, data: bytes) -> bool:
    """Whether our refusal of a file safetensors accepts is one the reader declares: a tensor named
    twice (safetensors keeps the last entry) or a sub-byte dtype; checked against the file itself."""
    (length,) = struct.unpack("<Q", data[:8])
    names = [k for k, _ in _parse(data[8 : 8 + length]) if k != "__metadata__"]
    if "appears twice in the header" in message:
        return len(names) != len(set(names))
    return "a sub-byte type adaptertool cannot compute with" in message and any(
        f'"{code}"'.encode() in data[8 : 8 + length] for code in ("F4", "F6_E2M3", "F6_E3M2"))


def check(data: bytes, folder: Path) -> Outcome:
    """Feed ``data`` to safetensors and to adaptertool; raise AssertionError where they disagree."""
    path = folder / "case.safetensors"
    path.write_bytes(data)
    theirs = _safetensors_accepts(path)
    try:
        with open_checkpoint(path) as ckpt:
            names = set(ckpt)
        report = info(path)
        checked = verify(path, nan=True)
    except AdapterToolError as err:
        message = str(err)
        assert len(message.splitlines()) == 1 and message.isprintable(), f"not one printable line: {message!r}"
        assert not theirs or _declared(message, data), f"we refuse what safetensors accepts: {message}"
        return Outcome(False, message, declared=theirs)
    assert theirs, "we accept what safetensors refuses"
    with safe_open(path, framework="pt") as f:
        assert set(f.keys()) == names and report.tensors == checked.tensors == len(names)
    return Outcome(True)

"""A safetensors header's JSON, read as the safetensors library reads it.

safetensors parses headers with Rust's serde_json, which draws some lines differently from Python's
json module. So that adaptertool accepts exactly the headers safetensors accepts, :func:`members`
parses with Python's json, one top-level member at a time, and refuses what serde_json refuses:

- numbers: an integer that fits u64 (i64 if negative) stays an int; ``-0``, a larger integer and any
  literal with a fraction or exponent become floats, rounded as serde_json (built without
  ``float_roundtrip``) rounds them, and one that rounds to infinity is an error. Python would give
  ints of any size (past 4300 digits an uncaught ValueError) and accept NaN and Infinity.
- strings: a lone UTF-16 surrogate escape (``"\\ud800"``) is an error; Python keeps it.
- text: UTF-8 only (Python's json.loads would guess UTF-16 or UTF-32 from NUL bytes).
- objects are :class:`Pairs`, every key kept in order, so that the caller judges repeated keys the
  way serde treats them (an error for a struct field, not for a map).

Nesting depth is the caller's to check where it matters (:func:`depth`, :data:`MAX_DEPTH`): only
unknown fields of a tensor entry can be nested and still valid.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

__all__ = ["MAX_DEPTH", "Pairs", "depth", "members"]

# serde_json's recursion limit: a 128th nested array or object is refused.
MAX_DEPTH = 127

_U64 = (1 << 64) - 1
_I32_MAX = (1 << 31) - 1
_POW10 = [float(f"1e{i}") for i in range(309)]
_NUMBER = re.compile(r"(-?)([0-9]+)(?:\.([0-9]+))?(?:[eE]([-+]?)([0-9]+))?")
# Where a surrogate escape may be; a match sends the parsed value through a full check.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace


class Pairs(list):  # type: ignore[type-arg]
    """A JSON object as its (key, value) pairs, repeated keys included."""


def members(data: bytes) -> Iterator[tuple[str, object]]:
    """The (key, value) members of the JSON object in ``data``, parsed one at a time as safetensors
    would parse them, so that a caller can stop early (a header of too many tensors) and keep none.

    Raises:
        ValueError: one line on why safetensors would refuse the text (UnicodeDecodeError and
            json.JSONDecodeError are ValueErrors too).
    """
    text = data.decode("utf-8")
    decoder = json.JSONDecoder(object_pairs_hook=Pairs, parse_int=_number, parse_float=_number,
                               parse_constant=_constant)
    surrogates = _SURROGATE_ESCAPE.search(text) is not None
    at = _skip(text, 0)
    if text[at : at + 1] != "{":
        raise ValueError("not a JSON object")
    at = _skip(text, at + 1)
    while text[at : at + 1] != "}":
        if text[at : at + 1] != '"':
            raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, at)
        key, at = json.decoder.scanstring(text, at + 1)
        at = _skip(text, at)
        if text[at : at + 1] != ":":
            raise json.JSONDecodeError("Expecting ':' delimiter", text, at)
        try:
            value, at = decoder.raw_decode(text, _skip(text, at + 1))
        except RecursionError:
            raise ValueError(f"nested more than {MAX_DEPTH} deep") from None
        if surrogates:
            try:
                json.dumps([key, value], ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("a string holds a lone surrogate escape") from None
        yield key, value
        at = _skip(text, at)
        if text[at : at + 1] == ",":
            at = _skip(text, at + 1)
            if text[at : at + 1] == "}":
                raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, at)
        elif text[at : at + 1] != "}":
            raise json.JSONDecodeError("Expecting ',' delimiter", text, at)
    if _skip(text, at + 1) != len(text):
        raise json.JSONDecodeError("Extra data", text, _skip(text, at + 1))


def _skip(text: str, at: int) -> int:
    """The index of the first non-whitespace character at or after ``at``."""
    match = _SPACE.match(text, at)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def depth(value: object) -> int:
    """How many arrays and objects deep ``value`` nests (0 for a string, number, bool or null)."""
    deepest, level = 0, [(value, 1)]
    while level:
        item, d = level.pop()
        if isinstance(item, list):  # a JSON array, or Pairs
            deepest = max(deepest, d)
            level.extend((v[1] if isinstance(item, Pairs) else v, d + 1) for v in item)
    return deepest


def _constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _number(text: str) -> int | float:
    """A JSON number literal as serde_json reads it (see the module docstring)."""
    match = _NUMBER.fullmatch(text)
    assert match is not None  # json only hands over well-formed literals
    if len(text) < 20 and text.isdigit():  # the common case: an offset or a dimension, well within u64
        return int(text)
    sign, whole, fraction, exponent_sign, exponent_digits = match.groups()
    negative = sign == "-"
    if fraction is None and exponent_digits is None and len(whole) <= 20 and int(whole) <= _U64:
        value = int(whole)
        if not negative:
            return value
        return -value if 0 < value <= 1 << 63 else -float(value)
    # Digits join the significand while it fits u64; integer digits past that count as a power of
    # ten, fraction digits past it are dropped.
    significand, exponent, full = 0, 0, False
    for digit in whole:
        full = full or significand * 10 + int(digit) > _U64
        if full:
            exponent += 1
        else:
            significand = significand * 10 + int(digit)
    for digit in fraction or "":
        if significand * 10 + int(digit) > _U64:
            break
        significand = significand * 10 + int(digit)
        exponent -= 1
    if exponent_digits is not None:
        stated = 0
        for digit in exponent_digits:
            stated = stated * 10 + int(digit)
            if stated > _I32_MAX:  # an exponent past i32: zero, or out of range
                if significand and exponent_sign != "-":
                    raise ValueError(f"number {text[:40]} is out of range")
                return -0.0 if negative else 0.0
        exponent += -stated if exponent_sign == "-" else stated
    return _from_parts(text, negative, significand, exponent)


def _from_parts(text: str, negative: bool, significand: int, exponent: int) -> float:
    # significand * 10**exponent in serde_json's steps: one multiplication or division by a power of
    # ten up to 1e308, dividing by 1e308 first while the power is larger.
    value = float(significand)
    while True:
        if abs(exponent) < len(_POW10):
            if exponent >= 0:
                value *= _POW10[exponent]
                if value == float("inf"):
                    raise ValueError(f"number {text[:40]} is out of range")
            else:
                value /= _POW10[-exponent]
            break
        if value == 0.0:
            break
        if exponent >= 0:
            raise ValueError(f"number {text[:40]} is out of range")
        value /= 1e308
        exponent += 308
    return -value if negative else value

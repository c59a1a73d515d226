"""info --json and verify --json, the layouts scripts read: pinned field by field, in order, with
JSON types, and each field named on its docs page (docs/commands/info.md, verify.md).

A change to either layout fails here: update the page, and raise INFO_SCHEMA / VERIFY_SCHEMA when a
field is removed, renamed or changes type or meaning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from adaptertool.cli import cli
from adaptertool.ops.info import INFO_SCHEMA
from adaptertool.ops.verify import VERIFY_SCHEMA

DOCS = Path(__file__).resolve().parents[2] / "docs" / "commands"


@dataclass(frozen=True)
class Mapping:
    """A JSON object of free string keys, each value of one type (dtype code -> count)."""

    values: Any


# Specs: a Python type (exactly: true is no integer), [item spec], {field: spec} (these fields in this
# order), Mapping(value spec), or a tuple of alternatives (None: null).
ADAPTER = {"peft_type": str, "base_model": (str, None), "rank": (int, None), "alpha": (float, None), "ranks": [int],
           "rslora": bool, "dora": bool, "targets": [str], "modules": int, "modules_to_save": [str]}
QUANTIZATION = {"method": str, "quant_types": Mapping(int), "blocksizes": Mapping(int), "double_quant": int,
                "scale_format": (str, None), "weights": int, "parameters": int, "stored_bytes": int, "original_bytes": int,
                "bytes_saved": int, "compute_dtype": (str, None), "skip_modules": ([str], None)}
EXPERTS = {"family": str, "layout": str, "moe_layers": [int], "dense_layers": [int], "experts": int,
           "experts_per_token": (int, None), "hidden": int, "intermediate": int, "router": [str], "shared": [str]}
INFO = {"schema": int, "path": str, "format": str, "files": [str], "tensors": int, "parameters": int, "bytes": int,
        "dtypes": Mapping(int), "architecture": (str, None), "adapter": (ADAPTER, None),
        "quantization": (QUANTIZATION, None), "experts": (EXPERTS, None), "notes": [str]}
VERIFY = {"schema": int, "path": str, "files": int, "tensors": int, "bytes": int, "scanned": bool, "problems": [str],
          "nonfinite": [{"tensor": str, "nan": int, "inf": int}], "notes": [str], "seconds": float}
SEEN: set[int] = set()  # ids of the object specs that some value filled (not just null)


def _mismatches(value: Any, spec: Any, where: str = "") -> list[str]:
    """Where ``value`` departs from ``spec``; also records which object specs held a value (in SEEN)."""
    if isinstance(spec, tuple):
        if value is None and None in spec:
            return []
        found = [_mismatches(value, s, where) for s in spec if s is not None]
        return [] if any(not f for f in found) else min(found, key=len)
    if isinstance(spec, list):
        if not isinstance(value, list):
            return [f"{where}: {value!r} is not an array"]
        return [m for i, item in enumerate(value) for m in _mismatches(item, spec[0], f"{where}[{i}]")]
    if isinstance(spec, Mapping):
        if not isinstance(value, dict):
            return [f"{where}: {value!r} is not an object"]
        return [m for k, v in value.items() for m in _mismatches(v, spec.values, f"{where}.{k}")]
    if isinstance(spec, dict):
        if not isinstance(value, dict) or list(value) != list(spec):
            return [f"{where}: fields {list(value) if isinstance(value, dict) else value!r}, expected {list(spec)}"]
        SEEN.add(id(spec))
        return [m for k, s in spec.items() for m in _mismatches(value[k], s, f"{where}.{k}")]
    return [] if type(value) is spec else [f"{where}: {value!r} is not {spec.__name__}"]


def _json(*args: str, code: int = 0) -> dict[str, Any]:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == code, result.output
    return json.loads(result.stdout)


def test_info_json_layout(tiny_sharded: Path, tiny_adapter: Path, moe_fixtures: Path, fp8_fixtures: Path) -> None:
    SEEN.clear()
    for path in (tiny_sharded, tiny_adapter, moe_fixtures / "qwen3_moe" / "per-expert", fp8_fixtures / "qwen3-fp8" / "quantized"):
        report = _json("info", str(path), "--json")
        assert _mismatches(report, INFO, path.name) == []
        assert report["schema"] == INFO_SCHEMA == 1
    assert {id(ADAPTER), id(QUANTIZATION), id(EXPERTS)} <= SEEN  # every nested object was there in some case


def test_verify_json_layout(tiny_sharded: Path, tmp_path: Path) -> None:
    SEEN.clear()
    assert _mismatches(_json("verify", str(tiny_sharded), "--json"), VERIFY) == []
    save_file({"w": torch.tensor([1.0, float("nan"), float("inf")])}, tmp_path / "bad.safetensors")
    report = _json("verify", str(tmp_path / "bad.safetensors"), "--nan", "--json", code=1)
    assert _mismatches(report, VERIFY) == [] and report["nonfinite"] == [{"tensor": "w", "nan": 1, "inf": 1}]
    assert report["schema"] == VERIFY_SCHEMA == 1
    assert id(VERIFY["nonfinite"][0]) in SEEN


@pytest.mark.parametrize(("page", "spec"), [("info.md", INFO), ("verify.md", VERIFY)], ids=["info", "verify"])
def test_every_field_is_documented(page: str, spec: dict[str, Any]) -> None:
    text = (DOCS / page).read_text(encoding="utf-8")
    fields: list[str] = []
    pending = [spec]
    while pending:
        current = pending.pop()
        if isinstance(current, dict):
            fields += current
            pending += current.values()
        elif isinstance(current, list | tuple):
            pending += [s for s in current if s is not None]
    assert [f for f in fields if f"`{f}`" not in text] == []

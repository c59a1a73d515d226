"""Fuzzing in the suite: mutated safetensors files against the safetensors library, mutated indexes and
adapter configs against "one line, exit 1, never a traceback". Bounded runs; tests/io/fuzz_long.py
runs the long one recorded in docs/reliability.md.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptertool.cli import cli
from adaptertool.errors import AdapterToolError
from adaptertool.io import open_checkpoint
from adaptertool.ops.adapter_inputs import load_adapter
from adaptertool.ops.examples import TINY, write_llama, write_lora_adapter
from adaptertool.ops.info import info
from adaptertool.ops.merge_plan import plan_targets
from adaptertool.ops.verify import verify
from tests.io.safetensors_fuzz import Obj, Raw, check, emit, files

CASES = 2000  # files against safetensors; each takes about 2 ms


def _bounded(examples: int) -> Callable[[Callable[..., None]], Callable[..., None]]:
    return settings(max_examples=examples, database=None, deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


def _cli_refuses(runner: CliRunner, *args: str) -> None:
    """The command exits 1 with one ``error:`` line on stderr and nothing else: no traceback."""
    result = runner.invoke(cli, list(args))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (args, result.output)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and result.stdout == "", result.stderr


def test_reader_accepts_exactly_what_safetensors_accepts(tmp_path: Path) -> None:
    seen: Counter[str] = Counter()
    runner = CliRunner()

    @_bounded(CASES)
    @given(files())
    def case(data: bytes) -> None:
        outcome = check(data, tmp_path)
        seen["accepted" if outcome.accepted else "declared" if outcome.declared else "refused"] += 1
        if not outcome.accepted:
            for command in (["info"], ["verify", "--nan"]):
                _cli_refuses(runner, *command, str(tmp_path / "case.safetensors"))

    case()
    assert sum(seen.values()) >= CASES
    assert seen["accepted"] >= CASES // 20 and seen["refused"] >= CASES // 2, seen  # both sides well exercised


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz") / "base"
    write_llama(folder, TINY, dtype=torch.bfloat16, max_shard_bytes=12_000)
    return folder


_HUGE = Raw("9" * 5000)
_DEEP = Raw("[" * 3000 + "]" * 3000)
_VALUES = (None, True, 0, -1, 4.7, 8.0, 2**70, "8", "x", [], [1], Obj(), Obj([("a", 1)]), Raw("NaN"), Raw("Infinity"),
           Raw("1e400"), Raw("-0"), _HUGE, _DEEP, "\ud800", "../../etc/passwd", "/abs.safetensors")


@st.composite
def _json_edits(draw: st.DrawFn, keys: tuple[str, ...]) -> list[tuple[str, object]]:
    """Up to three (key, new value) edits of a JSON object; the value ``...`` deletes the key."""
    return [(draw(st.sampled_from(keys)), draw(st.sampled_from((..., *_VALUES)))) for _ in range(draw(st.integers(1, 3)))]


def _put(pairs: Obj, key: str, value: object) -> Obj:
    """``pairs`` with ``key`` set to ``value`` (last), or removed when ``value`` is ``...``."""
    return Obj([(k, v) for k, v in pairs if k != key] + ([] if value is ... else [(key, value)]))


def _edited(config: dict[str, object], edits: list[tuple[str, object]]) -> str:
    pairs = Obj(config.items())
    for key, value in edits:
        pairs = _put(pairs, key, value)
    return emit(pairs)


def test_mutated_index_is_refused_in_one_line(sharded: Path, tmp_path: Path) -> None:
    folder = tmp_path / "base"
    shutil.copytree(sharded, folder)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    names = sorted(index["weight_map"])
    runner = CliRunner()
    seen: Counter[str] = Counter()

    @_bounded(300)
    @given(st.lists(st.tuples(st.sampled_from(("metadata", "total_size", "weight_map", "tensor", "whole", "bytes")),
                              st.integers(0, 10**6), st.sampled_from((..., *_VALUES, *shards))), min_size=1, max_size=3))
    def case(edits: list[tuple[str, int, object]]) -> None:
        value: object = Obj((k, v) for k, v in index.items())
        for where, at, new in edits:
            if not isinstance(value, Obj):
                break
            if where in ("metadata", "weight_map"):
                value = _put(value, where, new)
            elif where == "total_size":
                value = _put(value, "metadata", _put(Obj(), "total_size", new))
            elif where == "tensor":  # one tensor mapped elsewhere (another shard, a missing file, a path), or dropped
                value = _put(value, "weight_map", _put(Obj(index["weight_map"].items()), names[at % len(names)], new))
            elif where == "whole":
                value = new
        text = b"" if value is ... else emit(value).encode("utf-8", "surrogatepass")
        if text and any(where == "bytes" for where, _, _ in edits):
            at = edits[0][1] % len(text)
            text = text[:at] + bytes([text[at] ^ 0x80]) + text[at + 1 :]
        index_path.write_bytes(text)
        try:
            with open_checkpoint(folder):
                pass
            info(folder)
            seen["problems" if verify(folder).problems else "read"] += 1
        except AdapterToolError as err:
            assert len(str(err).splitlines()) == 1
            seen["refused"] += 1
            _cli_refuses(runner, "verify", str(folder))

    case()
    assert sum(seen.values()) >= 300 and seen["refused"] and seen["problems"], seen


def test_mutated_adapter_is_refused_in_one_line(sharded: Path, tmp_path: Path) -> None:
    adapter = write_lora_adapter(tmp_path / "lora", TINY)
    config = json.loads((adapter / "adapter_config.json").read_text())
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    keys = ("r", "lora_alpha", "alpha_pattern", "rank_pattern", "peft_type", "target_modules", "modules_to_save",
            "use_dora", "use_rslora", "fan_in_fan_out", "base_model_name_or_path", "target_parameters")
    patterns = st.sampled_from((Obj([("q_proj(", 2)]), Obj([("q_proj", Raw("NaN"))]), Obj([("q_proj", 4.7)]),
                                Obj([("q_proj", _HUGE)]), Obj([("[", 1)]), Obj([("layers.1.q_proj", 2)])))
    seen: Counter[str] = Counter()
    runner = CliRunner()

    @_bounded(300)
    @given(_json_edits(keys), st.lists(patterns, max_size=1), st.integers(-1, len(weights) - 1))
    def case(edits: list[tuple[str, object]], pattern: list[Obj], flip: int) -> None:
        if pattern:
            edits = [*edits, ("alpha_pattern" if flip % 2 else "rank_pattern", pattern[0])]
        (adapter / "adapter_config.json").write_text(_edited(config, edits), encoding="utf-8", errors="surrogatepass")
        damaged = weights if flip < 0 else weights[:flip] + bytes([weights[flip] ^ 0x10]) + weights[flip + 1 :]
        (adapter / "adapter_model.safetensors").write_bytes(damaged)
        try:
            info(adapter)
        except AdapterToolError as err:
            assert len(str(err).splitlines()) == 1
        try:
            loaded = load_adapter(adapter, 1.0)
            try:
                with open_checkpoint(sharded) as base:
                    plan_targets(base, [loaded], subtract=False)
            finally:
                loaded.close()
            seen["planned"] += 1
        except AdapterToolError as err:
            assert len(str(err).splitlines()) == 1
            seen["refused"] += 1
            _cli_refuses(runner, "merge", str(sharded), str(adapter), str(tmp_path / "out"))
            assert not (tmp_path / "out").exists()

    case()
    assert sum(seen.values()) >= 300 and seen["planned"] and seen["refused"], seen

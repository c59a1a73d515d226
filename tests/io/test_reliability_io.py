"""Issue 18, io layer: headers exactly as safetensors reads them, valid UTF-8 metadata, outputs that
never replace another run's OUT, scratch that a later run can clean, and a writer that, whatever
step fails, leaves no partial OUT, no changed input and one line naming OUT."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adaptertool.errors import AdapterToolError
from adaptertool.io import open_checkpoint, read_json, scratch_prefix, staged_output
from adaptertool.io import format as st_format
from adaptertool.io import staging
from adaptertool.io.format import build_header
from adaptertool.ops.examples import TINY, write_llama, write_lora_adapter
from adaptertool.ops.merge import MergeConfig, merge
from adaptertool.ops.verify import verify


def _file(path: Path, header: bytes | str, data: bytes = b"") -> Path:
    body = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def _refused(path: Path, pattern: str) -> None:
    with pytest.raises(AdapterToolError, match=pattern) as caught:
        open_checkpoint(path)
    assert len(str(caught.value).splitlines()) == 1
    with pytest.raises(Exception):  # noqa: B017, PT011  (safetensors refuses it too: whatever it raises)
        with safe_open(path, framework="pt"):
            pass


def _entry(dtype: object = "U8", shape: object = (1,), offsets: object = (0, 1), **extra: object) -> dict[str, object]:
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets, **extra}


# --- Bug 5: the header reader accepts exactly what safetensors accepts ------------------------------


@pytest.mark.parametrize(("header", "pattern"), [
    ({"t": _entry(shape=[True])}, r"tensor t has an invalid shape \[true\]"),  # booleans are not integers
    ({"t": _entry(shape=[-1])}, r"invalid shape \[-1\]"),
    ({"t": _entry(shape=[1.0])}, r"invalid shape \[1\.0\]"),
    ({"t": _entry(shape=[2**64, 0], offsets=(0, 0))}, "invalid shape"),  # past usize
    ({"t": _entry(shape=[2**32, 2**32, 0], offsets=(0, 0))}, "too large to address"),  # the product overflows first
    ({"t": _entry(offsets=[0, True])}, "invalid data_offsets"),
    ({"t": _entry(offsets=[0, 1, 1])}, "invalid data_offsets"),
    ({"t": _entry(dtype=["U8"])}, r"tensor t has dtype \[\"U8\"\], which is not a safetensors dtype"),  # was a TypeError
    ({"t": _entry(dtype={"U8": 1})}, "which is not a safetensors dtype"),
    ({"t": _entry(dtype="u8")}, "which is not a safetensors dtype"),
    ({"__metadata__": "", "t": _entry()}, "__metadata__ must map strings to strings"),
    ({"__metadata__": [], "t": _entry()}, "__metadata__ must map strings to strings"),
    ({"__metadata__": {"a": 1}, "t": _entry()}, "__metadata__ must map strings to strings"),
    ({"t": None}, "is not an entry of dtype, shape and data_offsets"),
    ({"t": ["U8", [1], [0, 1], 5]}, "is not an entry of dtype, shape and data_offsets"),
])
def test_headers_safetensors_refuses_are_refused(tmp_path: Path, header: dict[str, Any], pattern: str) -> None:
    _refused(_file(tmp_path / "m.safetensors", json.dumps(header), b"\0"), pattern)


@pytest.mark.parametrize(("text", "pattern"), [
    ('{"t":{"dtype":"U8","shape":[-0],"data_offsets":[0,0]}}', "invalid shape"),  # serde reads -0 as a float
    ('{"t":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}}', r"tensor t has 'dtype' twice in its entry"),
    ('{"__metadata__":{},"__metadata__":{},"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', "__metadata__ appears twice"),
    ('{"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":NaN}}', r"not valid JSON \(NaN is not JSON\)"),
    ('{"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":1e400}}', "out of range"),
    ('{"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":"\\ud800"}}', "lone surrogate"),
    ('{"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":' + "[" * 126 + "]" * 126 + "}}", "nested deeper"),
    ('{"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":' + "[" * 5000 + "]" * 5000 + "}}", "nested more than"),
    ('{"t":{"dtype":"U8","shape":[' + "1" * 5000 + '],"data_offsets":[0,1]}}', "out of range"),  # Python: 4300 digits
    ('{\x00}\x00', "not valid JSON"),  # Python's json.loads(bytes) would read this as UTF-16
    ('\ufeff{}', "not a safetensors file"),
])
def test_header_json_as_safetensors_reads_it(tmp_path: Path, text: str, pattern: str) -> None:
    _refused(_file(tmp_path / "m.safetensors", text.encode("utf-8", "surrogatepass"), b"\0"), pattern)


@pytest.mark.parametrize("text", [
    ' \n{"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',  # whitespace before the brace
    '{"t":["U8",[1],[0,1]]}',  # an entry as an array: serde reads a struct from one
    '{"t":{"dtype":{"U8":null},"shape":[1],"data_offsets":[0,1]}}',  # a unit variant as a map
    '{"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":[[1]],"x":-0}}',  # unknown fields are ignored
    '{"e":{"dtype":"U8","shape":[0],"data_offsets":[1,1]},"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
    '{"__metadata__":{"a":"1","a":"2"},"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',  # the last value
    '{"__metadata__":null,"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":' + "[" * 125 + "]" * 125 + "}}",
])
def test_headers_safetensors_accepts_are_read(tmp_path: Path, text: str) -> None:
    path = _file(tmp_path / "m.safetensors", text, b"\x07")
    with safe_open(path, framework="pt") as theirs, open_checkpoint(path) as ours:
        assert set(ours) == set(theirs.keys())
        assert ours.metadata == (theirs.metadata() or {})
        assert ours.read("t").tolist() == [7]


def test_a_duplicate_field_names_the_field_not_a_tensor(tmp_path: Path) -> None:
    path = _file(tmp_path / "m.safetensors", '{"w":{"dtype":"F32","shape":[1],"shape":[1],"data_offsets":[0,4]}}', bytes(4))
    with pytest.raises(AdapterToolError, match=r"m\.safetensors: tensor w has 'shape' twice in its entry; the file is corrupt"):
        open_checkpoint(path)


def test_sub_byte_dtypes_are_refused_by_name(tmp_path: Path) -> None:
    # Declared divergence: safetensors reads F4 headers; adaptertool cannot compute with them and says so.
    path = _file(tmp_path / "m.safetensors", '{"t":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}}', b"\0")
    with pytest.raises(AdapterToolError, match="has dtype F4, a sub-byte type adaptertool cannot compute with"):
        open_checkpoint(path)


def test_tensor_names_print_on_one_line(tmp_path: Path) -> None:
    path = _file(tmp_path / "m.safetensors", '{"a\\nb":{"dtype":"U8","shape":[2],"data_offsets":[0,1]}}', b"\0")
    with pytest.raises(AdapterToolError, match=r"tensor 'a\\nb' is U8\[2\]") as caught:
        open_checkpoint(path)
    assert "\n" not in str(caught.value)


def test_huge_headers_are_capped_early(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(st_format, "MAX_TENSORS", 50)
    entries = {f"t{i}": _entry(offsets=(i, i + 1)) for i in range(51)}
    with pytest.raises(AdapterToolError, match="header lists more than 50 tensors, too many for adaptertool"):
        open_checkpoint(_file(tmp_path / "m.safetensors", json.dumps(entries), bytes(51)))
    entries.pop("t50")
    with open_checkpoint(_file(tmp_path / "ok.safetensors", json.dumps(entries), bytes(50))) as ckpt:
        assert len(ckpt) == 50


# --- Bug 4: indexes and side files ----------------------------------------------------------------


def test_deep_or_huge_json_side_files_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "digits.json").write_text('{"r": ' + "4" * 5000 + "}")
    with pytest.raises(AdapterToolError, match=r"deep\.json: cannot be read as JSON \(nested too deeply\)"):
        read_json(tmp_path / "deep.json")
    with pytest.raises(AdapterToolError, match=r"digits\.json: cannot be read as JSON \(an integer of 5000 digits\)"):
        read_json(tmp_path / "digits.json")


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    write_llama(tmp_path / "base", TINY, dtype=torch.bfloat16, max_shard_bytes=12_000)
    return tmp_path / "base"


@pytest.mark.parametrize("metadata", [[], "x", 5])
def test_index_metadata_not_an_object_is_a_problem_not_a_traceback(sharded: Path, metadata: object) -> None:
    index = sharded / "model.safetensors.index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "metadata": metadata}))
    report = verify(sharded)
    assert not report.ok and report.problems == [f"{index}: metadata is not a JSON object; loaders may refuse the index"]


def test_index_naming_the_wrong_shard_says_where_the_tensor_is(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, tmp_path / "s1.safetensors")
    save_file({"b": torch.ones(2)}, tmp_path / "s2.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s2.safetensors"}}))
    with pytest.raises(AdapterToolError, match=r"maps tensor a to s2\.safetensors, which does not hold it, and it is in "
                                               r"s1\.safetensors, which the index does not name"):
        open_checkpoint(tmp_path)


def test_verify_nan_scans_in_pieces_never_a_whole_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    values = torch.randn(1000)
    values[[3, 500, 999]] = float("nan")
    values[[10, 20]] = float("inf")
    save_file({"w": values.bfloat16(), "x": torch.ones(7)}, tmp_path / "m.safetensors")
    from adaptertool.io.reader import Checkpoint
    from adaptertool.ops import verify as verify_module

    monkeypatch.setattr(Checkpoint, "read", lambda *a, **k: pytest.fail("read a whole tensor"))
    monkeypatch.setattr(verify_module, "_SCAN_CHUNK", 64)
    report = verify(tmp_path / "m.safetensors", nan=True)
    assert [(bad.tensor, bad.nan, bad.inf) for bad in report.nonfinite] == [("w", 3, 2)]


# --- Bug 6: metadata is valid UTF-8 ---------------------------------------------------------------


def test_metadata_from_a_non_utf8_path_is_valid_utf8(tmp_path: Path) -> None:
    folder = Path(os.fsdecode(bytes(tmp_path) + b"/base-\xff"))
    write_llama(folder, TINY, dtype=torch.float32)
    adapter = write_lora_adapter(tmp_path / "lora", TINY)
    merge(MergeConfig(base=folder, adapters=((adapter, 1.0),), out=tmp_path / "out"))
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as f:  # it opened: valid UTF-8
        assert f.metadata()["adaptertool.base_model"].endswith("/base-\\xff")
    assert build_header([], {"k": "a\ud800b"}).decode("utf-8").count("\\\\ud800") == 1


# --- Bugs 2 and 3, and --force onto a link: staged outputs ----------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "lock-fallback"])
def test_an_out_that_appears_meanwhile_is_never_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          renameat2: bool) -> None:
    if not renameat2:
        monkeypatch.setattr(staging, "_renameat2", lambda: None)
    elif staging._renameat2() is None:
        pytest.skip("this system's C library has no renameat2")
    out = tmp_path / "out"
    with pytest.raises(AdapterToolError, match=r"output .*out appeared while this run was writing it \(another run\?\) "
                                               r"and was left as it is; pass --force"):
        with staged_output(out, force=False) as tmp:
            (tmp / "mine").write_text("mine")
            out.mkdir()  # another run finished first: an empty folder, which a plain rename would replace
    assert list(out.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["out"]
    with staged_output(out, force=True) as tmp:
        (tmp / "mine").write_text("mine")
    assert [p.name for p in out.iterdir()] == ["mine"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_force_runs_take_turns_at_the_final_rename(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    held = os.open(tmp_path, os.O_RDONLY)  # as another run's _commit holds it
    fcntl.flock(held, fcntl.LOCK_EX)
    done = threading.Event()

    def run() -> None:
        with staged_output(out, force=True) as tmp:
            (tmp / "new").write_text("new")
        done.set()

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.3)
    assert not done.is_set() and [p.name for p in out.iterdir()] == ["old"]  # waiting for the lock
    os.close(held)
    thread.join(timeout=10)
    assert done.is_set() and [p.name for p in out.iterdir()] == ["new"]


def test_force_onto_a_symlink_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.mkdir()
    (target / "keep").write_text("keep")
    (tmp_path / "out").symlink_to(target)
    with pytest.raises(AdapterToolError, match=r"output .*out is a symbolic link \(to .*precious\); name the real path"):
        with staged_output(tmp_path / "out", force=True):
            pass
    assert [p.name for p in target.iterdir()] == ["keep"] and (tmp_path / "out").is_symlink()


def test_scratch_of_a_killed_run_is_removed_by_the_next(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert scratch_prefix(out, "merge16").startswith(f".out.adaptertool-{os.getpid()}-merge16-")
    pid = _dead_pid()
    for purpose in ("merge16-abc", "x1y2"):  # merge --requantize's 16-bit scratch, a staged output
        (tmp_path / f".out.adaptertool-{pid}-{purpose}").mkdir()
        (tmp_path / f".out.adaptertool-{pid}-{purpose}" / "model.safetensors").write_bytes(b"x" * 100)
    live = tmp_path / f".out.adaptertool-{os.getpid()}-merge16-live"
    live.mkdir()
    with staged_output(out, force=False) as tmp:
        (tmp / "f").write_text("f")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name])  # a live run's scratch stays


def test_an_old_out_moved_aside_by_a_killed_force_run_comes_back(tmp_path: Path) -> None:
    aside = tmp_path / f".out.adaptertool-{_dead_pid()}-old-abc"
    (aside / "out").mkdir(parents=True)
    (aside / "out" / "weights").write_text("old")
    with pytest.raises(AdapterToolError, match="already exists; pass --force"):
        with staged_output(tmp_path / "out", force=False):
            pass
    assert (tmp_path / "out" / "weights").read_text() == "old" and not aside.exists()


# --- Bug 7: a full disk ---------------------------------------------------------------------------


def test_a_plan_larger_than_the_free_space_is_refused_up_front(sharded: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from adaptertool.io import writer

    adapter = write_lora_adapter(tmp_path / "lora", TINY)
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda _: SimpleNamespace(free=1000))
    with pytest.raises(AdapterToolError, match=r"^output .*out not written: no space left on its disk \(the output needs "
                                               r"[\d,]+ bytes and 1,000 are free\); free some space or choose another OUT$"):
        merge(MergeConfig(base=sharded, adapters=((adapter, 1.0),), out=tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "lora"]


# --- The writer under injected faults -------------------------------------------------------------


class _Faults:
    """Counts the writer's steps (writes, fsyncs, renames, side-file copies) and fails step ``at``."""

    def __init__(self, at: int | None, code: int) -> None:
        self.at, self.code, self.steps = at, code, 0

    def step(self) -> None:
        self.steps += 1
        if self.steps == self.at:
            raise OSError(self.code, os.strerror(self.code))


class _FaultyFile:
    """A shard file whose writes go through the faults: a fake file object around the real one."""

    def __init__(self, real: Any, faults: _Faults) -> None:
        self._real, self._faults = real, faults

    def write(self, data: Any) -> int:
        self._faults.step()
        return int(self._real.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@contextmanager
def _injected(monkeypatch: pytest.MonkeyPatch, faults: _Faults) -> Iterator[None]:
    from adaptertool.io import writer

    def wrap(function: Callable[..., Any]) -> Callable[..., Any]:
        def faulty(*args: Any, **kwargs: Any) -> Any:
            faults.step()
            return function(*args, **kwargs)
        return faulty

    with monkeypatch.context() as patch:
        patch.setattr(writer, "open", lambda *a, **k: _FaultyFile(open(*a, **k), faults), raising=False)  # noqa: SIM115
        # Every tensor byte then goes through the fake file (copy_file_range falls back to write()).
        patch.setattr(os, "copy_file_range", lambda *a: (_ for _ in ()).throw(OSError(errno.EXDEV, "injected")))
        patch.setattr(os, "fsync", wrap(os.fsync))
        patch.setattr(os, "rename", wrap(os.rename))
        patch.setattr(staging, "_rename_noreplace", wrap(staging._rename_noreplace))
        patch.setattr(Path, "write_text", wrap(Path.write_text))
        patch.setattr(shutil, "copyfile", wrap(shutil.copyfile))
        yield


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
@pytest.mark.parametrize("force", [False, True], ids=["new", "force"])
def test_a_fault_at_any_step_leaves_no_partial_out(sharded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  code: int, force: bool) -> None:
    adapter = write_lora_adapter(tmp_path / "lora", TINY)
    out, reference = tmp_path / "work" / "out", tmp_path / "reference"
    cfg = MergeConfig(base=sharded, adapters=((adapter, 1.0),), out=reference, max_shard_bytes=12_000)
    merge(cfg)
    expected, inputs = _digest(reference), {p: _digest(p) for p in (sharded, adapter)}
    counting = _Faults(None, code)
    with _injected(monkeypatch, counting):
        if force:
            shutil.copytree(sharded, out)  # an old output, which must survive every failed run
        merge(MergeConfig(base=sharded, adapters=((adapter, 1.0),), out=out, force=force, max_shard_bytes=12_000))
    assert counting.steps > 20  # every shard write, fsync, rename and side file
    shutil.rmtree(out)
    if force:
        shutil.copytree(sharded, out)
    before = _digest(out) if force else None
    for at in range(1, counting.steps + 1):
        faults = _Faults(at, code)
        try:
            with _injected(monkeypatch, faults):
                merge(MergeConfig(base=sharded, adapters=((adapter, 1.0),), out=out, force=force, max_shard_bytes=12_000))
        except AdapterToolError as err:
            message = str(err)
            assert len(message.splitlines()) == 1 and f"output {out} not written" in message, (at, message)
            assert ("no space left on its disk" in message) == (code == errno.ENOSPC)
            assert (_digest(out) == before) if force else not out.exists(), at
        else:  # only the flush of the final rename may fail unreported: OUT is then complete
            assert _digest(out) == expected, at
            shutil.rmtree(out)
            if force:
                shutil.copytree(sharded, out)
        assert [p.name for p in out.parent.iterdir()] == (["out"] if force else []), at  # no debris
        assert {p: _digest(p) for p in (sharded, adapter)} == inputs

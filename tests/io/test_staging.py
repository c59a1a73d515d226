"""Atomic outputs: a failed, interrupted or killed run leaves no OUT and, after the next run, no debris."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from adaptertool import AdapterToolError
from adaptertool.io import Checkpoint, is_unfinished, scratch_prefix, staged_output
from adaptertool.ops.reshard import ReshardConfig, reshard


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _debris(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".adaptertool-" in p.name]


def test_exception_mid_stream_leaves_nothing(tiny_sharded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _digest(tiny_sharded)
    calls = {"n": 0}
    real_copy = Checkpoint.copy_bytes

    def failing_copy(self: Checkpoint, name: str, dst: object) -> None:
        calls["n"] += 1
        if calls["n"] == 8:
            raise OSError("injected failure")
        real_copy(self, name, dst)

    monkeypatch.setattr(Checkpoint, "copy_bytes", failing_copy)
    with pytest.raises(OSError, match="injected"):
        reshard(ReshardConfig(source=tiny_sharded, out=tmp_path / "out", max_shard_bytes=8_000))
    assert calls["n"] == 8
    assert not (tmp_path / "out").exists()
    assert _debris(tmp_path) == []
    assert _digest(tiny_sharded) == before


def test_failed_force_run_keeps_old_output(tiny_sharded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    reshard(ReshardConfig(source=tiny_sharded, out=out))
    old = _digest(out)
    monkeypatch.setattr(Checkpoint, "copy_bytes", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        reshard(ReshardConfig(source=tiny_sharded, out=out, force=True, max_shard_bytes=9_000))
    assert _digest(out) == old and _debris(tmp_path) == []


def test_existing_output_needs_force(tiny_sharded: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    reshard(ReshardConfig(source=tiny_sharded, out=out))
    with pytest.raises(AdapterToolError, match=r"output .*out already exists; pass --force to replace it"):
        reshard(ReshardConfig(source=tiny_sharded, out=out))
    report = reshard(ReshardConfig(source=tiny_sharded, out=out, force=True, max_shard_bytes=9_000))
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(report.files)
    assert _debris(tmp_path) == []


@pytest.mark.parametrize("out", ["same", "inside", "parent"])
def test_output_may_not_overlap_input(tiny_sharded: Path, out: str) -> None:
    target = {"same": tiny_sharded, "inside": tiny_sharded / "sub", "parent": tiny_sharded.parent}[out]
    with pytest.raises(AdapterToolError, match=r"overlaps input .*; choose another output path"):
        reshard(ReshardConfig(source=tiny_sharded, out=target, force=True))


# A child process that streams slowly (one tensor per 50 ms), says when it has started writing, and
# from its fourth tensor on waits for the signal: under load the parent may read the third line late,
# and a child that finished meanwhile would exit 0 (seen once in CI).
_SLOW_CHILD = textwrap.dedent("""
    import signal, sys, time
    # Ctrl-C as a shell delivers it: a child inherits an ignored SIGINT from a parent that ignores it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from adaptertool.io import Checkpoint
    real = Checkpoint.copy_bytes
    calls = []
    def slow(self, name, dst):
        calls.append(name)
        print("writing", flush=True)
        time.sleep(0.05 if len(calls) <= 3 else 60)
        real(self, name, dst)
    Checkpoint.copy_bytes = slow
    sys.argv = ["adaptertool", "reshard", sys.argv[1], sys.argv[2], "--max-shard-size", "8KB"]
    from adaptertool.cli import main
    main()
""")


def _start_slow(source: Path, out: Path) -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, "-c", _SLOW_CHILD, str(source), str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None
    for _ in range(3):  # a few tensors in, with shard files open
        assert child.stdout.readline().strip() == "writing"
    return child


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_stream_cleans_up(tiny_sharded: Path, tmp_path: Path, sig: signal.Signals) -> None:
    before = _digest(tiny_sharded)
    child = _start_slow(tiny_sharded, tmp_path / "out")
    child.send_signal(sig)
    _, err = child.communicate(timeout=60)
    assert child.returncode != 0, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert _debris(tmp_path) == []
    assert _digest(tiny_sharded) == before


def test_sigkill_debris_is_removed_by_next_run(tiny_sharded: Path, tmp_path: Path) -> None:
    child = _start_slow(tiny_sharded, tmp_path / "out")
    os.kill(child.pid, signal.SIGKILL)
    child.communicate(timeout=60)
    assert not (tmp_path / "out").exists()
    assert len(_debris(tmp_path)) == 1  # killed outright: nothing could clean up
    reshard(ReshardConfig(source=tiny_sharded, out=tmp_path / "out"))
    assert _debris(tmp_path) == []
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_unfinished_work_is_recognised_by_name(tmp_path: Path) -> None:
    seen = []
    with staged_output(tmp_path / "out", force=False) as tmp:
        seen.append(tmp.name)
    seen.append(scratch_prefix(tmp_path / "out", "merge16") + "abc")
    assert all(map(is_unfinished, seen))
    assert is_unfinished("model-00001-of-00002.safetensors.incomplete")
    assert not any(map(is_unfinished, ["out", "model.safetensors", ".gitattributes", "adaptertool-notes"]))

"""Atomic outputs: build in a temporary folder beside OUT, rename into place only when complete.

A run that fails or is interrupted (exception, Ctrl-C, SIGTERM) removes its temporary folder; one
that is killed outright leaves it behind, and the next run for the same OUT removes it once the
process that made it is gone. OUT therefore either does not exist or is complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from adaptertool.errors import AdapterToolError

__all__ = ["check_output", "is_unfinished", "scratch_prefix", "staged_output"]


def check_output(out: Path, *, force: bool, inputs: Sequence[Path] = ()) -> None:
    """Refuse an OUT that exists (without ``force``) or that is, holds, or lies inside an input."""
    target = out.resolve()
    for source in inputs:
        src = source.resolve()
        if target == src or target in src.parents or src in target.parents:
            raise AdapterToolError(f"output {out} overlaps input {source}; choose another output path")
    if out.exists() and not force:
        raise AdapterToolError(f"output {out} already exists; pass --force to replace it")


@contextmanager
def staged_output(out: Path, *, force: bool, inputs: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield a fresh temporary folder that becomes ``out`` when the block completes.

    On any exception (KeyboardInterrupt included) the temporary folder is removed and ``out`` is
    left as it was. With ``force`` an existing ``out`` is replaced only after the new one is complete.
    """
    check_output(out, force=force, inputs=inputs)
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(parent, out.name)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_prefix(out.name)}{os.getpid()}-", dir=parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; OUT gets a normal folder's mode
        yield tmp
        _replace(tmp, out.resolve())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _prefix(name: str) -> str:
    return f".{name}.adaptertool-"


def scratch_prefix(out: Path, purpose: str) -> str:
    """The name prefix for a command's scratch folder beside ``out``, marked as unfinished work."""
    return f"{_prefix(out.name)}{purpose}-"


def is_unfinished(name: str) -> bool:
    """Whether a file or folder name is a staged output or scratch of a run that has not finished
    (or was killed), or a partial download huggingface_hub left behind."""
    return (name.startswith(".") and ".adaptertool-" in name) or name.endswith(".incomplete")


def _replace(tmp: Path, out: Path) -> None:
    if not out.exists() and not out.is_symlink():
        os.rename(tmp, out)
        return
    # Move the old output aside first so that a crash between the two renames loses nothing.
    old = Path(tempfile.mkdtemp(prefix=f"{_prefix(out.name)}{os.getpid()}-old-", dir=out.parent))
    os.rename(out, old / out.name)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_stale(parent: Path, name: str) -> None:
    for leftover in parent.glob(f"{_prefix(name)}*"):
        pid = leftover.name[len(_prefix(name)) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True

"""Atomic outputs: build in a temporary folder beside OUT, rename into place only when complete.

A run that fails or is interrupted (exception, Ctrl-C, SIGTERM) removes its temporary folder; one
that is killed outright leaves it behind. Every folder a run makes beside OUT (the staged output,
:func:`scratch_prefix` scratch, a replaced OUT moved aside) is named ``.OUT.adaptertool-PID-...``,
and the next run for the same OUT removes those whose process is gone. OUT therefore either does
not exist or is complete.

The last step never replaces an OUT that someone else made meanwhile: the new files are flushed to
disk, then the folder is renamed with ``RENAME_NOREPLACE`` (Linux renameat2), which fails if OUT
appeared after the start check; without --force that is an error. With --force the old OUT is
moved aside, the new one renamed in, and the old one deleted. An advisory lock on OUT's parent
folder (flock) keeps two adaptertool runs from interleaving these steps, and stands in for
renameat2 where the system lacks it (a check and a rename under the lock).

An output that is one file (a GGUF adapter) is staged the same way, as a file in such a folder,
and moved out of it into place.

An OSError with an errno (a full disk, an I/O error) while staging becomes one AdapterToolError
naming OUT.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from functools import cache
from pathlib import Path

from adaptertool.errors import OutputError

__all__ = ["check_output", "is_unfinished", "scratch_prefix", "staged_file", "staged_output"]

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
# renameat2's answers that mean "not here" (an old kernel, a filesystem without the flag): fall back.
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)
_FULL = (errno.ENOSPC, errno.EDQUOT)


def check_output(out: Path, *, force: bool, inputs: Sequence[Path] = ()) -> None:
    """Refuse an OUT that exists (without ``force``), that is a symbolic link, or that is, holds, or
    lies inside an input."""
    if out.is_symlink():
        # --force would replace what the link points to, which may be anything: refuse instead.
        raise OutputError(f"output {out} is a symbolic link (to {os.readlink(out)}); "
                          "name the real path, or remove the link")
    target = out.resolve()
    for source in inputs:
        src = source.resolve()
        if target == src or target in src.parents or src in target.parents:
            raise OutputError(f"output {out} overlaps input {source}; choose another output path")
    if out.exists() and not force:
        raise OutputError(f"output {out} already exists; pass --force to replace it")


@contextmanager
def staged_output(out: Path, *, force: bool, inputs: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield a fresh temporary folder that becomes ``out`` when the block completes.

    On any exception (KeyboardInterrupt included) the temporary folder is removed and ``out`` is
    left as it was. With ``force`` an existing ``out`` is replaced only after the new one is complete.

    Raises:
        AdapterToolError: what :func:`check_output` refuses, an OUT that another process made while
            this one was writing (without ``force``), or an OSError with an errno, naming OUT.
    """
    with _staged(out, force=force, inputs=inputs, commit=_commit) as tmp:
        yield tmp


@contextmanager
def staged_file(out: Path, *, force: bool, inputs: Sequence[Path] = ()) -> Iterator[Path]:
    """:func:`staged_output` for an output that is one file: yield a path in a temporary folder
    beside ``out``, renamed to ``out`` when the block completes (with ``force``, one atomic
    ``os.replace`` of the old file).

    Raises:
        AdapterToolError: as staged_output, and an OUT that is a folder.
    """
    if out.is_dir() and not out.is_symlink():
        raise OutputError(f"output {out} is a folder, and this output is one file; name a file, or remove the folder")
    with _staged(out, force=force, inputs=inputs, commit=_commit_file) as tmp:
        yield tmp / out.name


@contextmanager
def _staged(out: Path, *, force: bool, inputs: Sequence[Path], commit: Callable[..., None]) -> Iterator[Path]:
    """The staging both outputs share: a temporary folder, flushed and handed to ``commit``
    (``commit(tmp, OUT, force=force)``) when the block completes, removed on any failure."""
    check_output(out, force=force, inputs=inputs)
    tmp: Path | None = None
    try:
        parent = out.resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(parent, out.name)
        if not force and (parent / out.name).exists():  # an old OUT that a killed --force run moved aside, put back
            raise OutputError(f"output {out} already exists; pass --force to replace it")
        tmp = Path(tempfile.mkdtemp(prefix=f"{_prefix(out.name)}{os.getpid()}-", dir=parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; OUT gets a normal folder's mode
        yield tmp
        _sync_tree(tmp)
        commit(tmp, parent / out.name, force=force)
    except BaseException as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and err.errno is not None:
            raise OutputError(_failure(out, err)) from err
        raise


def scratch_prefix(out: Path, purpose: str) -> str:
    """The name prefix for a command's scratch folder beside ``out``: marked as unfinished work, with
    this process's id so that a later run can remove it once this process is gone."""
    return f"{_prefix(out.name)}{os.getpid()}-{purpose}-"


def is_unfinished(name: str) -> bool:
    """Whether a file or folder name is a staged output or scratch of a run that has not finished
    (or was killed), or a partial download huggingface_hub left behind."""
    return (name.startswith(".") and ".adaptertool-" in name) or name.endswith(".incomplete")


def _prefix(name: str) -> str:
    return f".{name}.adaptertool-"


def _failure(out: Path, err: OSError) -> str:
    if err.errno in _FULL:
        return (f"output {out} not written: no space left on its disk ({err.strerror}); "
                "free some space or choose another OUT")
    return f"output {out} not written ({err}); {out} is as it was before this run"


def _sync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` to disk, so that a crash after the rename cannot
    leave a complete-looking OUT whose data never reached the disk."""
    for path in [*sorted(folder.rglob("*")), folder]:
        if not path.is_symlink():
            _fsync(path)


def _commit(tmp: Path, out: Path, *, force: bool) -> None:
    """Rename ``tmp`` to ``out``, replacing an existing ``out`` only with ``force``."""
    with _parent_locked(out.parent):
        if not force or not (out.exists() or out.is_symlink()):
            _rename_new(tmp, out)
        else:
            # Move the old output aside first, so that a crash between the two renames loses nothing:
            # the next run's _remove_stale puts it back.
            aside = Path(tempfile.mkdtemp(prefix=f"{_prefix(out.name)}{os.getpid()}-old-", dir=out.parent))
            moved = False
            try:
                os.rename(out, aside / out.name)  # a symbolic link that appeared at OUT moves, not what it points to
                moved = True
                _rename_new(tmp, out)
            except BaseException:
                if moved:
                    os.rename(aside / out.name, out)
                os.rmdir(aside)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        # OUT is complete and in place, its files flushed: a failure to flush the rename itself is
        # not worth reporting OUT as unwritten.
        with suppress(OSError):
            _fsync(out.parent)


def _commit_file(tmp: Path, out: Path, *, force: bool) -> None:
    """Rename the file ``tmp/<OUT's name>`` to ``out``, replacing an existing ``out`` only with ``force``."""
    with _parent_locked(out.parent):
        if force:
            os.replace(tmp / out.name, out)  # atomic for a file: no moment without an OUT
        else:
            _rename_new(tmp / out.name, out)
        with suppress(OSError):
            _fsync(out.parent)
    os.rmdir(tmp)


def _rename_new(tmp: Path, out: Path) -> None:
    if not _rename_noreplace(tmp, out):
        raise OutputError(f"output {out} appeared while this run was writing it (another run?) and was left "
                          "as it is; pass --force to replace it, or choose another OUT")


def _rename_noreplace(src: Path, dst: Path) -> bool:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (then False), atomically where the system can."""
    renameat2 = _renameat2()
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return True
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            return False
        if code not in _UNSUPPORTED:
            raise OSError(code, os.strerror(code), str(dst))
    # Under the parent's lock: atomic against other adaptertool runs, not against other programs.
    if dst.exists() or dst.is_symlink():
        return False
    os.rename(src, dst)
    return True


@cache
def _renameat2() -> Callable[..., int] | None:
    """The C library's renameat2 (glibc >= 2.28, Linux >= 3.15), or None."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


@contextmanager
def _parent_locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``folder`` itself: no lock file to leave behind or to race on."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except PermissionError:  # a folder we may write to but not read: renameat2 alone guards the rename
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_stale(parent: Path, name: str) -> None:
    """Remove what runs for OUT ``name`` that are no longer alive left beside it; an old OUT that a
    killed --force run had moved aside is put back first, if no OUT has taken its place."""
    prefix = _prefix(name)
    for leftover in parent.glob(f"{glob.escape(prefix)}*"):
        pid, _, purpose = leftover.name[len(prefix) :].partition("-")
        if not pid.isdigit() or _alive(int(pid)):
            continue
        old, out = leftover / name, parent / name
        if purpose.startswith("old-") and (old.exists() or old.is_symlink()) and not (out.exists() or out.is_symlink()):
            os.rename(old, out)
        shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True

"""Every exception adaptertool raises on purpose, in one module.

Every failure caused by the user's input or environment (a missing file, a corrupt header, an
adapter that does not fit its base) is raised as an :class:`AdapterToolError` with a one-line
message that names the file or tensor and says what to do. The CLI prints it as ``error: ...`` and
exits 1; anything else escaping a command is a bug and keeps its traceback. The subclasses exist
for Python callers that handle one kind on its own (retry a Hub download, ask again for an
option); docs/api.md lists them.
"""

from __future__ import annotations

__all__ = ["AdapterToolError", "CollectiveError", "HubError", "InputError", "OptionError", "OutputError", "ProcessError"]


class AdapterToolError(Exception):
    """A user-facing failure with a one-line, actionable message."""


class InputError(AdapterToolError):
    """An input that is missing, unreadable, malformed or unsupported: a checkpoint, adapter, config
    or data file, or a tensor in one, or inputs that do not fit each other."""


class OptionError(AdapterToolError, ValueError):
    """A bad option value or combination of options, alone or for the inputs given (a ``--targets``
    that matches no module); also a ``ValueError``, as Python callers expect of a bad argument."""


class OutputError(AdapterToolError):
    """OUT cannot be written: it exists and ``force`` is off, it overlaps an input, or writing it
    failed (a full disk, an I/O error); an OUT that existed is left as it was."""


class HubError(AdapterToolError):
    """A Hugging Face Hub lookup, download or upload that failed: no network, no such repo or
    revision, no access, or a repo without the files asked for."""


class ProcessError(AdapterToolError):
    """A failure of one process of a multi-process job (a collective that broke, a device that is
    missing) rather than of the input every process shares: each process reports its own, while
    errors every process meets alike are reported once, by the first."""


class CollectiveError(ProcessError):
    """A collective operation that failed on this process because another one died or timed out."""

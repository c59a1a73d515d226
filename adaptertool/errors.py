"""The one exception type users see.

Every failure caused by the user's input or environment (a missing file, a corrupt header, an
adapter that does not fit its base) is raised as :class:`AdapterToolError` with a one-line message
that names the file or tensor and says what to do. The CLI prints it as ``error: ...`` and exits 1.
Anything else escaping a command is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["AdapterToolError", "CollectiveError", "ProcessError"]


class AdapterToolError(Exception):
    """A user-facing failure with a one-line, actionable message."""


class ProcessError(AdapterToolError):
    """A failure of one process of a multi-process job (a collective that broke, a device that is
    missing) rather than of the input every process shares: each process reports its own, while
    errors every process meets alike are reported once, by the first."""


class CollectiveError(ProcessError):
    """A collective operation that failed on this process because another one died or timed out."""

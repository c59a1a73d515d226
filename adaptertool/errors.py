"""The one exception type users see.

Every failure caused by the user's input or environment (a missing file, a corrupt header, an
adapter that does not fit its base) is raised as :class:`AdapterToolError` with a one-line message
that names the file or tensor and says what to do. The CLI prints it as ``error: ...`` and exits 1.
Anything else escaping a command is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["AdapterToolError"]


class AdapterToolError(Exception):
    """A user-facing failure with a one-line, actionable message."""

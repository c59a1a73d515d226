"""Figures every command reports: elapsed time and the process's peak resident memory."""

from __future__ import annotations

import resource
import sys
import time

__all__ = ["Stopwatch", "peak_rss_bytes"]


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes.

    A command's own figure when it runs as the CLI; in a long-lived Python process it is the
    process's high-water mark, which may predate the command.
    """
    # Linux: VmHWM is this process image's own peak. ru_maxrss survives exec, so a small command
    # started straight from a large Python process would report its parent's peak.
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


class Stopwatch:
    """Seconds since construction."""

    def __init__(self) -> None:
        self._start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self._start

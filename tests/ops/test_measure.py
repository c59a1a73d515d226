"""peak_rss_bytes: the command's own peak, not an ancestor's."""

from __future__ import annotations

import subprocess
import sys

CHILD = "from adaptertool.ops.measure import peak_rss_bytes; print(peak_rss_bytes())"
# 300 MB, every page written so that it is resident (an untouched allocation may never be).
TOUCH_300MB = "b = bytearray(300 << 20); b[::4096] = b'1' * len(b[::4096])"


def _peak(code: str) -> int:
    return int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def test_peak_counts_what_the_process_touched() -> None:
    assert _peak(f"{TOUCH_300MB}; {CHILD}") >= 300 << 20


def test_peak_is_the_process_own_even_when_exec_from_a_large_one() -> None:
    # The child is the image a 300 MB Python process exec()s into: ru_maxrss would carry the
    # 300 MB across the exec; the figure must not.
    exec_child = f"os.execv(sys.executable, [sys.executable, '-c', {CHILD!r}])"
    assert _peak(f"import os, sys; {TOUCH_300MB}; {exec_child}") < 200 << 20

"""peak_rss_bytes: the command's own peak, not an ancestor's."""

from __future__ import annotations

import subprocess
import sys

from adaptertool.ops.measure import peak_rss_bytes

CHILD = "from adaptertool.ops.measure import peak_rss_bytes; print(peak_rss_bytes())"


def test_peak_is_the_process_own_even_when_exec_from_a_large_one() -> None:
    # Run the child as the image that a 300 MB Python process exec()s into: ru_maxrss would carry
    # the 300 MB across the exec; the figure must not.
    big = ("import os, sys; b = bytearray(300 << 20); b[::4096] = b'1' * len(b[::4096]); "
           f"os.execv(sys.executable, [sys.executable, '-c', {CHILD!r}])")
    child = int(subprocess.run([sys.executable, "-c", big], check=True, capture_output=True, text=True).stdout)
    assert child < 200 << 20
    assert peak_rss_bytes() > 10 << 20  # and this process's own figure is real

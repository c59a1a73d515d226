"""Run a command and its peer on the same input; report median wall time and peak RSS.

Each run is a fresh process under GNU time (`/usr/bin/time -f %M`; Debian package `time`), which
reports the peak RSS of the command itself. Taking ru_maxrss from a child forked by this Python
process would not do: Linux counts the parent's pages at fork time into the child's peak.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

GNU_TIME = "/usr/bin/time"


@dataclass(frozen=True)
class Measurement:
    label: str
    command: str
    median_s: float
    runs_s: list[float]
    peak_rss_mb: float


def measure(label: str, argv: Sequence[str], *, runs: int = 3, before: Callable[[], None] | None = None) -> Measurement:
    """Run ``argv`` ``runs`` times (calling ``before`` and syncing first each time); median seconds and max peak RSS."""
    return measure_alternating([(label, argv, before)], runs=runs)[0]


def measure_alternating(commands: Sequence[tuple[str, Sequence[str], Callable[[], None] | None]], *,
                        runs: int = 3) -> list[Measurement]:
    """:func:`measure` for several ``(label, argv, before)`` commands, run in turn ``runs`` rounds over.

    Taking turns lets slow drifts of the machine's speed (10-30 % over minutes on shared VMs) fall
    on every command alike instead of on whichever ran during a slow spell.
    """
    if not Path(GNU_TIME).is_file():
        raise SystemExit(f"{GNU_TIME} is missing: apt-get install time")
    times: list[list[float]] = [[] for _ in commands]
    peaks: list[list[float]] = [[] for _ in commands]
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "rss"
        for _ in range(runs):
            for i, (_, argv, before) in enumerate(commands):
                if before is not None:
                    before()
                os.sync()  # no dirty pages from an earlier run: their writeback would land in this run's time
                start = time.perf_counter()
                done = subprocess.run([GNU_TIME, "-f", "%M", "-o", str(report), *argv], stdout=subprocess.DEVNULL, check=False)
                times[i].append(time.perf_counter() - start)
                if done.returncode != 0:
                    raise SystemExit(f"benchmark command failed: {' '.join(argv)}")
                peaks[i].append(int(report.read_text().split()[-1]) / 1024)  # KiB -> MiB
    return [Measurement(label, " ".join(argv), round(statistics.median(t), 3), [round(x, 3) for x in t], round(max(p), 1))
            for (label, argv, _), t, p in zip(commands, times, peaks)]


def remover(path: Path) -> Callable[[], None]:
    """A ``before`` hook that deletes ``path`` so each run writes a fresh output."""
    return lambda: shutil.rmtree(path, ignore_errors=True)


def drop_page_cache() -> bool:
    """Try to empty the page cache (root on bare metal); False where the sandbox forbids it."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


# Environment variables that hold torch's kernels, MKL and oneDNN to an older instruction set: with
# ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 an AVX-512 machine runs
# the code paths of an AVX2-only one (its caches, clock and memory stay its own). Every side inherits them.
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def machine() -> dict[str, object]:
    info: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as lines:
        for line in lines:  # the first processor's fields
            key, _, value = line.partition(":")
            if not key.strip():
                break
            info.setdefault(key.strip(), value.strip())
    flags = set(info.get("flags", "").split())
    # a VM may name only the brand ("AMD EPYC"); family and model tell its generation (25/17: Zen 4)
    return {"python": platform.python_version(), "torch": version("torch"), "cpus": os.cpu_count(),
            "cpu": f"{info.get('model name', platform.processor())} (family {info.get('cpu family')}, model {info.get('model')})",
            "machine": platform.machine(), "platform": platform.platform(),
            "cpu_isa": "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other",
            "isa_limits": {name: os.environ[name] for name in ISA_LIMITS if name in os.environ}}


def emit(name: str, results: list[Measurement], extra: dict[str, object]) -> None:
    """Print one JSON line with every figure, and a Markdown table for docs/benchmarks.md to stderr."""
    print(json.dumps({"benchmark": name, "machine": machine(), **extra, "results": [asdict(r) for r in results]}))
    print(f"\n| {name} | median s | peak RSS MB |\n|---|---|---|", file=sys.stderr)
    for r in results:
        print(f"| {r.label} | {r.median_s:.2f} | {r.peak_rss_mb:.0f} |", file=sys.stderr)


# For the comparison scripts the benchmarks run in a child process: {key: (open file, key)} of a folder.
READ_TENSORS = """
from pathlib import Path
from safetensors import safe_open
def tensors(folder):
    found = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        f = safe_open(shard, "pt")
        found.update({k: (f, k) for k in f.keys()})
    return found
"""

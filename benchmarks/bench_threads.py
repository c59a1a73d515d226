"""Default threads vs --threads 1 and 2, on an idle machine and with one core busy (`yes > /dev/null`).

    python benchmarks/bench_threads.py [--runs 3] [--commands merge,convert,extract]

Inputs: the real SmolLM2-135M-Instruct (bf16, 3 shards), a rank-16 all-linear PEFT LoRA for it
(bench_merge.py's), and its short real full fine-tune (fixtures/build_real_models.py smollm2-tuned).
Commands: `merge BASE LORA OUT`, `convert LORA OUT --rank 8` (an SVD per module) and
`extract BASE TUNED OUT --rank 16`. In each load cell the settings take turns run by run, so the
machine's drifts fall on all of them; the busy cell keeps one `yes` process spinning throughout.
The default must be within 10 % of the best setting in every cell.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from bench_io import CACHE, smollm2
from bench_merge import adapter_for
from harness import emit, measure_alternating, remover

# --threads 2 is torch's one per core on a 2-core machine: the default before this benchmark.
ADAPTERTOOL = [sys.executable, "-m", "adaptertool"]
SETTINGS = {"default": ADAPTERTOOL, "--threads 1": [*ADAPTERTOOL, "--threads", "1"], "--threads 2": [*ADAPTERTOOL, "--threads", "2"]}


def command_args(name: str, base: Path, out: Path) -> list[str]:
    adapter = adapter_for("smollm2", base)
    return {
        "merge": ["merge", str(base), str(adapter), str(out)],
        "convert": ["convert", str(adapter), str(out), "--rank", "8"],
        "extract": ["extract", str(base), str(smollm2("smollm2-tuned")), str(out), "--rank", "16"],
    }[name]


def bench(name: str, base: Path, runs: int) -> dict[str, dict[str, float]]:
    out = CACHE / f"threads-{name}-out"
    args = command_args(name, base, out)
    cells: dict[str, dict[str, float]] = {}
    for load in ("idle", "one core busy"):
        spinner = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) if load != "idle" else None
        try:
            results = measure_alternating(
                [(f"{name} {setting}, {load}", [*prefix, *args, "-q"], remover(out))
                 for setting, prefix in SETTINGS.items()], runs=runs)
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
        remover(out)()
        medians = {setting: r.median_s for setting, r in zip(SETTINGS, results)}
        best = min(medians.values())
        emit(f"threads-{name}-{load.replace(' ', '-')}", results, {
            "default_over_best": round(medians["default"] / best, 3),
        })
        cells[load] = medians
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--commands", default="merge,convert,extract")
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    base = smollm2()
    table = {name: bench(name, base, args.runs) for name in args.commands.split(",")}
    print("\n| command, load | default | --threads 1 | --threads 2 | default / best |\n|---|---|---|---|---|",
          file=sys.stderr)
    for name, cells in table.items():
        for load, m in cells.items():
            ratio = m["default"] / min(m.values())
            print(f"| {name}, {load} | {m['default']:.2f} s | {m['--threads 1']:.2f} s | {m['--threads 2']:.2f} s "
                  f"| {ratio:.2f} |", file=sys.stderr)


if __name__ == "__main__":
    main()

"""The long differential fuzz run of the reader against safetensors (the suite runs 2,000 cases).

    OMP_NUM_THREADS=1 python -m tests.io.fuzz_long --cases 200000 --seed 20261206

Same files and oracle as tests/io/test_fuzz_reader.py (tests/io/safetensors_fuzz.py), a fixed seed,
no example database. Prints one line of figures to record in docs/reliability.md; on a disagreement
hypothesis shrinks the case, prints it and the script exits 1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings

from tests.io.safetensors_fuzz import check, files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=20261206)
    args = parser.parse_args()
    seen: Counter[str] = Counter()
    with tempfile.TemporaryDirectory(prefix="adaptertool-fuzz-") as scratch:
        folder = Path(scratch)

        @seed(args.seed)
        @settings(max_examples=args.cases, database=None, deadline=None, suppress_health_check=list(HealthCheck))
        @given(files())
        def case(data: bytes) -> None:
            outcome = check(data, folder)
            seen["accepted" if outcome.accepted else "declared" if outcome.declared else "refused"] += 1

        start = time.perf_counter()
        try:
            case()
        except AssertionError as err:  # its notes hold the shrunk case
            traceback.print_exception(err)
            print(f"FAILED after {sum(seen.values())} cases, seed {args.seed}: {err}", file=sys.stderr)
            return 1
        seconds = time.perf_counter() - start
    print(f"{sum(seen.values())} cases, seed {args.seed}, {seconds:.0f} s: {seen['accepted']} accepted by both, "
          f"{seen['refused']} refused by both, {seen['declared']} refused by adaptertool only as declared, 0 disagreements")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""I/O floor: rewriting a checkpoint with adaptertool's reader/writer vs cp, cat, and a safetensors script.

    python benchmarks/bench_io.py [--model synthetic|smollm2|both] [--runs 3]

synthetic: a deterministic Llama-shaped checkpoint of ~1.2B parameters (TinyLlama-1.1B's sizes with
24 layers), bf16, 2.4 GB in 5 shards, generated once into .cache/bench. smollm2: the real
SmolLM2-135M-Instruct built by fixtures/build_real_models.py. Files are warm in the page cache
(the machine has far more RAM than the checkpoint), so the figures are the copy cost, not the disk.
The peer "safetensors script" is what hand-written tools do: load_file each shard, save_file it back.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from harness import emit, measure, remover

from adaptertool.io import open_checkpoint  # headers only: no torch in this process

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "bench"

SAFETENSORS_SCRIPT = """
import sys, pathlib, shutil
from safetensors.torch import load_file, save_file
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
dst.mkdir()
for f in sorted(src.iterdir()):
    if f.suffix == ".safetensors":
        save_file(load_file(f), dst / f.name, metadata={"format": "pt"})
    else:
        shutil.copy(f, dst / f.name)
"""


def synthetic() -> Path:
    path = CACHE / "tinyllama-1b-bf16-5shards"
    if not path.exists():  # generated in a child process, so this one never holds torch
        subprocess.run([sys.executable, "-c", (
            "import sys, torch; from pathlib import Path; from adaptertool.ops.examples import TINYLLAMA_1B, write_llama; "
            "write_llama(Path(sys.argv[1]), TINYLLAMA_1B, dtype=torch.bfloat16, max_shard_bytes=500_000_000)"
        ), str(path)], check=True)
    return path


def smollm2(which: str = "smollm2") -> Path:
    """A real-model fixture folder ("smollm2" or "smollm2-tuned"), built and cached on first use."""
    built = subprocess.run([sys.executable, str(REPO / "fixtures" / "build_real_models.py"), which],
                           check=True, capture_output=True, text=True)
    return Path(built.stdout.strip().splitlines()[-1])


def bench(name: str, source: Path, runs: int) -> None:
    with open_checkpoint(source) as ckpt:
        shards, size = len(ckpt.files), sum(s.nbytes for s in ckpt.specs())
    largest = max(f.stat().st_size for f in ckpt.files)
    shard_arg = str(largest + 1)
    work = Path(tempfile.mkdtemp(dir=CACHE))
    out = work / "out"
    at = [sys.executable, "-m", "adaptertool", "reshard", "-q", str(source), str(out)]
    results = [
        measure("cat shards > /dev/null (read floor)", ["sh", "-c", f"cat {source}/*.safetensors > /dev/null"], runs=runs),
        measure("cp -r (copy floor)", ["cp", "-r", str(source), str(out)], runs=runs, before=remover(out)),
        measure(f"adaptertool reshard, same {shards} shards", at + ["--max-shard-size", shard_arg], runs=runs, before=remover(out)),
        measure("adaptertool reshard, into 1 file", at + ["--max-shard-size", "0"], runs=runs, before=remover(out)),
        measure("safetensors load_file/save_file per shard", [sys.executable, "-c", SAFETENSORS_SCRIPT, str(source), str(out)],
                runs=runs, before=remover(out)),
        measure("python -c 'import adaptertool.cli' (start-up)", [sys.executable, "-c", "import adaptertool.cli"], runs=runs),
    ]
    remover(work)()
    emit(f"io-{name}", results, {"input": str(source.relative_to(REPO)) if source.is_relative_to(REPO) else str(source),
                                 "shards": shards, "tensor_bytes": size})


def run(doc: str, bench_one: Callable[[str, Path, int], None]) -> None:
    """The command line every benchmark over SmolLM2 and the synthetic 1.2B model shares."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", choices=["synthetic", "smollm2", "both"], default="both")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    if args.model in ("smollm2", "both"):
        bench_one("smollm2", smollm2(), args.runs)
    if args.model in ("synthetic", "both"):
        bench_one("synthetic-1.2B", synthetic(), args.runs)


if __name__ == "__main__":
    run(__doc__, bench)

"""train on 1 vs 2 processes (DDP and FSDP2, gloo on the CPU): scaling, and each process's memory.

    python benchmarks/bench_distributed.py [--part scaling|memory|both] [--steps 4] [--runs 1]

scaling: SmolLM2-135M-Instruct in float32, rank-16 all-linear LoRA, dropout 0, 4 micro-batches of
2 x 256 tokens a step across the job (1 process: --grad-accum 4; 2 processes: --grad-accum 2 each),
so every side trains the same adapter. One process with 1 thread is the base of the scaling
efficiency (tokens/s of 2 one-thread processes / 2 x its tokens/s); one process with 2 threads is
what a single process gets from this 2-core machine. The sides take turns, run by run.

memory: the synthetic ~1.2B Llama (bench_io's, bf16 on disk, trained in float32 on the CPU) with
a word-level tokenizer written beside it, one step of 1 x 32 tokens on each of 2 processes, DDP vs
FSDP2. Figures: the largest process's peak RSS (GNU time over the launcher and its workers) and
rank 0's model bytes (its parameters and buffers: FSDP2 holds its shard).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

from bench_io import CACHE, smollm2, synthetic
from harness import emit, measure_alternating, remover

WORDS = [f"w{i}" for i in range(2000)]
# Runs adaptertool train, appends its JSON report's figures to a results file (argv[1]).
OURS = """
import json, subprocess, sys
done = subprocess.run([sys.executable, "-m", "adaptertool", *sys.argv[2:]], capture_output=True, text=True)
if done.returncode:
    sys.exit(done.stderr)
r = json.loads(done.stdout)
seconds = r["tokens"] / r["tokens_per_s"]  # the loop's own time
print(json.dumps({"tokens_per_s": r["tokens_per_s"], "seconds": seconds, "model_bytes": r["model_bytes"],
                  "peak_rss_bytes": r["peak_rss_bytes"], "loss": r["train_loss"]}), file=open(sys.argv[1], "a"))
"""


def word_data(path: Path, records: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as out:
        for _ in range(records):
            out.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(60))}) + "\n")
    return path


def write_word_tokenizer(folder: Path, words: list[str]) -> None:
    """A word-level tokenizer.json (and its tokenizer_config.json) for a synthetic model: ``words``
    after three special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    special = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(special + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(special)
    (folder / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))


def synthetic_with_tokenizer() -> Path:
    """bench_io's synthetic model linked into a folder that also holds a word-level tokenizer."""
    folder = CACHE / "tinyllama-1b-train"
    if not (folder / "tokenizer.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for f in synthetic().iterdir():
            if not (folder / f.name).exists():
                (folder / f.name).symlink_to(f)
        write_word_tokenizer(folder, WORDS)
    return folder


def run_sides(sides: list[tuple[str, str, list[str]]], out: Path, scratch: Path, runs: int) -> tuple[list, dict]:
    """Measure each ``(name, label, train args)`` side in turn; its results-file lines by name."""
    files = {name: scratch / f"{name}.json" for name, _, _ in sides}
    commands = [(label, [sys.executable, "-c", OURS, str(files[name]), *args], remover(out)) for name, label, args in sides]
    measured = measure_alternating(commands, runs=runs)
    lines = {name: [json.loads(line) for line in files[name].read_text().splitlines()] for name, _, _ in sides}
    return measured, lines


def scaling(steps: int, runs: int) -> None:
    base = smollm2()
    with tempfile.TemporaryDirectory(dir=CACHE) as scratch_name:
        scratch = Path(scratch_name)
        data, out = word_data(scratch / "train.jsonl", steps * 8 * 256 // 60 + 8), scratch / "out"
        common = ["train", str(base), str(data), str(out), "--rank", "16", "--alpha", "32", "--dropout", "0",
                  "--seq-len", "256", "--batch-size", "2", "--max-steps", str(steps), "--schedule", "constant",
                  "--device", "cpu", "--json", "--force"]
        sides = [("one_1t", "1 process, 1 thread, --grad-accum 4", ["--threads", "1", *common, "--grad-accum", "4"]),
                 ("one_2t", "1 process, 2 threads, --grad-accum 4", ["--threads", "2", *common, "--grad-accum", "4"]),
                 ("ddp", "2 processes (DDP), 1 thread each, --grad-accum 2",
                  [*common, "--grad-accum", "2", "--devices", "2", "--parallel", "ddp"]),
                 ("fsdp", "2 processes (FSDP2), 1 thread each, --grad-accum 2",
                  [*common, "--grad-accum", "2", "--devices", "2", "--parallel", "fsdp"])]
        measured, lines = run_sides(sides, out, scratch, runs)
    tps = {name: statistics.median(r["tokens_per_s"] for r in rows) for name, rows in lines.items()}
    emit("distributed-scaling-smollm2", measured, {
        "steps": steps, "tokens_per_step": 4 * 2 * 256,
        "tokens_per_s": {name: round(v, 1) for name, v in tps.items()},
        "tokens_per_s_runs": {name: [round(r["tokens_per_s"], 1) for r in rows] for name, rows in lines.items()},
        "last_loss": {name: round(rows[-1]["loss"], 5) for name, rows in lines.items()},
        "scaling_efficiency_vs_1_thread": {p: round(tps[p] / (2 * tps["one_1t"]), 3) for p in ("ddp", "fsdp")},
        "speedup_vs_1_process_2_threads": {p: round(tps[p] / tps["one_2t"], 3) for p in ("ddp", "fsdp")},
    })


def memory(runs: int) -> None:
    base = synthetic_with_tokenizer()
    with tempfile.TemporaryDirectory(dir=CACHE) as scratch_name:
        scratch = Path(scratch_name)
        data, out = word_data(scratch / "train.jsonl", 8), scratch / "out"
        common = ["train", str(base), str(data), str(out), "--rank", "16", "--dropout", "0", "--seq-len", "32",
                  "--batch-size", "1", "--max-steps", "1", "--device", "cpu", "--devices", "2", "--json", "--force"]
        sides = [(p, f"2 processes, {p}, 1.2B float32 base", [*common, "--parallel", p]) for p in ("ddp", "fsdp")]
        measured, lines = run_sides(sides, out, scratch, runs)
    model = {name: max(r["model_bytes"] for r in rows) for name, rows in lines.items()}
    peak = {m.label: m.peak_rss_mb for m in measured}
    emit("distributed-memory-1.2b", measured, {
        "model_bytes_per_process": model,
        "model_bytes_ratio_fsdp_vs_ddp": round(model["fsdp"] / model["ddp"], 3),
        "peak_rss_ratio_fsdp_vs_ddp": round(peak[sides[1][1]] / peak[sides[0][1]], 3),
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["scaling", "memory", "both"], default="both")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    if args.part in ("scaling", "both"):
        scaling(args.steps, args.runs)
    if args.part in ("memory", "both"):
        memory(args.runs)


if __name__ == "__main__":
    main()

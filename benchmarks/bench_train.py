"""train vs a PEFT + transformers loop: same model, data, batch, sequence length and precision, same run.

    python benchmarks/bench_train.py [--steps 6] [--runs 1] [--qlora]

SmolLM2-135M-Instruct in float32 on the CPU, rank-16 all-linear LoRA (alpha 32, dropout 0.05),
AdamW at 2e-4 with gradient clipping at 1.0, batches of 4 packed blocks of 256 tokens cut from the
same text (a seeded word salad, EOS between records). Each side reports its own training tokens/s
over the loop (model loading and tokenising excluded), counting batch x seq positions per step (see
OURS); GNU time gives each process's peak RSS.
``--qlora`` adds our QLoRA run (NF4 base, dequantised on the fly) beside the 16-bit ones.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench_io import CACHE, smollm2
from harness import emit, measure_alternating, remover

BATCH, SEQ = 4, 256
WORDS = ("the model reads each shard once and writes the merged weights while the adapter stays small "
         "a low rank update changes every projection of the block by the product of two thin matrices "
         "quantised codes hold four bits per weight with one scale for each block of sixty four").split()

# The peer's training loop after its model is built (model, blocks, steps, batch, seq, result defined):
# AdamW at train's defaults (weight decay 0), clipping at 1.0; its time and last loss go to `result`.
PEFT_LOOP = """
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
model.train()
start = time.perf_counter()
for step in range(steps):
    loss = model(input_ids=blocks[step], labels=blocks[step]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
print(json.dumps({"tokens_per_s": steps * batch * seq / (time.perf_counter() - start), "loss": loss.item()}), file=open(result, "a"))
"""

PEER = """
import json, sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import LoraConfig, get_peft_model
base, data, steps, batch, seq, result = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(base)
ids = []
for line in open(data):
    ids += tok(json.loads(line)["text"])["input_ids"] + [tok.eos_token_id]
blocks = torch.tensor(ids[: steps * batch * seq]).view(steps, batch, seq)
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))
""" + PEFT_LOOP

# Both sides count positions processed (steps x batch x seq) per second of their loop: the peer
# cuts exactly `steps` full batches from the token stream, while our packing pads the stream's last
# short block, and its batch (same shape, same compute) would otherwise count fewer tokens.
OURS = """
import json, subprocess, sys
done = subprocess.run([sys.executable, "-m", "adaptertool", "train", *sys.argv[3:]], capture_output=True, text=True)
if done.returncode:
    sys.exit(done.stderr)
report = json.loads(done.stdout)
seconds = report["tokens"] / report["tokens_per_s"]  # the loop's own time (evals excluded)
print(json.dumps({"tokens_per_s": report["steps"] * int(sys.argv[2]) / seconds, "loss": report["train_loss"]}), file=open(sys.argv[1], "a"))
"""


def write_data(path: Path, steps: int, words: Sequence[str] = WORDS) -> Path:
    """Text records of ``words`` with comfortably more than ``steps`` batches of tokens (the BPE gives ~1.3
    tokens a word; a word-level tokenizer one)."""
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as out:
        for _ in range(steps * BATCH * SEQ // 60 + 8):
            out.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(60))}) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--qlora", action="store_true")
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    base = smollm2()
    out = CACHE / "train-out"
    with tempfile.TemporaryDirectory() as scratch:
        data = write_data(Path(scratch) / "train.jsonl", args.steps)
        results_file = {name: Path(scratch) / f"{name}.json" for name in ("ours", "peft", "qlora")}
        ours_args = [str(base), str(data), str(out), "--rank", "16", "--alpha", "32", "--dropout", "0.05",
                     "--seq-len", str(SEQ), "--batch-size", str(BATCH), "--packing", "--max-steps", str(args.steps),
                     "--lr", "2e-4", "--max-grad-norm", "1.0", "--warmup-steps", "0", "--schedule", "constant",
                     "--optim", "adamw", "--device", "cpu", "--json", "--force"]
        commands = [
            ("ours", f"adaptertool train (fp32 LoRA r16, {BATCH}x{SEQ}, {args.steps} steps)",
             [sys.executable, "-c", OURS, str(results_file["ours"]), str(BATCH * SEQ), *ours_args], remover(out)),
            ("peft", "PEFT + transformers loop (same settings)",
             [sys.executable, "-c", PEER, str(base), str(data), str(args.steps), str(BATCH), str(SEQ),
              str(results_file["peft"])], None),
        ]
        if args.qlora:
            commands.append(("qlora", "adaptertool train --qlora (same settings)",
                             [sys.executable, "-c", OURS, str(results_file["qlora"]), str(BATCH * SEQ), *ours_args, "--qlora"],
                             remover(out)))
        # the sides take turns, run by run, so the VM's speed drifts fall on both
        measured = dict(zip((name for name, *_ in commands),
                            measure_alternating([(label, argv, before) for _, label, argv, before in commands], runs=args.runs)))
        # one line per run: the median run's tokens/s (the loss is the same every run)
        figures = {}
        for name in measured:
            lines = [json.loads(line) for line in results_file[name].read_text().splitlines()]
            figures[name] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in lines),
                             "tokens_per_s_runs": [round(r["tokens_per_s"], 1) for r in lines], "loss": lines[-1]["loss"]}
    remover(out)()
    ours, peft = figures["ours"], figures["peft"]
    # each round's ours / peft ratio: the two ran back to back, under the same machine speed
    paired = [a / b for a, b in zip(ours["tokens_per_s_runs"], peft["tokens_per_s_runs"])]
    emit("train-smollm2", list(measured.values()), {
        "steps": args.steps, "tokens_per_step": BATCH * SEQ,
        "tokens_per_s": {name: round(f["tokens_per_s"], 1) for name, f in figures.items()},
        "tokens_per_s_runs": {name: f["tokens_per_s_runs"] for name, f in figures.items()},
        "last_loss": {name: round(f["loss"], 4) for name, f in figures.items()},
        "speedup_vs_peft": round(ours["tokens_per_s"] / peft["tokens_per_s"], 2),  # ratio of the medians
        "speedup_vs_peft_by_round": [round(r, 2) for r in paired],
        "rss_ratio_vs_peft": round(measured["ours"].peak_rss_mb / measured["peft"].peak_rss_mb, 3),
    })


if __name__ == "__main__":
    main()

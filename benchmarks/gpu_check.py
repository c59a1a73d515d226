"""Every CUDA path in one short run, for a session that is lent a GPU machine: checks and timings.

    PYTHONPATH=. python3 benchmarks/gpu_check.py OUT_FOLDER [--steps 20] [--quick]

On the device machine the repository is a copy of the working tree; this runs it from there
(PYTHONPATH=., no install) with the packages that machine has (torch, transformers, peft,
accelerate). Each path runs as its own command, in order, and a failure is recorded and the next
path runs; everything lands in OUT_FOLDER/gpu_check.json (and the log of any failure beside it):

1. train LoRA, bf16 base, on cuda: tokens/s, peak VRAM; and the PEFT + transformers + accelerate
   loop on the same model, data and settings (the peer);
2. train --qlora (our NF4 codes, dequantised per layer on the GPU);
3. train under torchrun on one GPU: --parallel ddp and --parallel fsdp (NCCL);
4. merge --device cuda and extract --device cuda of the trained adapter, against the CPU's output.

The model is a synthetic Llama of ~1.2B parameters (TinyLlama-1.1B's shapes, 24 layers; --quick:
4 layers) with a word-level tokenizer, written on that machine (nothing can be fetched there).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

PEER = """
import json, sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import LoraConfig, get_peft_model
from accelerate import Accelerator
base, data, steps, batch, seq, result = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
accelerator = Accelerator(mixed_precision="bf16")
tok = AutoTokenizer.from_pretrained(base)
ids = []
for line in open(data):
    ids += tok(json.loads(line)["text"])["input_ids"] + [tok.eos_token_id]
blocks = torch.tensor(ids[: steps * batch * seq]).view(steps, batch, seq)
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=2e-4)
model, optimizer = accelerator.prepare(model, optimizer)
model.train()
torch.cuda.synchronize(); start = time.perf_counter()
for step in range(steps):
    batch_ids = blocks[step].to(accelerator.device)
    loss = model(input_ids=batch_ids, labels=batch_ids).loss
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(params, 1.0)
    optimizer.step(); optimizer.zero_grad(set_to_none=True)
torch.cuda.synchronize()
print(json.dumps({"tokens_per_s": steps * batch * seq / (time.perf_counter() - start), "loss": loss.item(),
                  "peak_vram_bytes": torch.cuda.max_memory_allocated()}), file=open(result, "w"))
"""

WORDS = [f"w{i}" for i in range(4000)]


def write_model(folder: Path, layers: int) -> None:
    from dataclasses import replace

    import torch
    from bench_distributed import write_word_tokenizer  # a sibling: this script's folder is on sys.path

    from adaptertool.ops.examples import TINYLLAMA_1B, write_llama

    write_llama(folder, replace(TINYLLAMA_1B, layers=layers), dtype=torch.bfloat16, max_shard_bytes=2_000_000_000)
    write_word_tokenizer(folder, WORDS)


def write_data(path: Path, tokens: int) -> None:
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as out:
        for _ in range(tokens // 100 + 8):
            out.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(100))}) + "\n")


def run(name: str, argv: list[str], out: Path, results: dict, timeout: float = 240) -> dict | None:
    """Run one path; its JSON report (the last stdout line that parses), its wall time, or its failure."""
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": "."})
    except subprocess.TimeoutExpired:
        results[name] = {"ok": False, "error": f"timed out after {timeout} s"}
        return None
    seconds = round(time.perf_counter() - start, 2)
    if done.returncode != 0:
        (out / f"{name}.log").write_text(done.stdout[-20000:] + "\n--- stderr ---\n" + done.stderr[-20000:])
        results[name] = {"ok": False, "seconds": seconds, "error": (done.stderr.strip().splitlines() or ["?"])[-1][:500]}
        return None
    report = None
    text = done.stdout.strip()
    try:
        report = json.loads(text[text.index("{"):]) if "{" in text else None
    except ValueError:
        report = None
    results[name] = {"ok": True, "seconds": seconds}
    print(f"{name}: ok in {seconds} s", flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="4 layers instead of 24")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself, anywhere")
    args = parser.parse_args()
    import torch

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = Path(f"/tmp/gpu_check_{args.device}")
    work.mkdir(exist_ok=True)
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    results: dict = {"device": name, "torch": torch.__version__, "steps": args.steps}
    base, data = work / "base", work / "train.jsonl"
    batch, seq = (8, 1024) if args.device == "cuda" else (1, 64)
    if not (base / "tokenizer.json").is_file():
        t = time.perf_counter()
        write_model(base, 4 if args.quick else 24)
        results["model_written_s"] = round(time.perf_counter() - t, 1)
    write_data(data, args.steps * batch * seq * 2)
    at = [sys.executable, "-m", "adaptertool"]
    common = [str(base), str(data), "--rank", "16", "--alpha", "32", "--dropout", "0", "--seq-len", str(seq),
              "--batch-size", str(batch), "--max-steps", str(args.steps), "--schedule", "constant", "--device", args.device,
              "--json", "--force", "-q"]
    figures = {}
    for name, extra in (("train_lora_bf16", []), ("train_qlora", ["--qlora"]),
                        ("train_lora_bf16_checkpointing", ["--gradient-checkpointing"])):
        report = run(name, [*at, "train", *common[:2], str(work / name), *common[2:], *extra], out, results)
        if report:
            figures[name] = {k: report[k] for k in ("tokens_per_s", "peak_vram_bytes", "train_loss", "seconds")}
    for parallel in ("ddp", "fsdp"):
        name = f"torchrun_1gpu_{parallel}"
        report = run(name, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m",
                            "adaptertool", "train", *common[:2], str(work / name), *common[2:], "--parallel", parallel],
                     out, results)
        if report:
            figures[name] = {k: report[k] for k in ("tokens_per_s", "peak_vram_bytes", "train_loss", "model_bytes")}
    if run("peft_peer", [sys.executable, "-c", PEER, str(base), str(data), str(args.steps), str(batch), str(seq),
                         str(work / "peer.json")], out, results):
        pass
    if (work / "peer.json").is_file() and results["peft_peer"]["ok"]:
        figures["peft_peer"] = json.loads((work / "peer.json").read_text())
    adapter = work / "train_lora_bf16"
    if adapter.is_dir():
        for device in (args.device, "cpu"):
            run(f"merge_{device}", [*at, "merge", str(base), str(adapter), str(work / f"merged_{device}"), "--device",
                                    device, "--force", "-q"], out, results, timeout=600)
        if all(results.get(f"merge_{d}", {}).get("ok") for d in (args.device, "cpu")):
            results["merge_vs_cpu_max_abs"] = _max_diff(work / f"merged_{args.device}", work / "merged_cpu")
            for device in (args.device, "cpu"):
                run(f"extract_{device}", [*at, "extract", str(base), str(work / "merged_cpu"), str(work / f"extracted_{device}"),
                                          "--rank", "16", "--device", device, "--force", "-q"], out, results, timeout=600)
    if "train_lora_bf16" in figures and "peft_peer" in figures:
        figures["speedup_vs_peft"] = round(figures["train_lora_bf16"]["tokens_per_s"] / figures["peft_peer"]["tokens_per_s"], 3)
        figures["vram_ratio_vs_peft"] = round(figures["train_lora_bf16"]["peak_vram_bytes"] / figures["peft_peer"]["peak_vram_bytes"], 3)
    results["figures"] = figures
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


def _max_diff(a: Path, b: Path) -> float:
    from safetensors import safe_open

    worst = 0.0
    for file in sorted(a.glob("*.safetensors")):
        with safe_open(file, "pt") as fa, safe_open(b / file.name, "pt") as fb:
            for key in fa.keys():
                worst = max(worst, (fa.get_tensor(key).float() - fb.get_tensor(key).float()).abs().max().item())
    return worst


if __name__ == "__main__":
    main()

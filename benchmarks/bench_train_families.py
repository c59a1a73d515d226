"""train on Gemma 3 and Qwen3-MoE vs a PEFT + transformers loop, and MoE vs a dense model of the same
active size: same model, data, batch, sequence length and precision, same run.

    python benchmarks/bench_train_families.py [--steps 4] [--runs 2] [--dropout 0.05]

Models (random weights of a trained look, float32, written once into .cache/bench by transformers'
save_pretrained, with a word-level tokenizer):

- gemma3: Gemma 3 text at Gemma-3-270M's width (hidden 640, 4 heads over 1 k/v head of 256,
  intermediate 2048, sliding window 512 on 5 of 6 layers), 6 layers, vocabulary 8192;
- qwen3_moe: Qwen3-MoE of hidden 512 (8 heads over 4 of 64), 4 layers of 16 experts of 256, top 4;
- qwen3_dense: the same Qwen3 with one dense MLP of 4 x 256 = 1024, the MoE model's active size.

Each side trains rank-16 LoRA (alpha 32, --dropout, bench_train.py's 0.05 by default) for --steps
steps of 4 x 256 tokens with AdamW 2e-4 and clipping at 1.0 on the CPU: all-linear on Gemma 3; q/k/v/o
on the MoE model on both sides (PEFT 0.21 on transformers 5 cannot target the fused experts' Linears
by name: the same trainable set on both sides); ours only, the MoE and dense Qwen3 with the same
targets, q/k/v/o and all-linear (the experts with LoRA). Each times its own loop (loading excluded)
and counts batch x seq positions per step; GNU time gives peak RSS. The sides take turns, run by run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from bench_distributed import write_word_tokenizer
from bench_io import CACHE
from bench_train import BATCH, PEFT_LOOP, SEQ, write_data
from harness import emit, measure_alternating, remover

WORDS = [f"w{i}" for i in range(8000)]
MODELS = {
    "gemma3": ("Gemma3TextConfig", {"hidden_size": 640, "num_attention_heads": 4, "num_key_value_heads": 1,
                                    "head_dim": 256, "intermediate_size": 2048, "num_hidden_layers": 6,
                                    "sliding_window": 512, "query_pre_attn_scalar": 256}),
    "qwen3_moe": ("Qwen3MoeConfig", {"hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 4,
                                     "head_dim": 64, "num_hidden_layers": 4, "num_experts": 16, "num_experts_per_tok": 4,
                                     "moe_intermediate_size": 256, "intermediate_size": 1024, "decoder_sparse_step": 1,
                                     "norm_topk_prob": True}),
    "qwen3_dense": ("Qwen3Config", {"hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 4,
                                    "head_dim": 64, "num_hidden_layers": 4, "intermediate_size": 1024}),
}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# (side, model, LoRA targets (None: all-linear), with its PEFT peer): the MoE model against its dense
# equivalent with the same targets, attention only (PEFT's set) and all-linear (experts with LoRA)
SIDES = [("gemma3", "gemma3", None, True), ("qwen3_moe", "qwen3_moe", ATTENTION, True),
         ("qwen3_dense", "qwen3_dense", ATTENTION, False), ("qwen3_moe-all", "qwen3_moe", None, False),
         ("qwen3_dense-all", "qwen3_dense", None, False)]

PEER = """
import json, sys, time, torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM
from peft import LoraConfig, get_peft_model
base, data, steps, batch, seq, targets, dropout, result = sys.argv[1:9]
steps, batch, seq = int(steps), int(batch), int(seq)
torch.manual_seed(0)
# the word-level tokenizer.json itself: AutoTokenizer would pick the family's own tokenizer class
tok = Tokenizer.from_file(base + "/tokenizer.json")
ids = []
for line in open(data):
    ids += tok.encode(json.loads(line)["text"], add_special_tokens=False).ids + [tok.token_to_id("</s>")]
blocks = torch.tensor(ids[: steps * batch * seq]).view(steps, batch, seq)
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=float(dropout),
                                         target_modules=json.loads(targets) or "all-linear"))
""" + PEFT_LOOP

OURS = """
import json, subprocess, sys
done = subprocess.run([sys.executable, "-m", "adaptertool", "train", *sys.argv[3:]], capture_output=True, text=True)
if done.returncode:
    sys.exit(done.stderr)
report = json.loads(done.stdout)
seconds = report["tokens"] / report["tokens_per_s"]  # the loop's own time
print(json.dumps({"tokens_per_s": report["steps"] * int(sys.argv[2]) / seconds}), file=open(sys.argv[1], "a"))
"""


def build(name: str) -> Path:
    """The model ``name`` (MODELS), written once."""
    folder = CACHE / f"family-{name}"
    if (folder / "tokenizer.json").is_file():
        return folder
    import torch
    import transformers

    class_name, settings = MODELS[name]
    config = getattr(transformers, class_name)(vocab_size=len(WORDS) + 3, bos_token_id=1, eos_token_id=2,
                                               pad_token_id=0, **settings)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # matrices of a trained look (transformers' init is near zero); norms as initialised
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.05)
    model.save_pretrained(folder)
    write_word_tokenizer(folder, WORDS)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.05)
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    bases = {name: build(name) for name in MODELS}
    with tempfile.TemporaryDirectory(dir=CACHE) as scratch_name:
        scratch = Path(scratch_name)
        data, out = write_data(scratch / "train.jsonl", args.steps, WORDS), scratch / "out"
        sides = []
        for name, model, targets, peer in SIDES:
            base = bases[model]
            ours = [str(base), str(data), str(out), "--rank", "16", "--alpha", "32", "--dropout", str(args.dropout), "--seq-len",
                    str(SEQ), "--batch-size", str(BATCH), "--max-steps", str(args.steps), "--schedule", "constant",
                    "--device", "cpu", "--json", "--force", *[a for t in targets or [] for a in ("--targets", t)]]
            sides.append((f"ours-{name}", f"adaptertool train, {name}", [sys.executable, "-c", OURS,
                          str(scratch / f"ours-{name}.json"), str(BATCH * SEQ), *ours], remover(out)))
            if peer:
                sides.append((f"peft-{name}", f"PEFT + transformers, {name}", [sys.executable, "-c", PEER, str(base),
                              str(data), str(args.steps), str(BATCH), str(SEQ), json.dumps(targets), str(args.dropout),
                              str(scratch / f"peft-{name}.json")], None))
        measured = dict(zip([key for key, *_ in sides],
                            measure_alternating([(label, argv, before) for _, label, argv, before in sides], runs=args.runs)))
        runs = {key: [json.loads(line)["tokens_per_s"] for line in (scratch / f"{key}.json").read_text().splitlines()]
                for key in measured}
    tps = {key: statistics.median(values) for key, values in runs.items()}
    ratio = {name: round(tps[f"ours-{name}"] / tps[f"peft-{name}"], 3) for name in ("gemma3", "qwen3_moe")}
    emit("train-families", list(measured.values()), {
        "steps": args.steps, "tokens_per_step": BATCH * SEQ, "dropout": args.dropout,
        "tokens_per_s": {key: round(v, 1) for key, v in tps.items()},
        "tokens_per_s_runs": {key: [round(v, 1) for v in values] for key, values in runs.items()},
        "speedup_vs_peft": ratio,
        "speedup_vs_peft_by_round": {name: [round(a / b, 2) for a, b in zip(runs[f"ours-{name}"], runs[f"peft-{name}"])]
                                     for name in ("gemma3", "qwen3_moe")},
        "rss_ratio_vs_peft": {name: round(measured[f"ours-{name}"].peak_rss_mb / measured[f"peft-{name}"].peak_rss_mb, 3)
                              for name in ("gemma3", "qwen3_moe")},
        "moe_vs_dense_same_active": {"attention": round(tps["ours-qwen3_dense"] / tps["ours-qwen3_moe"], 3),
                                     "all-linear": round(tps["ours-qwen3_dense-all"] / tps["ours-qwen3_moe-all"], 3)},
    })


if __name__ == "__main__":
    main()

"""extract (randomized SVD) vs an exact full-SVD extraction (mergekit's method), same inputs, same run.

    python benchmarks/bench_extract.py [--model smollm2|synthetic|both] [--rank 16] [--runs 1]

synthetic: one Llama-7B-shaped layer pair, a 4096x4096 (q_proj-like) and a 14336x4096 (up_proj-like)
Linear, bf16, and as TUNED the pair plus a realistic full fine-tune delta (a decaying rank-32 part
plus a full-rank part, ~1 % of the weights' scale: flat spectra, as real fine-tunes have), generated
once into .cache/bench; smollm2: the real SmolLM2-135M-Instruct (210 linear modules) and, as TUNED,
its short real full fine-tune (fixtures/build_real_models.py smollm2-tuned).
The peer is the exact method: read both tensors, torch.linalg.svd(delta) in float32, keep rank r
(what mergekit-extract-lora does per module), streamed one module at a time like ours. Both write
each module's relative Frobenius error; "excess" is ours / exact - 1 (exact is the optimum).
End to end (smollm2 only: it has a model to run): KL(tuned || base + adapter) per token on held-out
text, the adapter merged by adaptertool, with the changed norms kept (the default) and with
--no-norms, beside the base's own KL as the scale.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench_io import CACHE, smollm2
from harness import emit, measure, remover

MAKE_TUNED = """
import json, shutil, sys, torch
from pathlib import Path
from adaptertool.io import CheckpointWriter, TensorSpec, open_checkpoint, staged_output
src, out = sys.argv[1], Path(sys.argv[2])
def fine_tune(name, w):
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    scale, rank = float(w.std()) * 0.01, 32
    low = (torch.randn(w.shape[0], rank, generator=g) * torch.logspace(0, -1, rank)) @ torch.randn(rank, w.shape[1], generator=g)
    return w + scale * (low / rank**0.5 * 2 + torch.randn(w.shape, generator=g))
with open_checkpoint(src) as base, staged_output(out, force=True) as tmp:
    with CheckpointWriter(tmp, base.specs(), max_shard_bytes=None) as writer:
        for spec in writer.order:
            t = base.read(spec.name)
            writer.write(spec.name, fine_tune(spec.name, t.float()).to(t.dtype) if spec.name.endswith("proj.weight") else t)
"""

MAKE_SYNTHETIC_BASE = """
import sys, torch
from pathlib import Path
from adaptertool.io import CheckpointWriter, TensorSpec, staged_output
shapes = {"model.layers.0.self_attn.q_proj.weight": (4096, 4096), "model.layers.0.mlp.up_proj.weight": (14336, 4096)}
with staged_output(Path(sys.argv[1]), force=True) as tmp:
    with CheckpointWriter(tmp, [TensorSpec(n, "BF16", s) for n, s in shapes.items()], max_shard_bytes=None) as writer:
        for spec in writer.order:
            g = torch.Generator().manual_seed(len(spec.name))
            writer.write(spec.name, (torch.randn(spec.shape, generator=g) * 0.02).bfloat16())
"""

OURS = """
import sys
from pathlib import Path
from adaptertool.ops.extract import ExtractConfig, extract
extract(ExtractConfig(base=Path(sys.argv[1]), tuned=Path(sys.argv[2]), out=Path(sys.argv[3]), rank=int(sys.argv[4]),
                      svd=sys.argv[6], report=Path(sys.argv[5]), force=True))
"""

# The peer, written here from its description (full SVD per delta, keep the top r); not mergekit's code.
EXACT_PEER = """
import json, sys, torch
from safetensors import safe_open
from safetensors.torch import save_file
from pathlib import Path
base, tuned, out, rank, report = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
def files(p):
    return sorted(p.glob("*.safetensors"))
where = {}
for f in files(tuned):
    with safe_open(f, "pt") as h:
        where.update({k: f for k in h.keys()})
errors, tensors = {}, {}
for f in files(base):
    with safe_open(f, "pt") as hb:
        for name in hb.keys():
            if not name.endswith("proj.weight"):
                continue
            with safe_open(where[name], "pt") as ht:
                delta = ht.get_tensor(name).float() - hb.get_tensor(name).float()
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            module = "base_model.model." + name.removesuffix(".weight")
            tensors[module + ".lora_B.weight"] = (u[:, :rank] * s[:rank]).contiguous()
            tensors[module + ".lora_A.weight"] = vh[:rank].contiguous()
            errors[name.removesuffix(".weight")] = float((s[rank:].double().square().sum() / s.double().square().sum()) ** 0.5)
out.mkdir(parents=True, exist_ok=True)
save_file(tensors, out / "adapter_model.safetensors")
report.write_text(json.dumps(errors))
"""


# The end-to-end figure, in a child process so that the timed runs never share it with transformers.
QUALITY = """
import json, sys, torch, transformers
from pathlib import Path
from adaptertool.ops.extract import ExtractConfig, extract
from adaptertool.ops.merge import MergeConfig, merge
base, tuned, scratch, rank = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
texts = json.loads(sys.argv[5])
tokenizer = transformers.AutoTokenizer.from_pretrained(base)
def log_probs(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return [model(torch.tensor([tokenizer(t).input_ids])).logits[0].double().log_softmax(-1) for t in texts]
def kl(p, q):  # per text: the mean over its tokens of KL(p || q)
    return [float((a.exp() * (a - b)).sum(-1).mean()) for a, b in zip(p, q)]
want = log_probs(tuned)
per_text = {"base": kl(want, log_probs(base))}
for label, norms in (("norms_kept", True), ("no_norms", False)):
    extract(ExtractConfig(base=base, tuned=tuned, out=scratch / label, rank=rank, norms=norms, force=True))
    merged = scratch / f"{label}-merged"
    merge(MergeConfig(base=base, adapters=((scratch / label, 1.0),), out=merged, dtype=torch.float32, force=True))
    per_text[label] = kl(want, log_probs(merged))
# Means over texts, and on how many texts keeping the norms is closer: one text can dominate a mean.
result = {label: round(sum(v) / len(v), 5) for label, v in per_text.items()}
wins = sum(k < d for k, d in zip(per_text["norms_kept"], per_text["no_norms"], strict=True))
print(json.dumps({**result, "norms_kept_closer_on": f"{wins}/{len(texts)} texts"}))
"""

# Held out: none of it is like the fine-tune's text (fixtures/build_real_models.py TUNE_TEXT).
HELD_OUT = [
    "The river flooded the valley after three days of rain, and the farmers moved their animals to the hills.",
    "To bake bread, mix flour, water, salt and yeast, let the dough rise, then shape it and bake it in a hot oven.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "The committee met on Tuesday and agreed to postpone the vote until the budget figures were checked.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside the leaves of plants.",
    "She tuned the old guitar, played a few chords, and decided that the third string needed replacing.",
    "In 1969 two astronauts walked on the Moon while a third orbited above them in the command module.",
    "Q: What is the capital of Japan?\nA: The capital of Japan is Tokyo.",
    "The train to Edinburgh leaves at half past nine from platform four, and it stops at York and Newcastle.",
    "import numpy as np\nx = np.linspace(0, 1, 11)\nprint(x.mean())",
    "Dear Sam, thank you for the lovely flowers. The garden looks wonderful this spring. Love, Ann",
    "The patient reported a mild headache and was advised to rest and drink plenty of water.",
    "A checkpoint stores the weights of a neural network so that training can resume later.",
    "Low-rank adapters add a small trainable product of two matrices to each frozen weight.",
]


def tuned_for(name: str, base: Path) -> Path:
    path = CACHE / f"extract-tuned-{name}"
    if not path.exists():
        subprocess.run([sys.executable, "-c", MAKE_TUNED, str(base), str(path)], check=True)
    return path


def synthetic_base() -> Path:
    path = CACHE / "extract-base-7b-layers"
    if not path.exists():
        subprocess.run([sys.executable, "-c", MAKE_SYNTHETIC_BASE, str(path)], check=True)
    return path


def bench(name: str, base: Path, tuned: Path, rank: int, runs: int) -> None:
    out, ours_json, exact_json, exact_ours_json = (CACHE / f"extract-{name}-{x}" for x in ("out", "ours.json", "exact.json", "exact-ours.json"))
    ours_cmd = [sys.executable, "-c", OURS, str(base), str(tuned), str(out), str(rank), str(ours_json), "randomized"]
    results = [
        measure(f"adaptertool extract --rank {rank} (randomized)", ours_cmd, runs=runs, before=remover(out)),
        measure(f"exact: torch.linalg.svd per delta, keep {rank}", [sys.executable, "-c", EXACT_PEER, str(base), str(tuned),
                str(out), str(rank), str(exact_json)], runs=runs, before=remover(out)),
        measure(f"adaptertool extract --rank {rank} --svd exact",
                [*ours_cmd[:-2], str(exact_ours_json), "exact"], runs=runs, before=remover(out)),
        measure("floor: import torch", [sys.executable, "-c", "import torch"], runs=runs),
    ]
    remover(out)()
    ours = {m["module"]: m["rel_error"] for m in json.loads(ours_json.read_text())["modules"]}
    exact = json.loads(exact_json.read_text())
    excess = {module: ours[module] / exact[module] - 1 for module in exact}
    fast, slow = results[0], results[1]
    quality = {}
    if name == "smollm2":
        scratch = CACHE / "extract-smollm2-quality"
        done = subprocess.run([sys.executable, "-c", QUALITY, str(base), str(tuned), str(scratch), str(rank),
                               json.dumps(HELD_OUT)], check=True, capture_output=True, text=True)
        quality = {"kl_to_tuned_heldout": json.loads(done.stdout.strip().splitlines()[-1])}
        remover(scratch)()
    emit(f"extract-{name}", results, {**quality,
        "rank": rank, "modules": len(exact), "speedup_vs_exact": round(slow.median_s / fast.median_s, 2),
        "rss_ratio_vs_exact": round(fast.peak_rss_mb / slow.peak_rss_mb, 3),
        "max_excess_error_vs_exact": round(max(excess.values()), 5),
        "mean_rel_error_exact": round(sum(exact.values()) / len(exact), 4),
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "synthetic", "both"], default="both")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    if args.model in ("synthetic", "both"):
        base = synthetic_base()
        bench("llama7b-layers", base, tuned_for("llama7b-layers", base), args.rank, args.runs)
    if args.model in ("smollm2", "both"):
        bench("smollm2", smollm2(), smollm2("smollm2-tuned"), args.rank, args.runs)


if __name__ == "__main__":
    main()

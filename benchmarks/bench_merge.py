"""merge vs PEFT (load + merge_and_unload + save_pretrained), same base and adapter, same run.

    python benchmarks/bench_merge.py [--model smollm2|synthetic|both] [--runs 3]

smollm2: real SmolLM2-135M-Instruct (bf16, 3 shards) with a rank-16 all-linear LoRA made by PEFT
(non-zero B). synthetic: the 1.2B Llama-shaped checkpoint of bench_io.py (bf16, 2.4 GB, 5 shards)
with a rank-16 LoRA on all seven linear projections. Floors: importing torch, and `cp -r` of the base.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench_io import CACHE, run
from harness import emit, measure, remover

PEFT_ROUTE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="auto")
model = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3])
"""

MAKE_PEFT_LORA = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import LoraConfig, get_peft_model
model = get_peft_model(AutoModelForCausalLM.from_pretrained(sys.argv[1]), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
with torch.no_grad():
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.01)
model.save_pretrained(sys.argv[2])
"""

MAKE_SYNTHETIC_LORA = """
import sys
from pathlib import Path
from adaptertool.ops.examples import TINYLLAMA_1B, write_lora_adapter
write_lora_adapter(Path(sys.argv[1]), TINYLLAMA_1B, rank=16, alpha=32.0,
                   targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
"""


def adapter_for(name: str, base: Path) -> Path:
    path = CACHE / f"lora16-{name}"
    if not path.exists():
        script = MAKE_PEFT_LORA if name == "smollm2" else MAKE_SYNTHETIC_LORA
        args = [str(base), str(path)] if name == "smollm2" else [str(path)]
        subprocess.run([sys.executable, "-c", script, *args], check=True)
    return path


def bench(name: str, base: Path, runs: int) -> None:
    adapter = adapter_for(name, base)
    out = CACHE / "merge-out"
    results = [
        measure("adaptertool merge", [sys.executable, "-m", "adaptertool", "merge", "-q", str(base), str(adapter), str(out)],
                runs=runs, before=remover(out)),
        measure("PEFT load + merge_and_unload + save_pretrained", [sys.executable, "-c", PEFT_ROUTE, str(base), str(adapter), str(out)],
                runs=runs, before=remover(out)),
        measure("floor: import torch", [sys.executable, "-c", "import torch"], runs=runs),
        measure("floor: cp -r base", ["cp", "-r", str(base), str(out)], runs=runs, before=remover(out)),
    ]
    remover(out)()
    ours, peft, torch_import, copy = results
    emit(f"merge-{name}", results, {
        "adapter": "rank-16 LoRA, all linear projections",
        "speedup_vs_peft": round(peft.median_s / ours.median_s, 2),
        "rss_ratio_vs_peft": round(ours.peak_rss_mb / peft.peak_rss_mb, 3),
        "ratio_to_floor": round(ours.median_s / (torch_import.median_s + copy.median_s), 2),
    })


if __name__ == "__main__":
    run(__doc__, bench)

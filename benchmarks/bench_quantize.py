"""NF4 quantisation: adaptertool vs bitsandbytes' CPU kernel, a per-weight bitsandbytes script, and transformers.

    python benchmarks/bench_quantize.py [--model synthetic|smollm2|both] [--runs 3] [--threads 1,2]

Two kinds of figures, both NF4, blocksize 64, double quantisation (transformers' QLoRA settings):

- kernel: in this process, the same weight tensors (every one the command quantises) through
  ``bitsandbytes.functional.quantize_4bit(compress_statistics=True)`` and through
  ``adaptertool.quant.quantize_4bit`` + ``quantize_absmax`` (tables built once, as the command
  does). Median of ``--runs`` passes over all tensors, for each torch thread count in ``--threads``.
- whole routes, each a fresh process (peak RSS from GNU time): our quantize pipeline; a script
  that reads each shard with safetensors, calls ``quantize_4bit`` on the same weights and saves
  the state dict entries (what users write by hand today); and transformers' ``load_in_4bit`` +
  ``save_pretrained``.

synthetic: the ~1.2B-parameter Llama-shaped bf16 checkpoint of bench_io.py (.cache/bench);
smollm2: SmolLM2-135M-Instruct from fixtures/build_real_models.py. Files are warm in the page cache.
Load average is recorded before and after: on a shared machine, figures taken under load are not
comparable (torch's two-thread kernels degrade badly when another process holds a core).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from bench_io import CACHE, REPO, smollm2, synthetic
from harness import Measurement, emit, measure, remover

OURS = """
import sys
from pathlib import Path
from adaptertool.ops.quantize import QuantConfig, quantize
quantize(QuantConfig(source=Path(sys.argv[1]), out=Path(sys.argv[2])))
"""

# The hand-written route: every Linear weight of the blocks through bitsandbytes, shard by shard.
SCRIPT = """
import json, shutil, sys, pathlib, torch
import bitsandbytes.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
dst.mkdir()
weights = set(json.loads(pathlib.Path(sys.argv[3]).read_text()))
for shard in sorted(src.glob("*.safetensors")):
    out = {}
    with safe_open(shard, framework="pt") as f:
        for name in f.keys():
            tensor = f.get_tensor(name)
            if name in weights:
                packed, state = F.quantize_4bit(tensor, blocksize=64, quant_type="nf4", compress_statistics=True)
                out[name] = packed
                out.update({f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()})
            else:
                out[name] = tensor
    save_file(out, dst / shard.name, metadata={"format": "pt"})
for side in src.iterdir():
    if not side.name.endswith(".safetensors"):
        shutil.copy(side, dst / side.name)
"""

TRANSFORMERS = """
import sys, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=config, device_map="cpu")
model.save_pretrained(sys.argv[2])
"""


def quantised_weights(source: Path) -> list[str]:
    """The weights our command quantises (the script route quantises the same ones)."""
    from adaptertool.io import DTYPES, open_checkpoint, read_json
    from adaptertool.quant import select_weights

    with open_checkpoint(source) as ckpt:
        tensors = {s.name: (DTYPES[s.dtype][1], s.shape) for s in ckpt.specs()}
    return select_weights(tensors, read_json(source / "config.json")).quantize


def kernel(source: Path, weights: list[str], threads: list[int], runs: int) -> dict[str, object]:
    """Seconds to quantise every weight, bitsandbytes vs ours, per thread count (in this process)."""
    import bitsandbytes.functional as F
    import torch

    from adaptertool.io import open_checkpoint
    from adaptertool.quant import (
        codebook,
        nested_codebook,
        quantize_4bit,
        quantize_absmax,
    )

    with open_checkpoint(source) as ckpt:
        tensors = [ckpt.read(name) for name in weights]
    elements = sum(t.numel() for t in tensors)
    book, nested = codebook("nf4"), nested_codebook()  # built once per run of the command, as here

    def ours(batch: list[torch.Tensor] = tensors) -> None:
        for t in batch:
            quantize_absmax(quantize_4bit(t, book)[1], nested)

    def theirs(batch: list[torch.Tensor] = tensors) -> None:
        for t in batch:
            F.quantize_4bit(t, blocksize=64, quant_type="nf4", compress_statistics=True)

    figures: dict[str, object] = {"elements": elements, "tensors": len(tensors)}
    for count in threads:
        torch.set_num_threads(count)  # a benchmark's own process: setting the global is fine here
        for label, fn in (("bitsandbytes", theirs), ("adaptertool", ours)):
            fn(tensors[:3])  # warm-up
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            figures[f"{label}_{count}t_s"] = round(statistics.median(times), 3)
        figures[f"speedup_{count}t"] = round(figures[f"bitsandbytes_{count}t_s"] / figures[f"adaptertool_{count}t_s"], 2)
    return figures


def bench(name: str, source: Path, runs: int, threads: list[int]) -> None:
    weights = quantised_weights(source)
    load_before = os.getloadavg()[0]
    figures = kernel(source, weights, threads, runs)
    kernel_results = [
        Measurement(f"{label} quantize_4bit, {count} thread(s)", "in-process", figures[f"{label}_{count}t_s"],
                    [figures[f"{label}_{count}t_s"]], 0.0)
        for count in threads for label in ("bitsandbytes", "adaptertool")
    ]
    emit(f"quantize-kernel-{name}", kernel_results, {"kernel": figures, "loadavg_before": load_before,
                                                     "bitsandbytes": version("bitsandbytes")})
    work = Path(tempfile.mkdtemp(dir=CACHE))
    out = work / "out"
    weight_list = work / "weights.json"  # the script route's weights (too many for a readable command line)
    weight_list.write_text(json.dumps(weights))
    py = sys.executable
    results = [
        measure("adaptertool quantize (nf4, double quant)", [py, "-c", OURS, str(source), str(out)],
                runs=runs, before=remover(out)),
        measure("script: safetensors + bitsandbytes quantize_4bit per weight",
                [py, "-c", SCRIPT, str(source), str(out), str(weight_list)], runs=runs, before=remover(out)),
        measure("transformers load_in_4bit + save_pretrained", [py, "-c", TRANSFORMERS, str(source), str(out)],
                runs=runs, before=remover(out)),
    ]
    remover(work)()
    emit(f"quantize-{name}", results, {
        "input": str(source.relative_to(REPO)) if source.is_relative_to(REPO) else str(source),
        "weights": len(weights), "loadavg_before": load_before, "loadavg_after": os.getloadavg()[0],
        "transformers": version("transformers"), "bitsandbytes": version("bitsandbytes"),
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["synthetic", "smollm2", "both"], default="both")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", default="1,2", help="torch thread counts for the kernel figures")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    CACHE.mkdir(parents=True, exist_ok=True)
    if args.model in ("smollm2", "both"):
        bench("smollm2", smollm2(), args.runs, threads)
    if args.model in ("synthetic", "both"):
        bench("synthetic-1.2B", synthetic(), args.runs, threads)


if __name__ == "__main__":
    main()

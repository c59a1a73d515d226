"""MoE: merge of a target_parameters LoRA on every expert vs transformers + PEFT, on a CPU, same run.

    python benchmarks/bench_moe.py [--size full|small|tiny] [--runs 3] [--sides all|peer]
                                   [--generate-only] [--clean]

Inputs are generated once per size into .cache/bench/moe-<size>/ (deterministic: every tensor from
its own seeded generator; the folder appears only when complete):

- ``base/``: Qwen3-30B-A3B's shapes (hidden 2048, 128 experts of moe_intermediate 768, 32 query and
  4 key/value heads of head_dim 128, q/k norms, router) with fewer layers (4 of 48) and a smaller
  vocabulary (16384 of 151936, which would otherwise weigh 1.2 GB of the total), in bf16, stored
  per expert as the release ships (``mlp.experts.N.gate_proj.weight``...), one shard per layer:
  5.1 GB at ``full``. Weights N(0, 0.02), norms 1.
- ``adapter/``: PEFT's target_parameters LoRA, rank 8, alpha 16, on ``mlp.experts.gate_up_proj`` and
  ``mlp.experts.down_proj`` of every layer (``lora_A (128*8, in)``, ``lora_B (out, 128*8)``, every
  factor random and non-zero, float32 as PEFT saves it), in PEFT's key layout (gate_up_proj nested
  in ``base_layer``): 105 MB at ``full``.

Each side a fresh process under GNU time, the sides taking turns run by run, medians and peak RSS:

- ``python -m adaptertool merge BASE ADAPTER OUT`` (output: the base's per-expert keys, bf16);
- the peer: transformers 5 ``from_pretrained`` (fusing the experts in memory), PEFT
  ``PeftModel.from_pretrained`` + ``merge_and_unload``, ``save_pretrained`` (per-expert keys again);
- floors: ``import torch``; ``cp -r`` of the base.

Below ``full``, both outputs are also made once more, untimed, and compared tensor by tensor
("agreement"): PEFT adds bf16(delta) to the bf16 weight, rounding twice, where adaptertool rounds
the float32 sum once (moe-fp8.md 5.2), so a few percent of the merged elements differ (at ``tiny``:
2 %, by at most 4.9e-4, one bf16 step at 0.1). At ``full`` the two outputs and the base would need 15 GB, so the comparison is left to ``small``.

``--size small`` (the same shapes, 1 layer: 1.4 GB) next to ``full`` shows whether a side's peak RSS
is flat in model size; ``tiny`` (hidden 256, 8 experts, 2 layers: 4 MB) checks the script.
``--sides peer`` runs the peer and the floors only.

Disk at full size: inputs 5.2 GB, kept (``--clean`` deletes them after use); while a side runs, its
output adds 5.1 GB. Memory: the peer holds the whole model (5.1 GB) plus, while merging, one fused
parameter's float32 delta (128 x 1536 x 2048: 1.6 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

from harness import READ_TENSORS, emit, measure_alternating, remover

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "bench"
RANK, ALPHA = 8, 16
PARAMS = ("gate_up_proj", "down_proj")  # registration order: PEFT nests gate_up_proj's wrapper inside

QWEN3_30B_A3B = dict(hidden=2048, moe_inter=768, experts=128, heads=32, kv_heads=4, head_dim=128, vocab=16384)
SIZES: dict[str, dict[str, int]] = {
    "full": dict(QWEN3_30B_A3B, layers=4),
    "small": dict(QWEN3_30B_A3B, layers=1),
    "tiny": dict(hidden=256, moe_inter=96, experts=8, heads=4, kv_heads=2, head_dim=64, vocab=1024, layers=2),
}

PEER_MERGE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3])
"""

COMPARE = """
import json, sys, torch
""" + READ_TENSORS + """
ours, peer, base = tensors(sys.argv[1]), tensors(sys.argv[2]), tensors(sys.argv[3])
report = {"same_keys": sorted(ours) == sorted(peer), "tensors": 0, "identical": 0, "changed_by_merge": 0,
          "elements": 0, "elements_differing": 0, "max_abs_diff": 0.0}
for key in sorted(set(ours) & set(peer)):
    a, b, w = (side[key][0].get_tensor(key) for side in (ours, peer, base))
    report["tensors"] += 1
    report["identical"] += int(torch.equal(a, b))
    report["changed_by_merge"] += int(not torch.equal(a, w))
    report["elements"] += a.numel()
    report["elements_differing"] += int((a != b).sum())
    report["max_abs_diff"] = max(report["max_abs_diff"], (a.float() - b.float()).abs().max().item())
print(json.dumps(report))
"""


# --- input generation (run in a child process: this one never imports torch) ---------------------

def inputs(size: str) -> dict[str, Path]:
    """The cached inputs at ``size``, generated on first use (in a child process)."""
    root = CACHE / f"moe-{size}"
    if not (root / "done").is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        staging = root.with_name(f".{root.name}.tmp-{os.getpid()}")
        shutil.rmtree(root, ignore_errors=True)
        try:
            subprocess.run([sys.executable, __file__, "--internal-generate", size, str(staging)], check=True)
            (staging / "done").write_text("complete\n")
            os.rename(staging, root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # a failed generation leaves nothing behind
    return {"base": root / "base", "adapter": root / "adapter"}


def _generate(size: str, out: Path) -> None:
    import torch

    torch.set_num_threads(1)  # reproducible whatever the machine
    dims = SIZES[size]
    base = out / "base"
    base.mkdir(parents=True)
    count = dims["layers"] + 1
    weight_map: dict[str, str] = {}
    for index in range(count):
        shard = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
        shapes = _layer_shapes(dims, index) if index < dims["layers"] else _outer_shapes(dims)
        tensors = {key: _tensor(key, shape) for key, shape in shapes.items()}
        _write_shard(base / shard, tensors)
        weight_map.update(dict.fromkeys(tensors, shard))
        del tensors
    total = sum((base / shard).stat().st_size for shard in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (base / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    _write_config(base, dims)
    _write_adapter(out / "adapter", dims)


def _layer_shapes(dims: dict[str, int], layer: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of one decoder layer, on-disk names and shapes (per-expert layout)."""
    h, i, hd = dims["hidden"], dims["moe_inter"], dims["head_dim"]
    prefix = f"model.layers.{layer}"
    shapes: dict[str, tuple[int, ...]] = {
        f"{prefix}.input_layernorm.weight": (h,),
        f"{prefix}.post_attention_layernorm.weight": (h,),
        f"{prefix}.self_attn.q_proj.weight": (dims["heads"] * hd, h),
        f"{prefix}.self_attn.k_proj.weight": (dims["kv_heads"] * hd, h),
        f"{prefix}.self_attn.v_proj.weight": (dims["kv_heads"] * hd, h),
        f"{prefix}.self_attn.o_proj.weight": (h, dims["heads"] * hd),
        f"{prefix}.self_attn.q_norm.weight": (hd,),
        f"{prefix}.self_attn.k_norm.weight": (hd,),
        f"{prefix}.mlp.gate.weight": (dims["experts"], h),
    }
    for e in range(dims["experts"]):
        shapes.update({f"{prefix}.mlp.experts.{e}.gate_proj.weight": (i, h), f"{prefix}.mlp.experts.{e}.up_proj.weight": (i, h),
                       f"{prefix}.mlp.experts.{e}.down_proj.weight": (h, i)})
    return shapes


def _outer_shapes(dims: dict[str, int]) -> dict[str, tuple[int, ...]]:
    return {"model.embed_tokens.weight": (dims["vocab"], dims["hidden"]), "model.norm.weight": (dims["hidden"],),
            "lm_head.weight": (dims["vocab"], dims["hidden"])}


def _generator(key: str) -> Any:
    import torch

    return torch.Generator().manual_seed(zlib.crc32(key.encode()))


def _tensor(key: str, shape: tuple[int, ...]) -> Any:
    """bf16: norms 1, everything else N(0, 0.02)."""
    import torch

    if key.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=_generator(key)) * 0.02).to(torch.bfloat16)


def _write_shard(path: Path, tensors: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata={"format": "pt"})


def _write_config(folder: Path, dims: dict[str, int]) -> None:
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "qwen3_moe", vocab_size=dims["vocab"], hidden_size=dims["hidden"], intermediate_size=3 * dims["hidden"],
        moe_intermediate_size=dims["moe_inter"], num_hidden_layers=dims["layers"], num_attention_heads=dims["heads"],
        num_key_value_heads=dims["kv_heads"], head_dim=dims["head_dim"], num_experts=dims["experts"],
        num_experts_per_tok=min(8, dims["experts"]), decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=4096,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, dtype="bfloat16")
    config.save_pretrained(folder)


def _write_adapter(folder: Path, dims: dict[str, int]) -> None:
    """PEFT's target_parameters LoRA on both fused parameters of every layer's experts, random non-zero factors."""
    import torch
    from peft import LoraConfig

    h, i, e = dims["hidden"], dims["moe_inter"], dims["experts"]
    features = {"gate_up_proj": (h, 2 * i), "down_proj": (i, h)}  # (in, out) of one expert
    tensors = {}
    for layer in range(dims["layers"]):
        for depth, param in zip((1, 0), PARAMS):
            key = f"base_model.model.model.layers.{layer}.mlp.experts" + ".base_layer" * depth
            in_features, out_features = features[param]
            generator = _generator(f"{key}.lora")
            tensors[f"{key}.lora_A.weight"] = torch.randn(e * RANK, in_features, generator=generator) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, e * RANK, generator=generator) * 0.01
    LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=[],
               target_parameters=[f"mlp.experts.{p}" for p in PARAMS]).save_pretrained(folder)
    _write_shard(folder / "adapter_model.safetensors", tensors)


# --- the benchmark ------------------------------------------------------------------------------

def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix == ".safetensors")


def bench(size: str, paths: dict[str, Path], runs: int, sides: str) -> None:
    py = sys.executable
    base, adapter = str(paths["base"]), str(paths["adapter"])
    out = CACHE / f"moe-{size}-out"  # one output folder for every side: at full size two would not fit beside the base
    commands = []
    if sides == "all":
        commands.append(("adaptertool merge", [py, "-m", "adaptertool", "merge", "-q", base, adapter, str(out)], remover(out)))
    commands += [
        ("peer: transformers load + PEFT merge_and_unload + save_pretrained", [py, "-c", PEER_MERGE, base, adapter, str(out)],
         remover(out)),
        ("floor: import torch", [py, "-c", "import torch"], None),
        ("floor: cp -r base", ["cp", "-r", base, str(out)], remover(out)),
    ]
    results = measure_alternating(commands, runs=runs)
    remover(out)()
    by_label = {r.label: r for r in results}
    peer = next(r for r in results if r.label.startswith("peer"))
    floor = by_label["floor: import torch"].median_s + by_label["floor: cp -r base"].median_s
    extra: dict[str, Any] = {"size": size, "dims": SIZES[size], "base_bytes": _folder_bytes(paths["base"]),
                             "adapter_bytes": _folder_bytes(paths["adapter"]),
                             "adapter": f"target_parameters rank {RANK}, alpha {ALPHA}: gate_up_proj and down_proj of every "
                                        "layer's experts", "floor_s": round(floor, 3)}
    if "adaptertool merge" in by_label:
        ours = by_label["adaptertool merge"]
        extra.update({"speedup_vs_peer": round(peer.median_s / ours.median_s, 2),
                      "rss_ratio_vs_peer": round(ours.peak_rss_mb / peer.peak_rss_mb, 3),
                      "ratio_to_floor": round(ours.median_s / floor, 2),
                      "targets": {"peak_rss_le_1GB": ours.peak_rss_mb <= 1024, "speedup_ge_5x": peer.median_s >= 5 * ours.median_s,
                                  "time_le_2x_floor": ours.median_s <= 2 * floor}})
        if size != "full":
            extra["agreement"] = _agreement(size, paths)
    emit(f"moe-merge-{size}", results, extra)


def _agreement(size: str, paths: dict[str, Path]) -> dict[str, Any]:
    """Both outputs made once more, untimed, compared tensor by tensor (with the base, to count what the merge changed)."""
    py = sys.executable
    ours, peer = CACHE / f"moe-{size}-ours", CACHE / f"moe-{size}-peer"
    base, adapter = str(paths["base"]), str(paths["adapter"])
    try:
        for folder in (ours, peer):
            remover(folder)()
        subprocess.run([py, "-m", "adaptertool", "merge", "-q", base, adapter, str(ours)], check=True, stdout=subprocess.DEVNULL)
        subprocess.run([py, "-c", PEER_MERGE, base, adapter, str(peer)], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        done = subprocess.run([py, "-c", COMPARE, str(ours), str(peer), base], capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        for folder in (ours, peer):
            remover(folder)()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sides", choices=["all", "peer"], default="all",
                        help="peer: only the peer route and the floors")
    parser.add_argument("--generate-only", action="store_true", help="make the cached inputs and stop")
    parser.add_argument("--clean", action="store_true", help="delete this size's cached inputs at the end")
    parser.add_argument("--internal-generate", nargs=2, metavar=("SIZE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.internal_generate:
        size, folder = args.internal_generate
        _generate(size, Path(folder))
        return
    paths = inputs(args.size)
    print(json.dumps({"inputs": {name: str(path) for name, path in paths.items()},
                      "bytes": {name: _folder_bytes(path) for name, path in paths.items()}}), file=sys.stderr)
    if not args.generate_only:
        bench(args.size, paths, args.runs, args.sides)
    if args.clean:
        shutil.rmtree(CACHE / f"moe-{args.size}", ignore_errors=True)


if __name__ == "__main__":
    main()

"""Block FP8: merge --requantize and quantize --format fp8-block vs the peer routes on a CPU, same run.

    python benchmarks/bench_fp8.py [--size full|small|tiny] [--bench merge,quantize] [--runs 3]
                                   [--sides all|peer] [--generate-only] [--clean]

Inputs are generated once per size into .cache/bench (deterministic: every tensor from its own
seeded generator; a folder appears only when complete). They have DeepSeek-V3's tensor shapes with
fewer heads, layers and experts; ``full``: hidden 7168, q_lora_rank 1536, kv_lora_rank 512,
qk_rope 64, qk_nope 128, v_head 128, 16 heads (128 in V3), 4 layers of which the first dense
(intermediate 18432), 24 routed experts of 2048x7168 + 1 shared, vocab 16384: 4.3 GB.
For merge, in fp8-<size>/:

- ``real/``: block FP8 as DeepSeek releases it (128x128 blocks, F32 ``weight_scale_inv`` on a ceil
  grid; embeddings, lm_head, norms and router bf16, ``e_score_correction_bias`` F32): N(0, 0.02)
  weights quantised by DeepSeek's per-block recipe. ``kv_a_proj_with_mqa`` is 576x7168 (grid 5x56,
  the last row block 64 rows), which transformers 5.25 cannot load (moe-fp8.md 1.3).
- ``aligned/``: the same with qk_rope_head_dim 128, so kv_a_proj_with_mqa is 640x7168 and q_b_proj
  4096x1536: every weight a multiple of the block, which transformers loads. The two differ in one
  shard (q_b_proj and kv_a_proj_with_mqa of every layer); the other shards are hard links to
  real/'s, so the variant costs no disk.
- ``adapter-real/``, ``adapter-aligned/``: a rank-16 LoRA (alpha 32, every factor random and
  non-zero) on the five MLA projections of every layer and on every routed expert's gate/up/down_proj,
  in the per-expert (transformers 4) key layout most published MoE adapters have. PEFT 0.21 converts
  it on load to target_parameters on the fused experts. There is no LoRA on the dense MLP or the
  shared expert: PEFT would silently drop it (moe-fp8.md 5.1) and the routes would do different work.

For quantize, in fp8-<size>-bf16/bf16/: a bf16 checkpoint with the same tensor shapes (576-row
kv_a_proj_with_mqa included), fewer of them (full: 2 layers, the first dense, 4 experts; 1.9 GB).

merge, each side a fresh process under GNU time, the sides taking turns run by run, medians:

- ``adaptertool merge BASE ADAPTER OUT --requantize`` on real/ and on aligned/ (output: block FP8,
  same keys, shapes and quantization_config as the base), and without ``--requantize`` on aligned/
  (output: bf16, the bytes the peer writes);
- the peer on aligned/: transformers ``FineGrainedFP8Config(dequantize=True)`` load on the CPU in
  bf16, PEFT ``PeftModel.from_pretrained`` + ``merge_and_unload`` + ``save_pretrained`` (output: bf16,
  twice the bytes: transformers cannot quantise to FP8 without a GPU);
- floors: ``import torch``; ``cp -r`` of aligned/.

The peer also runs once, untimed, on real/, to record that it fails there ("peer_on_real_shapes").

quantize: ``adaptertool quantize BF16 OUT --format fp8-block`` vs the peer a CPU user has:
transformers loads the whole bf16 model, then DeepSeek's per-block algorithm written plainly in
torch (``weight_quant``: s = amax/448 per 128x128 block, q = e4m3fn(clamp(w/s)); plus transformers'
zero guard, s = 1 for an all-zero block, which DeepSeek's kernel lacks)
quantises every Linear weight but embeddings, lm_head and routers, experts unfused back to their
per-expert keys, saved with safetensors and the config's quantization_config; floors as above.
Both outputs are then compared tensor by tensor ("quantize_agreement"; transformers holds
DeepSeek's router in float32, so the peer writes it F32). llm-compressor is not the peer: no release
installs beside the pinned transformers 5.25 and compressed-tensors 0.20.1 (0.14.0.1 wants
transformers<=5.17 and compressed-tensors==0.19.0, older ones numpy<2).

``--sides peer`` runs the peers and floors only. ``--size small`` (same tensor shapes: 2 layers,
4 experts, 1.2 GB; quantize input 1 MoE layer, 0.8 GB) and ``tiny`` (hidden 1024 but still a
576-row kv_a_proj_with_mqa, 13 MB) check the script; ``small`` next to ``full`` shows whether a
side's peak RSS is flat in model size (the peer's is not: 3.5 GB at small size).

Disk at full size: merge inputs 4.6 GB (4.3 FP8 + 2 x 0.14 adapters), quantize input 1.9 GB, kept
(``--clean`` deletes them after use). While a merge runs its output adds 4.3 GB (ours, cp) or 8.2
GB (the peer's bf16); quantize's outputs 1.0 GB each. Memory: the peer holds the whole bf16 model
(8.2 GB) plus a copy of part of it; extrapolated from ``small``, ~15 GB peak.
"""

from __future__ import annotations

import argparse
import json
import math
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
BLOCK = 128
FP8_MAX = 448.0
RANK, ALPHA = 16, 32
ATTENTION = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
EXPERT_LINEARS = ("gate_proj", "up_proj", "down_proj")

# DeepSeek-V3's real sizes (hidden 7168, q_lora_rank 1536, kv_lora_rank 512, rope 64, nope 128,
# v_head 128, experts 2048x7168, dense MLP 18432) with fewer heads (128 there), layers (61) and
# experts (256), and a smaller vocabulary (129280): the bulk stays in FP8 weights.
DEEPSEEK = dict(hidden=7168, heads=16, q_lora=1536, kv_lora=512, rope=64, nope=128, v_head=128,
                moe_inter=2048, inter=18432, vocab=16384)
SIZES: dict[str, dict[str, int]] = {
    "full": dict(DEEPSEEK, layers=4, dense=1, experts=24),
    "small": dict(DEEPSEEK, layers=2, dense=1, experts=4),
    # kv_lora_rank 512 + rope 64 keeps the 576-row kv_a_proj_with_mqa that transformers refuses.
    "tiny": dict(hidden=1024, heads=2, q_lora=256, kv_lora=512, rope=64, nope=128, v_head=128, moe_inter=256,
                 inter=512, vocab=1024, layers=2, dense=1, experts=4),
}
QUANTIZE_INPUT = {"full": dict(layers=2, dense=1, experts=4), "small": dict(layers=1, dense=0, experts=2),
                  "tiny": dict(layers=2, dense=1, experts=2)}
ALIGNED_ROPE = 128  # qk_rope_head_dim of the aligned variant: kv_a 512 + 128 = 640 rows, 5 blocks

PEER_MERGE = """
import sys, torch
from transformers import AutoModelForCausalLM, FineGrainedFP8Config
from peft import PeftModel
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=FineGrainedFP8Config(dequantize=True),
                                             dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3])
"""

# DeepSeek's weight_quant (inference/kernel.py) written plainly in torch, on a model loaded whole
# by transformers, written back in the release's layout (per-expert keys, weight_scale_inv).
PEER_QUANTIZE = """
import json, math, re, shutil, sys, torch
from pathlib import Path
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
B, MAX = 128, 448.0
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)

def on_disk(state):  # transformers 5 fuses experts in memory: back to one Linear per expert
    for key, t in state.items():
        fused = re.match(r"(.*\\.mlp\\.experts)\\.(gate_up_proj|down_proj)$", key)
        if fused is None:
            yield key, t
            continue
        prefix, name = fused.groups()
        for e in range(t.shape[0]):
            if name == "gate_up_proj":
                half = t.shape[1] // 2
                yield f"{prefix}.{e}.gate_proj.weight", t[e, :half]
                yield f"{prefix}.{e}.up_proj.weight", t[e, half:]
            else:
                yield f"{prefix}.{e}.down_proj.weight", t[e]

def weight_quant(w):  # per 128x128 block, edge blocks zero-padded: s = amax / 448 (1 if 0), q = w / s
    n, k = w.shape
    gn, gk = math.ceil(n / B), math.ceil(k / B)
    padded = torch.zeros(gn * B, gk * B)
    padded[:n, :k] = w
    blocks = padded.view(gn, B, gk, B)
    amax = blocks.abs().amax(dim=(1, 3))
    s = torch.where(amax > 0, amax / MAX, torch.ones_like(amax))
    q = (blocks / s[:, None, :, None]).clamp(-MAX, MAX).to(torch.float8_e4m3fn)
    return q.view(gn * B, gk * B)[:n, :k].contiguous(), s

skip = re.compile(r"^(model\\.embed_tokens|lm_head)\\.|\\.mlp\\.gate\\.weight$")
dst.mkdir()
shard, shards, size = {}, [], 0
def flush():
    global shard, size
    if shard:
        shards.append(list(shard))  # the names only: the written tensors are freed
        save_file(shard, dst / f"part-{len(shards)}.safetensors", metadata={"format": "pt"})
    shard, size = {}, 0
for key, t in on_disk(model.state_dict()):
    if key.endswith(".weight") and t.dim() == 2 and not skip.search(key):
        q, s = weight_quant(t.float())
        shard[key], shard[key + "_scale_inv"] = q, s
        size += q.numel() + 4 * s.numel()
    else:
        shard[key] = t.contiguous()
        size += t.numel() * t.element_size()
    if size > 2e9:
        flush()
flush()
names = {}
for i, part in enumerate(shards, 1):
    name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
    (dst / f"part-{i}.safetensors").rename(dst / name)
    names.update(dict.fromkeys(part, name))
(dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": names}, indent=2))
config = json.loads((src / "config.json").read_text())
config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                 "weight_block_size": [B, B]}
(dst / "config.json").write_text(json.dumps(config, indent=2))
for extra in ("generation_config.json",):
    if (src / extra).is_file():
        shutil.copy(src / extra, dst / extra)
"""

COMPARE_QUANTIZED = """
import json, sys, torch
""" + READ_TENSORS + """
ours, peer = tensors(sys.argv[1]), tensors(sys.argv[2])
report = {"same_keys": sorted(ours) == sorted(peer), "tensors": 0, "identical": 0, "code_mismatches": 0,
          "scale_max_rel_diff": 0.0, "differing": {}}
def raw(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
for key in sorted(set(ours) & set(peer)):
    a, b = ours[key][0].get_tensor(key), peer[key][0].get_tensor(key)
    report["tensors"] += 1
    if a.dtype == b.dtype and a.shape == b.shape and torch.equal(raw(a), raw(b)):
        report["identical"] += 1
    elif a.dtype == b.dtype == torch.float8_e4m3fn and a.shape == b.shape:
        report["code_mismatches"] += int((raw(a) != raw(b)).sum())
        report["differing"][key] = "FP8 codes differ"
    elif key.endswith("_scale_inv") and a.shape == b.shape:
        rel = ((a.double() - b.double()).abs() / b.double().abs()).max().item()
        report["scale_max_rel_diff"] = max(report["scale_max_rel_diff"], rel)
        report["differing"][key] = f"scales differ by up to {rel:.3g} (relative)"
    elif a.shape == b.shape and torch.equal(a.double(), b.double()):
        report["differing"][key] = f"same values, dtype {a.dtype} (ours) vs {b.dtype} (peer)"
    else:
        report["differing"][key] = f"{a.dtype} {tuple(a.shape)} (ours) vs {b.dtype} {tuple(b.shape)} (peer), values differ"
report["differing"] = dict(list(report["differing"].items())[:20])
print(json.dumps(report))
"""


# --- input generation (run in a child process: this one never imports torch) ---------------------

FOLDERS = {"merge": ("real", "aligned", "adapter-real", "adapter-aligned"), "quantize": ("bf16",)}


def _cache_root(bench: str, size: str) -> Path:
    return CACHE / (f"fp8-{size}" if bench == "merge" else f"fp8-{size}-bf16")


def inputs(bench: str, size: str) -> dict[str, Path]:
    """The cached inputs of one benchmark at ``size``, generated on first use (in a child process)."""
    root = _cache_root(bench, size)
    if not (root / "done").is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        staging = root.with_name(f".{root.name}.tmp-{os.getpid()}")
        shutil.rmtree(root, ignore_errors=True)
        try:
            subprocess.run([sys.executable, __file__, "--internal-generate", bench, size, str(staging)], check=True)
            (staging / "done").write_text("complete\n")
            os.rename(staging, root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # a failed generation leaves nothing behind
    return {name: root / name for name in FOLDERS[bench]}


def _generate(bench: str, size: str, out: Path) -> None:
    import torch

    torch.set_num_threads(1)  # reproducible whatever the machine
    out.mkdir(parents=True)
    if bench == "merge":
        _generate_fp8(SIZES[size], out)
    else:
        dims = dict(SIZES[size], **QUANTIZE_INPUT[size])
        layout = _bf16_shards(dims)
        for shard, keys in layout.items():
            _write_shard(out / "bf16" / shard, _bf16_tensors(keys, dims))
        _write_config(out / "bf16", dims, dims["rope"], fp8=False)
        _write_index(out / "bf16", layout)


def _generate_fp8(dims: dict[str, int], out: Path) -> None:
    real, aligned = out / "real", out / "aligned"
    layout = _fp8_shards(dims)
    rope_shard = next(iter(layout))
    for shard, keys in layout.items():
        if shard != rope_shard:
            _write_shard(real / shard, _fp8_tensors(keys, dims, dims["rope"]))
    for folder, rope in ((real, dims["rope"]), (aligned, ALIGNED_ROPE)):
        _write_shard(folder / rope_shard, _fp8_tensors(layout[rope_shard], dims, rope))
        _write_config(folder, dims, rope, fp8=True)
    for shard in layout:  # the variant shares every shard but the rope one: hard links, no disk
        if shard != rope_shard:
            os.link(real / shard, aligned / shard)
    for folder in (real, aligned):
        _write_index(folder, layout)
    _write_adapter(out / "adapter-real", dims, dims["rope"])
    _write_adapter(out / "adapter-aligned", dims, ALIGNED_ROPE)


def _linear_shapes(dims: dict[str, int], rope: int, layer: int) -> dict[str, tuple[int, int]]:
    """Every Linear weight of one decoder layer (on-disk names under model.layers.L.), (out, in)."""
    h, heads = dims["hidden"], dims["heads"]
    shapes = {
        "self_attn.q_a_proj.weight": (dims["q_lora"], h),
        "self_attn.q_b_proj.weight": (heads * (dims["nope"] + rope), dims["q_lora"]),
        "self_attn.kv_a_proj_with_mqa.weight": (dims["kv_lora"] + rope, h),
        "self_attn.kv_b_proj.weight": (heads * (dims["nope"] + dims["v_head"]), dims["kv_lora"]),
        "self_attn.o_proj.weight": (h, heads * dims["v_head"]),
    }
    if layer < dims["dense"]:
        shapes.update({"mlp.gate_proj.weight": (dims["inter"], h), "mlp.up_proj.weight": (dims["inter"], h),
                       "mlp.down_proj.weight": (h, dims["inter"])})
        return shapes
    moe = {"gate_proj.weight": (dims["moe_inter"], h), "up_proj.weight": (dims["moe_inter"], h),
           "down_proj.weight": (h, dims["moe_inter"])}
    for e in range(dims["experts"]):
        shapes.update({f"mlp.experts.{e}.{name}": shape for name, shape in moe.items()})
    shapes.update({f"mlp.shared_experts.{name}": shape for name, shape in moe.items()})
    return shapes


def _other_shapes(dims: dict[str, int], layer: int) -> dict[str, tuple[int, ...]]:
    """The layer's tensors that stay 16/32-bit: norms, and for MoE layers the router and its bias."""
    shapes: dict[str, tuple[int, ...]] = {
        "input_layernorm.weight": (dims["hidden"],), "post_attention_layernorm.weight": (dims["hidden"],),
        "self_attn.q_a_layernorm.weight": (dims["q_lora"],), "self_attn.kv_a_layernorm.weight": (dims["kv_lora"],),
    }
    if layer >= dims["dense"]:
        shapes.update({"mlp.gate.weight": (dims["experts"], dims["hidden"]),
                       "mlp.gate.e_score_correction_bias": (dims["experts"],)})
    return shapes


def _rope_dependent(name: str) -> bool:
    return name.endswith(("self_attn.q_b_proj.weight", "self_attn.kv_a_proj_with_mqa.weight"))


def _fp8_shards(dims: dict[str, int]) -> dict[str, list[str]]:
    """Shard -> keys: the rope-dependent attention weights of every layer (and their scales) in
    shard 1, embeddings / head / final norm in shard 2, then one shard per layer."""
    count = 2 + dims["layers"]
    names = [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    layout: dict[str, list[str]] = {name: [] for name in names}
    layout[names[1]] = ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    for layer in range(dims["layers"]):
        prefix = f"model.layers.{layer}."
        for name in _linear_shapes(dims, dims["rope"], layer):
            target = names[0] if _rope_dependent(name) else names[2 + layer]
            layout[target] += [prefix + name, prefix + name + "_scale_inv"]
        layout[names[2 + layer]] += [prefix + name for name in _other_shapes(dims, layer)]
    return layout


def _bf16_shards(dims: dict[str, int]) -> dict[str, list[str]]:
    count = 1 + dims["layers"]
    names = [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    layout = {names[0]: ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]}
    for layer in range(dims["layers"]):
        prefix = f"model.layers.{layer}."
        layout[names[1 + layer]] = [prefix + name for name in (*_linear_shapes(dims, dims["rope"], layer),
                                                               *_other_shapes(dims, layer))]
    return layout


def _generator(key: str, rope: int) -> Any:
    import torch

    salt = f"{key}|{rope}" if _rope_dependent(key.removesuffix("_scale_inv")) else key
    return torch.Generator().manual_seed(zlib.crc32(salt.encode()))


def _layer_shape(key: str, dims: dict[str, int], rope: int) -> tuple[int, ...]:
    layer, name = key.removeprefix("model.layers.").split(".", 1)
    shapes = {**_linear_shapes(dims, rope, int(layer)), **_other_shapes(dims, int(layer))}
    return shapes[name]


def _plain_tensor(key: str, dims: dict[str, int]) -> Any:
    """A tensor that is never FP8: embeddings and head N(0, 0.02), norms 1, router N(0, 0.02), router bias 0 (F32)."""
    import torch

    if key in ("lm_head.weight", "model.embed_tokens.weight"):
        shape: tuple[int, ...] = (dims["vocab"], dims["hidden"])
    elif key == "model.norm.weight":
        shape = (dims["hidden"],)
    else:
        shape = _layer_shape(key, dims, dims["rope"])
    if key.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    if key.endswith("e_score_correction_bias"):
        return torch.zeros(shape, dtype=torch.float32)
    return (torch.randn(shape, generator=_generator(key, 0)) * 0.02).to(torch.bfloat16)


def _linear_name(key: str, dims: dict[str, int], rope: int) -> bool:
    """Whether ``key`` is one of a decoder layer's Linear weights (the ones stored in FP8)."""
    if not key.startswith("model.layers."):
        return False
    layer, name = key.removeprefix("model.layers.").split(".", 1)
    return name in _linear_shapes(dims, rope, int(layer))


def _fp8_tensors(keys: list[str], dims: dict[str, int], rope: int) -> dict[str, Any]:
    """A shard's tensors: each Linear weight as FP8 codes with its weight_scale_inv, the rest as is."""
    tensors = {}
    for key in keys:
        if key.endswith("_scale_inv"):
            continue  # made with its weight
        if _linear_name(key, dims, rope):
            tensors[key], tensors[key + "_scale_inv"] = _random_fp8(_layer_shape(key, dims, rope), _generator(key, rope))
        else:
            tensors[key] = _plain_tensor(key, dims)
    assert set(tensors) == set(keys)
    return tensors


def _random_fp8(shape: tuple[int, ...], generator: Any) -> tuple[Any, Any]:
    """N(0, 0.02) weights quantised per 128x128 block (DeepSeek's recipe), 1024 rows at a time."""
    import torch

    rows, cols = shape
    grid = (math.ceil(rows / BLOCK), math.ceil(cols / BLOCK))
    q = torch.empty(shape, dtype=torch.float8_e4m3fn)
    scales = torch.empty(grid, dtype=torch.float32)
    step = 8 * BLOCK
    for r0 in range(0, rows, step):
        w = torch.randn(min(step, rows - r0), cols, generator=generator) * 0.02
        n = w.shape[0]
        gn = math.ceil(n / BLOCK)
        padded = torch.zeros(gn * BLOCK, grid[1] * BLOCK)
        padded[:n, :cols] = w
        blocks = padded.view(gn, BLOCK, grid[1], BLOCK)
        amax = blocks.abs().amax(dim=(1, 3))
        s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        codes = (blocks / s[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        q[r0:r0 + n] = codes.view(gn * BLOCK, grid[1] * BLOCK)[:n, :cols]
        scales[r0 // BLOCK:r0 // BLOCK + gn] = s
    return q, scales


def _bf16_tensors(keys: list[str], dims: dict[str, int]) -> dict[str, Any]:
    import torch

    tensors = {}
    for key in keys:
        if _linear_name(key, dims, dims["rope"]):
            weight = torch.randn(_layer_shape(key, dims, dims["rope"]), generator=_generator(key, 0)) * 0.02
            tensors[key] = weight.to(torch.bfloat16)
        else:
            tensors[key] = _plain_tensor(key, dims)
    return tensors


def _write_shard(path: Path, tensors: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata={"format": "pt"})


def _write_index(folder: Path, layout: dict[str, list[str]]) -> None:
    total = sum((folder / shard).stat().st_size for shard in layout)  # includes headers: close enough
    weight_map = {key: shard for shard, keys in layout.items() for key in keys}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_config(folder: Path, dims: dict[str, int], rope: int, *, fp8: bool) -> None:
    from transformers import AutoConfig

    experts_per_token = min(8, dims["experts"])
    config = AutoConfig.for_model(
        "deepseek_v3", vocab_size=dims["vocab"], hidden_size=dims["hidden"], intermediate_size=dims["inter"],
        moe_intermediate_size=dims["moe_inter"], num_hidden_layers=dims["layers"], num_attention_heads=dims["heads"],
        num_key_value_heads=dims["heads"], n_shared_experts=1, n_routed_experts=dims["experts"],
        num_experts_per_tok=experts_per_token, first_k_dense_replace=dims["dense"], n_group=1, topk_group=1,
        q_lora_rank=dims["q_lora"], kv_lora_rank=dims["kv_lora"], qk_rope_head_dim=rope,
        qk_nope_head_dim=dims["nope"], v_head_dim=dims["v_head"], max_position_embeddings=4096,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, dtype="bfloat16")
    config.save_pretrained(folder)
    if fp8:
        path = folder / "config.json"
        data = json.loads(path.read_text())
        data["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                       "weight_block_size": [BLOCK, BLOCK]}
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_adapter(folder: Path, dims: dict[str, int], rope: int) -> None:
    """Rank-16 LoRA on the MLA projections of every layer and on every routed expert, per-expert keys."""
    import torch
    from peft import LoraConfig

    tensors = {}
    for layer in range(dims["layers"]):
        for name, (out_features, in_features) in _linear_shapes(dims, rope, layer).items():
            if not (name.startswith("self_attn.") or name.startswith("mlp.experts.")):
                continue  # the dense MLP and the shared expert: PEFT 0.21 would drop their LoRA
            module = f"model.layers.{layer}.{name.removesuffix('.weight')}"
            generator = _generator(module + ".lora", rope if _rope_dependent(name) else 0)
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(RANK, in_features, generator=generator) * 0.01
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_features, RANK, generator=generator) * 0.01
    LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=sorted({*ATTENTION, *EXPERT_LINEARS})).save_pretrained(folder)
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config["target_modules"] = sorted(config["target_modules"])  # PEFT writes its set in hash order
    path.write_text(json.dumps(config, indent=2, sort_keys=True))
    _write_shard(folder / "adapter_model.safetensors", tensors)


# --- the benchmarks -----------------------------------------------------------------------------

def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix == ".safetensors")


def bench_merge(size: str, paths: dict[str, Path], runs: int, sides: str) -> None:
    py = sys.executable
    out = CACHE / f"fp8-{size}-merge-out"
    ours = [py, "-m", "adaptertool", "merge", "-q"]
    commands = []
    if sides == "all":
        commands += [
            ("adaptertool merge --requantize, real shapes (kv_a_proj 576x7168)",
             [*ours, str(paths["real"]), str(paths["adapter-real"]), str(out), "--requantize"], remover(out)),
            ("adaptertool merge --requantize, aligned variant",
             [*ours, str(paths["aligned"]), str(paths["adapter-aligned"]), str(out), "--requantize"], remover(out)),
            ("adaptertool merge (bf16 output, as the peer writes), aligned variant",
             [*ours, str(paths["aligned"]), str(paths["adapter-aligned"]), str(out)], remover(out)),
        ]
    commands += [
        ("peer: transformers FP8 dequantizing load + PEFT merge_and_unload + save_pretrained, aligned variant",
         [py, "-c", PEER_MERGE, str(paths["aligned"]), str(paths["adapter-aligned"]), str(out)], remover(out)),
        ("floor: import torch", [py, "-c", "import torch"], None),
        ("floor: cp -r base (aligned)", ["cp", "-r", str(paths["aligned"]), str(out)], remover(out)),
    ]
    refusal = _peer_on_real_shapes(paths, out)
    results = measure_alternating(commands, runs=runs)
    remover(out)()
    by_label = {r.label: r for r in results}
    peer = next(r for r in results if r.label.startswith("peer"))
    floor = by_label["floor: import torch"].median_s + by_label["floor: cp -r base (aligned)"].median_s
    extra: dict[str, Any] = {"size": size, "base_bytes": _folder_bytes(paths["aligned"]),
                             "adapter": f"rank {RANK}, alpha {ALPHA}: MLA projections + every routed expert",
                             "peer_on_real_shapes": refusal, "floor_s": round(floor, 3)}
    for key, label in (("aligned", "adaptertool merge --requantize, aligned variant"),
                       ("real", "adaptertool merge --requantize, real shapes (kv_a_proj 576x7168)"),
                       ("bf16_output", "adaptertool merge (bf16 output, as the peer writes), aligned variant")):
        if label in by_label:
            r = by_label[label]
            extra[f"{key}_speedup_vs_peer"] = round(peer.median_s / r.median_s, 2)
            extra[f"{key}_rss_ratio_vs_peer"] = round(r.peak_rss_mb / peer.peak_rss_mb, 3)
            extra[f"{key}_ratio_to_floor"] = round(r.median_s / floor, 2)
            extra[f"{key}_targets"] = {"peak_rss_le_1GB": r.peak_rss_mb <= 1024, "time_le_2x_floor": r.median_s <= 2 * floor,
                                       "rss_5x_below_peer": r.peak_rss_mb * 5 <= peer.peak_rss_mb}
    emit(f"fp8-merge-{size}", results, extra)


def _peer_on_real_shapes(paths: dict[str, Path], out: Path) -> str:
    """The peer once on the real shapes, untimed: transformers 5.25 cannot dequantise 576x7168 on a 5x56 grid."""
    remover(out)()
    done = subprocess.run([sys.executable, "-c", PEER_MERGE, str(paths["real"]), str(paths["adapter-real"]), str(out)],
                          capture_output=True, text=True, check=False)
    remover(out)()
    if done.returncode == 0:
        return "succeeded"
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    cause = next((line for line in lines if "not divisible by scale grid" in line), "")
    return f"failed (exit {done.returncode}): {lines[-1] if lines else ''} {cause}".strip()


def bench_quantize(size: str, paths: dict[str, Path], runs: int, sides: str) -> None:
    py = sys.executable
    out_ours, out_peer = CACHE / f"fp8-{size}-quantize-ours", CACHE / f"fp8-{size}-quantize-peer"
    out_copy = CACHE / f"fp8-{size}-quantize-cp"
    commands = []
    if sides == "all":
        commands.append(("adaptertool quantize --format fp8-block",
                         [py, "-m", "adaptertool", "quantize", "-q", str(paths["bf16"]), str(out_ours),
                          "--format", "fp8-block"], remover(out_ours)))
    commands += [
        ("peer: transformers load + DeepSeek per-block weight_quant in torch + safetensors save",
         [py, "-c", PEER_QUANTIZE, str(paths["bf16"]), str(out_peer)], remover(out_peer)),
        ("floor: import torch", [py, "-c", "import torch"], None),
        ("floor: cp -r base (bf16)", ["cp", "-r", str(paths["bf16"]), str(out_copy)], remover(out_copy)),
    ]
    results = measure_alternating(commands, runs=runs)
    by_label = {r.label: r for r in results}
    peer = next(r for r in results if r.label.startswith("peer"))
    floor = by_label["floor: import torch"].median_s + by_label["floor: cp -r base (bf16)"].median_s
    extra: dict[str, Any] = {"size": size, "base_bytes": _folder_bytes(paths["bf16"]), "floor_s": round(floor, 3),
                             "peer_output_bytes": _folder_bytes(out_peer)}
    if sides == "all":
        ours = by_label["adaptertool quantize --format fp8-block"]
        extra.update({"ours_output_bytes": _folder_bytes(out_ours), "speedup_vs_peer": round(peer.median_s / ours.median_s, 2),
                      "rss_ratio_vs_peer": round(ours.peak_rss_mb / peer.peak_rss_mb, 3),
                      "ratio_to_floor": round(ours.median_s / floor, 2)})
        compared = subprocess.run([py, "-c", COMPARE_QUANTIZED, str(out_ours), str(out_peer)],
                                  capture_output=True, text=True, check=True)
        extra["quantize_agreement"] = json.loads(compared.stdout.strip().splitlines()[-1])
    for folder in (out_ours, out_peer, out_copy):
        remover(folder)()
    emit(f"fp8-quantize-{size}", results, extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--bench", default="merge,quantize", help="comma-separated: merge, quantize")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sides", choices=["all", "peer"], default="all",
                        help="peer: only the peer routes and the floors (before the adaptertool commands exist)")
    parser.add_argument("--generate-only", action="store_true", help="make the cached inputs and stop")
    parser.add_argument("--clean", action="store_true", help="delete this size's cached inputs at the end")
    parser.add_argument("--internal-generate", nargs=3, metavar=("BENCH", "SIZE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.internal_generate:
        bench, size, folder = args.internal_generate
        _generate(bench, size, Path(folder))
        return
    benches = [b.strip() for b in args.bench.split(",") if b.strip()]
    unknown = set(benches) - set(FOLDERS)
    if unknown:
        parser.error(f"unknown --bench {', '.join(sorted(unknown))}")
    # quantize first: its outputs are small, while the merge peer's bf16 output is twice the base.
    for bench in sorted(benches, key=["quantize", "merge"].index):
        paths = inputs(bench, args.size)
        print(json.dumps({"inputs": {name: str(path) for name, path in paths.items()},
                          "bytes": {name: _folder_bytes(path) for name, path in paths.items()}}), file=sys.stderr)
        if not args.generate_only:
            (bench_quantize if bench == "quantize" else bench_merge)(args.size, paths, args.runs, args.sides)
        if args.clean:
            shutil.rmtree(_cache_root(bench, args.size), ignore_errors=True)


if __name__ == "__main__":
    main()

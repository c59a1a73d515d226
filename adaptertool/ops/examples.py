"""Deterministic Llama-shaped checkpoints and LoRA adapters, for the demo, the tests and the benchmarks.

Values come from a generator seeded per tensor (seed + position in the tensor list), so a model is
identical whatever order or sharding it is written in, on every machine. Weights are N(0, 0.02),
norms are 1 (as a freshly initialised Llama). The config.json written beside them loads in
transformers as a ``LlamaForCausalLM``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from adaptertool.io import (
    CheckpointWriter,
    TensorSpec,
    dtype_code,
    staged_output,
    write_adapter,
)

__all__ = ["TINY", "TINYLLAMA_1B", "LlamaShape", "write_llama", "write_lora_adapter"]


@dataclass(frozen=True, kw_only=True)
class LlamaShape:
    """The sizes that fix a Llama checkpoint's tensor shapes."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    def specs(self, dtype: torch.dtype) -> list[TensorSpec]:
        """Tensor specs in transformers' module order."""
        code = dtype_code(dtype)
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for i in range(self.layers):
            p = f"model.layers.{i}"
            shapes += [
                (f"{p}.self_attn.q_proj.weight", (self.hidden, self.hidden)),
                (f"{p}.self_attn.k_proj.weight", (kv, self.hidden)),
                (f"{p}.self_attn.v_proj.weight", (kv, self.hidden)),
                (f"{p}.self_attn.o_proj.weight", (self.hidden, self.hidden)),
                (f"{p}.mlp.gate_proj.weight", (self.intermediate, self.hidden)),
                (f"{p}.mlp.up_proj.weight", (self.intermediate, self.hidden)),
                (f"{p}.mlp.down_proj.weight", (self.hidden, self.intermediate)),
                (f"{p}.input_layernorm.weight", (self.hidden,)),
                (f"{p}.post_attention_layernorm.weight", (self.hidden,)),
            ]
        shapes.append(("model.norm.weight", (self.hidden,)))
        if not self.tied:
            shapes.append(("lm_head.weight", (self.vocab, self.hidden)))
        return [TensorSpec(name, code, shape) for name, shape in shapes]

    def config(self, dtype: torch.dtype) -> dict[str, object]:
        """A transformers LlamaConfig dict for these sizes."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "tie_word_embeddings": self.tied,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "torch_dtype": str(dtype).removeprefix("torch."),
        }


TINY = LlamaShape(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, vocab=128)
# TinyLlama-1.1B's shape with 24 layers: ~1.2B parameters, ~2.5 GB in bf16.
TINYLLAMA_1B = LlamaShape(hidden=2048, intermediate=5632, layers=24, heads=32, kv_heads=4, vocab=32000)


def write_llama(out: Path, shape: LlamaShape = TINY, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                max_shard_bytes: int | None = None, force: bool = False) -> list[Path]:
    """Write a deterministic Llama checkpoint with config.json to folder ``out``; returns its shard files."""
    specs = shape.specs(dtype)
    position = {spec.name: i for i, spec in enumerate(specs)}
    with staged_output(out, force=force) as tmp:
        with CheckpointWriter(tmp, specs, max_shard_bytes=max_shard_bytes) as writer:
            for spec in writer.order:
                writer.write(spec.name, _values(spec, seed + position[spec.name], dtype))
        (tmp / "config.json").write_text(json.dumps(shape.config(dtype), indent=2) + "\n", encoding="utf-8")
        names = [f.name for f in writer.files]
    return [out / name for name in names]


def _values(spec: TensorSpec, seed: int, dtype: torch.dtype) -> torch.Tensor:
    if spec.name.endswith("norm.weight"):
        return torch.ones(spec.shape, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(spec.shape, generator=generator) * 0.02).to(dtype)


def write_lora_adapter(out: Path, shape: LlamaShape = TINY, *, rank: int = 4, alpha: float = 8.0,
                       targets: tuple[str, ...] = ("q_proj", "v_proj"), seed: int = 1,
                       base_model: str | None = None, force: bool = False) -> Path:
    """Write a PEFT LoRA adapter for a ``shape`` model with random, non-zero A and B (a trained look)."""
    specs = [spec for spec in shape.specs(torch.float32) if spec.name.endswith(tuple(f"{t}.weight" for t in targets))]
    tensors: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(seed)
    for spec in specs:
        module = "base_model.model." + spec.name.removesuffix(".weight")
        out_features, in_features = spec.shape
        tensors[f"{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) / in_features**0.5
        tensors[f"{module}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "inference_mode": True, "base_model_name_or_path": base_model,
    }
    with staged_output(out, force=force) as tmp:
        write_adapter(tmp, config, [TensorSpec(name, "F32", tuple(t.shape)) for name, t in tensors.items()],
                      tensors.__getitem__)
    return out

"""demo: the main job end to end on a built-in example, in a few seconds and a few MB.

Makes a tiny Llama checkpoint (sharded) and a LoRA adapter for it, merges them, then checks the
merged weights against a float64 reference ``W + alpha/r * B @ A`` and that untouched tensors
were copied bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from adaptertool.errors import AdapterToolError
from adaptertool.io import open_adapter, open_checkpoint, staged_output
from adaptertool.ops.examples import TINY, write_llama, write_lora_adapter
from adaptertool.ops.merge import MergeConfig, merge

__all__ = ["DemoConfig", "DemoReport", "demo"]


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    out: Path
    force: bool = False


@dataclass(frozen=True, kw_only=True)
class DemoReport:
    out: str
    steps: list[str] = field(default_factory=list)
    max_abs_error: float = 0.0


def demo(cfg: DemoConfig) -> DemoReport:
    """Run the demo into folder ``cfg.out`` (base/, adapter/, merged/)."""
    steps = []
    with staged_output(cfg.out, force=cfg.force) as tmp:
        base, adapter, merged = tmp / "base", tmp / "adapter", tmp / "merged"
        files = write_llama(base, TINY, dtype=torch.float32, max_shard_bytes=100_000)
        steps.append(f"made a tiny Llama checkpoint in {len(files)} shards: {base.name}/")
        write_lora_adapter(adapter, TINY, rank=4, alpha=8.0)
        steps.append(f"made a rank-4 LoRA adapter (q_proj, v_proj): {adapter.name}/")
        report = merge(MergeConfig(base=base, adapters=((adapter, 1.0),), out=merged))
        steps.append(f"merged it: {report.merged} weights changed, {report.copied} copied byte for byte: {merged.name}/")
        error = _check(base, adapter, merged)
        steps.append(f"checked against a float64 reference: max abs error {error:.2e}")
    steps.append(f"all in {cfg.out}/")
    return DemoReport(out=str(cfg.out), steps=steps, max_abs_error=error)


def _check(base: Path, adapter: Path, merged: Path) -> float:
    config, lora, _ = open_adapter(adapter)
    scaling = config["lora_alpha"] / config["r"]
    worst = 0.0
    with lora, open_checkpoint(base) as before, open_checkpoint(merged) as after:
        for name in before:
            module = "base_model.model." + name.removesuffix(".weight")
            w, w_merged = before.read(name), after.read(name)
            if f"{module}.lora_A.weight" not in lora:
                if not torch.equal(w.view(torch.uint8), w_merged.view(torch.uint8)):
                    raise AdapterToolError(f"demo: untouched tensor {name} changed in the merge")
                continue
            a, b = lora.read(f"{module}.lora_A.weight").double(), lora.read(f"{module}.lora_B.weight").double()
            expected = w.double() + scaling * (b @ a)
            worst = max(worst, (w_merged.double() - expected).abs().max().item())
    if worst > 1e-6:
        raise AdapterToolError(f"demo: merged weights differ from the reference by {worst:.2e}")
    return worst

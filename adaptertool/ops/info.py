"""info: what a checkpoint or adapter holds, from headers and config files alone."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptertool.adapters.peft_keys import module_order, split_adapter_key
from adaptertool.io import Checkpoint, open_checkpoint, read_json

if TYPE_CHECKING:
    from adaptertool.ops.quantized import QuantSummary

# Only checkpoints holding this marker need the quantisation summary, whose module imports torch.
_QUANT_MARKER = ".quant_state.bitsandbytes__"

__all__ = ["AdapterSummary", "InfoReport", "info"]


@dataclass(frozen=True, kw_only=True)
class AdapterSummary:
    peft_type: str
    base_model: str | None
    rank: int | None  # the config's r
    alpha: float | None
    ranks: list[int]  # ranks found in the tensors (differ from r under rank_pattern)
    rslora: bool
    dora: bool
    targets: list[str]  # distinct module names adapted, e.g. q_proj
    modules: int  # adapted module instances
    modules_to_save: list[str]


@dataclass(frozen=True, kw_only=True)
class InfoReport:
    path: str
    format: str  # "safetensors", "sharded safetensors" or "peft adapter"
    files: list[str]
    tensors: int
    parameters: int
    bytes: int
    dtypes: dict[str, int]  # dtype code -> number of tensors
    architecture: str | None
    adapter: AdapterSummary | None
    quantization: QuantSummary | None = None  # bitsandbytes 4-bit weights, if any


def info(path: Path) -> InfoReport:
    """Describe the checkpoint or PEFT adapter at ``path``."""
    with open_checkpoint(path) as ckpt:
        config_dir = ckpt.root if ckpt.root is not None else ckpt.path.parent
        adapter_config = config_dir / "adapter_config.json"
        adapter = _adapter_summary(read_json(adapter_config), ckpt) if adapter_config.is_file() else None
        model_config = config_dir / "config.json"
        quantization = None
        if any(_QUANT_MARKER in name for name in ckpt):
            from adaptertool.ops.quantized import describe_quantization

            quantization = describe_quantization(ckpt, read_json(model_config) if model_config.is_file() else None)
        architecture = None
        if adapter is None and model_config.is_file() and ckpt.root is not None:
            architectures = read_json(model_config).get("architectures") or [None]
            architecture = architectures[0]
        if adapter is not None:
            kind = "peft adapter"
        else:
            kind = "sharded safetensors" if ckpt.index is not None else "safetensors"
        specs = ckpt.specs()
        parameters = 0
        for spec in specs:
            numel = 1
            for dim in spec.shape:
                numel *= dim
            parameters += numel
        return InfoReport(
            path=str(path), format=kind, files=[f.name for f in ckpt.files], tensors=len(specs),
            parameters=parameters, bytes=sum(s.nbytes for s in specs),
            dtypes=dict(sorted(Counter(s.dtype for s in specs).items())), architecture=architecture, adapter=adapter,
            quantization=quantization,
        )


def _adapter_summary(config: dict[str, Any], ckpt: Checkpoint) -> AdapterSummary:
    modules: set[str] = set()
    ranks: set[int] = set()
    for name in ckpt:
        split = split_adapter_key(name)
        if split is None:
            continue
        module, part = split
        modules.add(module)
        if part in ("lora_A", "lora_embedding_A"):
            ranks.add(ckpt[name].shape[0])
    return AdapterSummary(
        peft_type=str(config.get("peft_type", "unknown")),
        base_model=config.get("base_model_name_or_path"),
        rank=config.get("r"),
        alpha=config.get("lora_alpha"),
        ranks=sorted(ranks),
        rslora=bool(config.get("use_rslora", False)),
        dora=bool(config.get("use_dora", False)),
        targets=sorted({m.rsplit(".", 1)[-1] for m in modules}, key=module_order),
        modules=len(modules),
        modules_to_save=sorted(config.get("modules_to_save") or [], key=module_order),
    )

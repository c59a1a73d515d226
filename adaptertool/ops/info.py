"""info: what a checkpoint or adapter holds, from headers and config files alone."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptertool.adapters.experts import describe_experts
from adaptertool.adapters.peft_keys import module_order, split_adapter_key
from adaptertool.errors import AdapterToolError
from adaptertool.io import Checkpoint, open_checkpoint, read_json

if TYPE_CHECKING:
    from adaptertool.ops.quantized import QuantSummary

# Only quantised checkpoints (this marker, or a quantization_config) need the summary, whose module imports torch.
_QUANT_MARKER = ".quant_state.bitsandbytes__"

__all__ = ["INFO_SCHEMA", "AdapterSummary", "ExpertsSummary", "InfoReport", "info"]

# The --json layout's version (docs/commands/info.md lists every field): raised when a field is removed,
# renamed, or changes type or meaning, so that scripts can tell; a new field may appear without it.
INFO_SCHEMA = 1


@dataclass(frozen=True, kw_only=True)
class AdapterSummary:
    peft_type: str
    base_model: str | None
    rank: int | None  # the config's r
    alpha: float | None  # always a float (8.0, never 8), whatever the config's JSON held
    ranks: list[int]  # ranks found in the tensors (differ from r under rank_pattern)
    rslora: bool
    dora: bool
    targets: list[str]  # distinct module names adapted, e.g. q_proj
    modules: int  # adapted module instances
    modules_to_save: list[str]


@dataclass(frozen=True, kw_only=True)
class ExpertsSummary:
    """A mixture-of-experts checkpoint's experts, from config.json and the headers."""

    family: str  # the on-disk naming it follows: qwen2_moe (gate/up/down_proj), mixtral (w1/w3/w2) or gpt_oss
    layout: str  # per-expert, fused or fused-transposed (gpt-oss); "a/b" if layers differ
    moe_layers: list[int]  # decoder layers with experts
    dense_layers: list[int]  # layers with an ordinary MLP (DeepSeek's first_k_dense_replace...)
    experts: int  # routed experts per MoE layer
    experts_per_token: int | None  # config.json's num_experts_per_tok
    hidden: int
    intermediate: int  # each expert's
    router: list[str]  # router tensors of each MoE layer, named within its block (gate.weight...)
    shared: list[str]  # shared-expert tensors of each MoE layer, named within its block


@dataclass(frozen=True, kw_only=True)
class InfoReport:
    schema: int = INFO_SCHEMA
    path: str
    format: str  # "safetensors", "sharded safetensors" or "peft adapter"
    files: list[str]
    tensors: int
    parameters: int
    bytes: int
    dtypes: dict[str, int]  # dtype code -> number of tensors
    architecture: str | None
    adapter: AdapterSummary | None
    quantization: QuantSummary | None = None  # quantised weights (bitsandbytes 4-bit, FP8, MXFP4), if any
    experts: ExpertsSummary | None = None  # a mixture-of-experts model's experts
    notes: list[str] = field(default_factory=list)  # what could not be described (experts that disagree with config.json)


def info(path: Path) -> InfoReport:
    """Describe the checkpoint or PEFT adapter at ``path``."""
    with open_checkpoint(path) as ckpt:
        config_dir = ckpt.root if ckpt.root is not None else ckpt.path.parent
        adapter_config = config_dir / "adapter_config.json"
        adapter = _adapter_summary(read_json(adapter_config), ckpt) if adapter_config.is_file() else None
        model_config = config_dir / "config.json"
        config = read_json(model_config) if model_config.is_file() else {}
        quantization, view = None, None
        if any(_QUANT_MARKER in name for name in ckpt) or (config.get("quantization_config") and ckpt.root is not None):
            from adaptertool.ops.quantized import describe_quantization, open_quantized_view

            view = open_quantized_view(ckpt)
            quantization = describe_quantization(view) if view is not None else None
        architecture = None
        experts, notes = None, []
        if adapter is None and model_config.is_file() and ckpt.root is not None:
            architecture = (config.get("architectures") or [None])[0]
            try:
                experts = _experts_summary(config, ckpt, model_config)
            except AdapterToolError as err:
                notes.append(f"experts not described: {err}")
        if adapter is not None:
            kind = "peft adapter"
        else:
            kind = "sharded safetensors" if ckpt.index is not None else "safetensors"
        specs = ckpt.specs()
        # Parameters in real elements: a quantised weight counts as the tensor it decodes to.
        parameters = sum(math.prod(spec.shape) for spec in (view or ckpt).specs())
        return InfoReport(
            path=str(path), format=kind, files=[f.name for f in ckpt.files], tensors=len(specs),
            parameters=parameters, bytes=sum(s.nbytes for s in specs),
            dtypes=dict(sorted(Counter(s.dtype for s in specs).items())), architecture=architecture, adapter=adapter,
            quantization=quantization, experts=experts, notes=notes,
        )


def _experts_summary(config: dict[str, Any], ckpt: Checkpoint, path: Path) -> ExpertsSummary | None:
    layout = describe_experts(config, {name: ckpt[name].shape for name in ckpt}, source=str(path))
    if layout is None:
        return None
    first = layout.layers[0]

    def within(names: tuple[str, ...]) -> list[str]:
        return [name.removeprefix(f"{first.block}.") for name in names]

    top_k = config.get("num_experts_per_tok")
    return ExpertsSummary(
        family=layout.family, layout="/".join(sorted({layer.layout for layer in layout.layers})),
        moe_layers=[layer.index for layer in layout.layers], dense_layers=list(layout.dense_layers),
        experts=first.experts, experts_per_token=top_k if isinstance(top_k, int) else None, hidden=first.hidden,
        intermediate=first.intermediate, router=within(first.router), shared=within(first.shared),
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
    # info describes what is there, broken or not (merge refuses what it cannot use): fields of the
    # wrong type are left out rather than passed on to the summary and the --json output.
    rank, alpha, base_model = config.get("r"), config.get("lora_alpha"), config.get("base_model_name_or_path")
    saved = config.get("modules_to_save")
    return AdapterSummary(
        peft_type=str(config.get("peft_type", "unknown")),
        base_model=base_model if isinstance(base_model, str) else None,
        rank=rank if isinstance(rank, int) and not isinstance(rank, bool) else None,
        alpha=float(alpha) if isinstance(alpha, int | float) and not isinstance(alpha, bool) and math.isfinite(alpha) else None,
        ranks=sorted(ranks),
        rslora=bool(config.get("use_rslora", False)),
        dora=bool(config.get("use_dora", False)),
        targets=sorted({m.rsplit(".", 1)[-1] for m in modules}, key=module_order),
        modules=len(modules),
        modules_to_save=sorted((m for m in saved if isinstance(m, str)) if isinstance(saved, list) else [], key=module_order),
    )

"""merge: fold a PEFT LoRA adapter into its base checkpoint, streamed tensor by tensor.

Plan from headers (every adapter module mapped to a base tensor, every shape checked), then stream
the base: adapted weights get ``W + scale * delta`` (float32, rounded once), modules_to_save copies
replace their base tensor, and everything else is copied byte for byte.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from adaptertool.adapters import split_adapter_key
from adaptertool.adapters.lora import add_delta, embedding_delta, linear_delta
from adaptertool.adapters.peft_config import LoraSettings
from adaptertool.errors import AdapterToolError
from adaptertool.io import (
    DEFAULT_MAX_SHARD_BYTES,
    Checkpoint,
    CheckpointWriter,
    copy_side_files,
    open_adapter,
    open_checkpoint,
    staged_output,
)
from adaptertool.ops.measure import Stopwatch, peak_rss_bytes

__all__ = ["MergeConfig", "MergeReport", "merge"]

_LINEAR = {"lora_A.weight", "lora_B.weight", "lora_B.bias"}
_EMBEDDING = {"lora_embedding_A", "lora_embedding_B"}


@dataclass(frozen=True, kw_only=True)
class MergeConfig:
    base: Path
    adapter: Path
    out: Path
    scale: float = 1.0  # multiplies every delta; -1 undoes a merge
    max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES
    force: bool = False


@dataclass(frozen=True, kw_only=True)
class MergeReport:
    out: str
    files: list[str]
    merged: int
    replaced: int
    copied: int
    side_files: list[str]
    seconds: float
    peak_rss_bytes: int


@dataclass(frozen=True)
class _Edit:
    """How one base tensor changes.

    ``kind`` is linear, embedding or bias (add a delta from ``keys``) or replace (take ``keys[0]``).
    ``replacement`` is a full copy saved with the adapter that stands in for the base tensor
    before the delta is added (PEFT saves embeddings so when it resizes or trains them).
    """

    kind: str
    keys: tuple[str, ...]
    scaling: float = 1.0
    fan_in_fan_out: bool = False  # base weight stored (in, out), as GPT-2's Conv1D
    replacement: str | None = None


def merge(cfg: MergeConfig, *, progress: bool = False) -> MergeReport:
    """Merge ``cfg.adapter`` into ``cfg.base`` and write ``cfg.out``."""
    clock = Stopwatch()
    config, adapter, config_path = open_adapter(cfg.adapter)
    with adapter, open_checkpoint(cfg.base) as base:
        settings = LoraSettings.from_config(config, source=str(config_path))
        edits = plan_edits(base, adapter, settings, adapter_name=str(cfg.adapter))
        with staged_output(cfg.out, force=cfg.force, inputs=[cfg.base, cfg.adapter]) as tmp:
            writer = CheckpointWriter(tmp, base.specs(), max_shard_bytes=cfg.max_shard_bytes)
            with writer, tqdm(total=writer.total_bytes, unit="B", unit_scale=True, desc="merge", disable=not progress) as bar:
                for spec in writer.order:
                    edit = edits.get(spec.name)
                    if edit is None:
                        writer.copy(spec.name, base)
                    else:
                        writer.write(spec.name, _apply(edit, base.read(spec.name), adapter, cfg.scale))
                    bar.update(spec.nbytes)
            side = copy_side_files(base.root, tmp)
    replaced = sum(e.kind == "replace" for e in edits.values())
    return MergeReport(
        out=str(cfg.out), files=[f.name for f in writer.files], merged=len(edits) - replaced, replaced=replaced,
        copied=len(writer.order) - len(edits), side_files=side, seconds=clock.seconds, peak_rss_bytes=peak_rss_bytes(),
    )


def plan_edits(base: Checkpoint, adapter: Checkpoint, settings: LoraSettings, *, adapter_name: str) -> dict[str, _Edit]:
    """Map every adapter tensor to the base tensor it changes, checking names and shapes.

    Raises:
        AdapterToolError: a module the base lacks, a shape that does not fit, or an adapter part
            (DoRA, LoHa...) this version cannot merge.
    """
    modules: dict[str, dict[str, str]] = {}
    replacements: dict[str, str] = {}
    for key in adapter:
        split = split_adapter_key(key)
        if split is None:  # a full copy (modules_to_save, or a LoRA layer's own base weight)
            name = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
            target = _base_name(name, base)
            if target is None:
                raise AdapterToolError(f"{adapter_name}: saved module {key} has no counterpart in the base; is it the right base?")
            _check_shape(adapter[key].shape, base[target].shape, key, target)
            replacements[target] = key
            continue
        module, part = split
        if part not in _LINEAR | _EMBEDDING:
            raise AdapterToolError(f"{adapter_name}: tensor {key} ({part}) is not supported yet; only plain LoRA merges")
        modules.setdefault(module, {})[part] = key
    edits: dict[str, _Edit] = {}
    for module, parts in modules.items():
        for target, edit in _plan_module(module, parts, base, adapter, settings, adapter_name).items():
            edits[target] = dataclasses.replace(edit, replacement=replacements.pop(target, None))
    edits.update({target: _Edit("replace", (key,)) for target, key in replacements.items()})
    return edits


def _plan_module(module: str, parts: dict[str, str], base: Checkpoint, adapter: Checkpoint,
                 settings: LoraSettings, adapter_name: str) -> dict[str, _Edit]:
    embedding = "lora_embedding_A" in parts
    a_part, b_part = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
    if a_part not in parts or b_part not in parts:
        raise AdapterToolError(f"{adapter_name}: module {module} has only {sorted(parts)}; the adapter is incomplete")
    target = _base_name(module + ".weight", base)
    if target is None:
        raise AdapterToolError(f"{adapter_name}: adapter targets {module} but the base has no {module}.weight; is it the right base?")
    a_shape, b_shape = adapter[parts[a_part]].shape, adapter[parts[b_part]].shape
    rank = settings.module_rank(module)
    if a_shape[0] != rank or b_shape[-1] != rank:
        raise AdapterToolError(
            f"{adapter_name}: {module} has rank {a_shape[0]} in its tensors but the config says {rank}; the adapter is inconsistent"
        )
    if embedding:
        expected = (a_shape[1], b_shape[0])
    else:
        expected = (a_shape[1], b_shape[0]) if settings.fan_in_fan_out else (b_shape[0], a_shape[1])
    _check_shape(expected, base[target].shape, parts[a_part], target)
    scaling = settings.module_scaling(module)
    kind = "embedding" if embedding else "linear"
    edits = {target: _Edit(kind, (parts[a_part], parts[b_part]), scaling, settings.fan_in_fan_out and not embedding)}
    if "lora_B.bias" in parts:
        bias = _base_name(module + ".bias", base)
        if bias is None:
            raise AdapterToolError(f"{adapter_name}: {module} has a lora_B.bias but the base has no {module}.bias")
        edits[bias] = _Edit("bias", (parts["lora_B.bias"],), scaling)
    return edits


def _base_name(name: str, base: Checkpoint) -> str | None:
    # PEFT keys carry the module path inside the task model (model.layers...); a checkpoint saved
    # from the bare backbone lacks the leading "model.", and the reverse also happens.
    rest = name.partition(".")[2]
    for candidate in (name, rest, f"model.{name}"):
        if candidate in base:
            return candidate
    return None


def _check_shape(adapter_shape: tuple[int, ...], base_shape: tuple[int, ...], key: str, target: str) -> None:
    if tuple(adapter_shape) != tuple(base_shape):
        raise AdapterToolError(
            f"adapter tensor {key} implies shape {list(adapter_shape)} for {target}, but the base has {list(base_shape)}; "
            "was the adapter made for another model?"
        )


def _apply(edit: _Edit, weight: torch.Tensor, adapter: Checkpoint, scale: float) -> torch.Tensor:
    tensors = [adapter.read(key) for key in edit.keys]
    if edit.kind == "replace":
        return tensors[0].to(weight.dtype)
    if edit.replacement is not None:
        weight = adapter.read(edit.replacement).to(weight.dtype)
    if edit.kind == "linear":
        delta = linear_delta(tensors[0], tensors[1], edit.scaling, fan_in_fan_out=edit.fan_in_fan_out)
    elif edit.kind == "embedding":
        delta = embedding_delta(tensors[0], tensors[1], edit.scaling)
    else:  # bias
        delta = tensors[0].float() * edit.scaling
    return add_delta(weight, delta, scale=scale)

"""Applying expert steps: adapters on mixture-of-experts weights, one expert at a time.

A per-expert tensor is small and merges like any other: read, converted to float32, every step
applied (:func:`apply_expert_step` for the expert steps), rounded once. A fused tensor holds every
expert of a layer (Qwen3-30B-A3B's ``gate_up_proj`` is 128 x 1536 x 2048, 0.8 GB in bf16), so a
float32 copy of it would triple the merge's memory. :func:`merge_fused` instead converts one
expert's slice to float32, applies that expert's steps in adapter order, and rounds it into the
output (the stored tensor itself, when the dtype stays), so the merge holds the tensor once plus
one expert's float32 slice and delta.
Each element still sees the same arithmetic as a whole-tensor merge: read once, every step in
order in float32, rounded once.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from adaptertool.adapters.expert_lora import ParamLora
from adaptertool.ops.adapter_inputs import LoadedAdapter
from adaptertool.ops.merge_plan import ExpertStep, ReplaceStep, Step

__all__ = ["apply_expert_step", "expert_lora_factors", "merge_fused"]


def merge_fused(weight: torch.Tensor, steps: list[Step], adapters: list[LoadedAdapter], device: torch.device,
                dtype: torch.dtype) -> torch.Tensor:
    """The merge of a fused target (see :func:`~adaptertool.ops.merge_plan.fused_target`), in ``dtype``.

    ``weight`` is the stored tensor as read, the caller's scratch: it is updated in place when it is
    of ``dtype`` already. ``steps`` are expert steps on fused experts, perhaps after a replacement
    (modules_to_save) of the whole tensor.
    """
    stored = weight
    if steps and isinstance(steps[0], ReplaceStep):
        stored, steps = adapters[steps[0].adapter].weights.read(steps[0].key), steps[1:]
    by_expert: dict[int, list[ExpertStep]] = {}
    for step in steps:
        if not isinstance(step, ExpertStep) or step.where.expert is None:
            raise ValueError(f"{step} is not a step on one expert of a fused tensor")
        by_expert.setdefault(step.where.expert, []).append(step)
    out = stored if stored.dtype == dtype else torch.empty(stored.shape, dtype=dtype)
    work = torch.empty((1, *stored.shape[1:]), dtype=torch.float32, device=device)  # reused: one expert's slice
    for expert in range(stored.shape[0]):
        mine = by_expert.get(expert)
        if not mine:
            if out is not stored:
                out[expert].copy_(stored[expert])  # an untouched expert, cast
            continue
        work.copy_(stored[expert : expert + 1])
        for step in mine:
            apply_expert_step(work, step, adapters[step.adapter], device)
        out[expert].copy_(work[0])  # rounded once
    return out


def expert_lora_factors(step: ExpertStep, adapter: LoadedAdapter) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """``(A, B, scaling)`` of a target_parameters LoRA step on a whole per-expert tensor, the expert's
    own factors (B's rows of its projection), so the merge can take the row-blocked LoRA path; None
    for any other step. Same products, scaling and add as :func:`apply_expert_step`."""
    update, where = step.update, step.where
    if not isinstance(update, ParamLora) or where.expert is not None or where.transposed or step.projection is None:
        return None
    a, b = update.projection_factors(adapter.read_recent(update.a_key), adapter.read_recent(update.b_key),
                                     step.expert)[step.projection]
    return a, b, update.scaling


def apply_expert_step(work: torch.Tensor, step: ExpertStep, adapter: LoadedAdapter, device: torch.device) -> None:
    """Apply ``step`` in place to ``work``, the float32 target tensor on ``device`` (for a fused
    target: a ``(1, ...)`` tensor holding the step's expert alone)."""
    where = step.where if step.where.expert is None else replace(step.where, expert=0)
    view = where.view(work)
    update = step.update
    if isinstance(update, ParamLora):
        a, b = adapter.read_recent(update.a_key, device=device), adapter.read_recent(update.b_key, device=device)
        delta = (update.delta(a, b, step.expert) if step.projection is None
                 else update.projection_deltas(a, b, step.expert)[step.projection])
        view.add_(delta, alpha=step.scale)  # alpha = +-1 adds exactly as PEFT's plain add
        return
    tensors = {part: adapter.weights.read(key).to(device) for part, key in update.keys.items()}
    update.apply_(view, tensors, scale=step.scale)

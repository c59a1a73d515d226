"""extract's experts: the deltas of a mixture-of-experts fine-tune's experts factored into either
form of expert LoRA (:mod:`adaptertool.ops.expert_targets`), and the report's groups of them.

- per-expert form: each expert's projection is a Linear LoRA. Experts stored as their own tensor
  are factored by extract's Linear loop; this module factors those inside a fused tensor, reading
  each fused tensor once for all of its experts.
- fused form: PEFT's target_parameters LoRA per fused parameter. Each expert's delta over the
  whole parameter (gate and up rows together, in their stored order) is factored on its own, and
  the factors are stacked with :func:`~adaptertool.adapters.expert_lora.stack_experts`, which needs
  one rank for all experts: an expert whose rule gave a lower rank gets zero factors up to the
  parameter's highest rank (its product unchanged), an unchanged expert zero factors throughout.
  A parameter whose experts are all unchanged is left out, and the nesting of the keys and
  ``target_parameters`` follow what is written.

Memory: at most two stored tensors of each checkpoint (a layer's fused gate_up_proj is 0.8 GB in
bf16 for Qwen3-30B-A3B), one expert's float32 delta, and one parameter's factors for all experts.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from adaptertool.adapters.expert_lora import param_lora_keys, split_gate_up, stack_experts
from adaptertool.adapters.peft_keys import lora_keys
from adaptertool.io import DTYPES, Checkpoint, TensorSource, TensorSpool
from adaptertool.ops.expert_targets import ParamUnit
from adaptertool.ops.extract_plan import ExtractPlan
from adaptertool.ops.quantized import read_values

__all__ = ["ExpertGroupReport", "Factored", "factor_experts", "group_reports"]

# factor(base weight, tuned weight, seed key) -> (B, A, figures) or None when unchanged: extract's own rule.
Factor = Callable[[torch.Tensor, torch.Tensor, str], "tuple[torch.Tensor, torch.Tensor, dict[str, Any]] | None"]


@dataclass(frozen=True)
class Factored:
    """One factored expert: what extract's report needs of it."""

    module: str  # per-expert form: its Linear module; fused form: the parameter's path
    shape: list[int]  # [out, in]
    figures: dict[str, Any]  # rank, retained, rel_error, delta_norm, capped, size_capped, noise_floor
    expert: int
    group: str  # per-expert form: the unit's group; fused form: the parameter's path


@dataclass(frozen=True, kw_only=True)
class ExpertGroupReport:
    """The experts of one layer and projection (per-expert form) or fused parameter, summed up."""

    group: str  # model.layers.0.mlp.experts.*.gate_proj, or model.layers.0.mlp.experts.gate_up_proj
    experts: int
    changed: int  # experts whose weights changed
    rank_min: int  # over the changed experts' LoRAs
    rank_max: int
    retained: float  # energy-weighted over the group
    rel_error: float


class _Recent:
    """The last two tensors read from one checkpoint (read_values: a quantised base's decoded values)."""

    def __init__(self, source: TensorSource) -> None:
        self.source = source
        self.held: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.held:
            self.held[name] = read_values(self.source, name)
            if len(self.held) > 2:
                self.held.popitem(last=False)
        return self.held[name]


def factor_experts(base: TensorSource, tuned: Checkpoint, plan: ExtractPlan, spool: TensorSpool, factor: Factor, *,
                   out_dtype: torch.dtype) -> tuple[list[Factored], list[str], int, list[ParamUnit]]:
    """Factor the experts extract's Linear loop does not into ``spool``.

    Returns:
        (the factored experts, the unchanged modules and parameters, the deltas' bytes at TUNED's
        dtype, the fused parameters written).
    """
    read_base, read_tuned = _Recent(base), _Recent(tuned)
    done: list[Factored] = []
    unchanged: list[str] = []
    delta_bytes = 0
    for unit in plan.expert_views:
        where = unit.where
        tuned_view = where.view(read_tuned(where.tensor))
        found = factor(where.view(read_base(where.tensor)), tuned_view.clone(), unit.module)
        if found is None:
            unchanged.append(unit.module)
            continue
        b, a, figures = found
        keys = lora_keys(unit.module, embedding=False)
        spool.add(keys.a, a.to(out_dtype))
        spool.add(keys.b, b.to(out_dtype))
        delta_bytes += tuned_view.numel() * tuned_view.element_size()
        done.append(Factored(unit.module, list(where.shape), figures, unit.expert, unit.group))
    written: list[ParamUnit] = []
    params = plan.experts.params if plan.experts is not None else ()
    for layer in dict.fromkeys(p.layer for p in params):
        factors = {}
        for unit in (p for p in params if p.layer is layer):
            stacked, reports = _factor_param(unit, read_base, read_tuned, factor)
            if stacked is None:
                unchanged.append(unit.path)
                continue
            factors[unit.param] = stacked
            done += reports
            delta_bytes += layer.experts * _expert_bytes(unit, tuned)
        keys = param_lora_keys(layer.module, list(factors))  # the nesting of what is written
        for param, (a, b) in factors.items():
            spool.add(keys[param][0], a.to(out_dtype))
            spool.add(keys[param][1], b.to(out_dtype))
            written.append(next(p for p in params if p.layer is layer and p.param == param))
    return done, unchanged, delta_bytes, written


def _factor_param(unit: ParamUnit, read_base: _Recent, read_tuned: _Recent,
                  factor: Factor) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, list[Factored]]:
    """One fused parameter's stacked ``(lora_A, lora_B)`` (None: no expert changed) and its experts' reports."""
    layer, (out_features, in_features) = unit.layer, unit.shape
    found: dict[int, tuple[torch.Tensor, torch.Tensor, dict[str, Any]]] = {}
    for expert in range(layer.experts):
        matrices = []
        for read in (read_base, read_tuned):
            # The expert's (out, in) over the whole parameter, rows in their stored order, in the stored dtype
            # (which sets the rounding-noise model and the size cap).
            parts = [layer.weight(expert, projection) for projection in unit.projections]
            sources = [where.view(read(where.tensor)) for where in parts]
            matrix = sources[0].new_empty(out_features, in_features)
            rows = split_gate_up(matrix, interleaved=layer.interleaved) if len(sources) == 2 else (matrix,)
            for target, source in zip(rows, sources):
                target.copy_(source)
            matrices.append(matrix)
        # Seeded per parameter and expert, as extract seeds a module by its name.
        result = factor(matrices[0], matrices[1], f"{unit.path}.{expert}")
        if result is not None:
            found[expert] = result
    if not found:
        return None, []
    rank = max(figures["rank"] for _, _, figures in found.values())
    zero = {"rank": rank, "retained": 1.0, "rel_error": 0.0, "delta_norm": 0.0, "capped": False, "size_capped": False,
            "noise_floor": 0.0}
    factors, reports = [], []
    for expert in range(layer.experts):
        b, a, figures = found.get(expert, (torch.zeros(out_features, 0), torch.zeros(0, in_features), zero))
        # Zero rows of A and columns of B up to the parameter's rank: the product is unchanged.
        a = torch.cat([a.float(), a.new_zeros(rank - a.shape[0], in_features, dtype=torch.float32)])
        b = torch.cat([b.float(), b.new_zeros(out_features, rank - b.shape[1], dtype=torch.float32)], dim=1)
        factors.append((a, b))
        reports.append(Factored(unit.path, [out_features, in_features], {**figures, "rank": rank}, expert, unit.path))
    return stack_experts(factors), reports


def _expert_bytes(unit: ParamUnit, tuned: Checkpoint) -> int:
    """One expert's delta over the parameter, at TUNED's dtype."""
    code = tuned[unit.layer.weight(0, unit.projections[0]).tensor].dtype
    return unit.shape[0] * unit.shape[1] * DTYPES[code][0]


def group_reports(modules: list[Any], unchanged: list[str], plan: ExtractPlan) -> list[ExpertGroupReport]:
    """One summary per expert group, from the per-module reports (fused form: every expert of a written
    parameter has one, changed or not; per-expert form: the unchanged experts are among ``unchanged``)."""
    members: dict[str, list[Any]] = {}
    for m in modules:
        if m.group is not None:
            members.setdefault(m.group, []).append(m)
    units = plan.units
    idle: dict[str, int] = {}
    for module in unchanged:
        if module in units:
            idle[units[module].group] = idle.get(units[module].group, 0) + 1
    reports = []
    for key in dict.fromkeys([*members, *idle]):
        rows = members.get(key, [])
        moved = [m for m in rows if m.delta_norm > 0]
        total = sum(m.delta_norm**2 for m in moved)
        kept = sum(m.retained * m.delta_norm**2 for m in moved)
        ranks = [m.rank for m in moved] or [0]
        reports.append(ExpertGroupReport(
            group=key, experts=len(rows) + idle.get(key, 0), changed=len(moved), rank_min=min(ranks), rank_max=max(ranks),
            retained=kept / total if total else 1.0, rel_error=max(0.0, 1.0 - kept / total) ** 0.5 if total else 0.0))
    return reports

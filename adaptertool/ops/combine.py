"""combine: several PEFT adapters for one base into one LoRA adapter (maths: :mod:`adaptertool.adapters.combine`).

Plan from headers (:mod:`adaptertool.ops.combine_plan`): the output targets the union of the
adapters' modules, each combined from the adapters that adapt it. Then one module at a time: read
its tensors, combine (stack the factors, or combine the full deltas and re-factor them by SVD),
keep the small factors; finally write the adapter atomically.

The output is plain LoRA with ``lora_alpha == r`` (scaling 1, no rsLoRA, whatever the inputs use);
modules whose rank differs from the most common one get rank_pattern/alpha_pattern entries, and
``target_modules`` names every module in full, so PEFT wraps exactly those (short names could wrap
modules that only some inputs' layers_to_transform covered, which PEFT reports as missing keys).

PEFT target_parameters LoRAs on fused experts (``lora_A (E*r, in)``, ``lora_B (out, E*r)``) combine
by linear and cat only: each expert's factors are stacked as a module's are and the experts
stacked back, so the output is a target_parameters LoRA of rank ``sum_i r_i`` per expert.

Whole tensors (modules_to_save copies, saved embedding layers) cannot be weighted without the base
they replace: each is copied once, and two adapters saving different values for one is an error.
Biases (``lora_B.bias``) are summed with their weights and scalings for every method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from adaptertool.adapters.combine import (
    EXACT_METHODS,
    METHODS,
    LowRank,
    combine_task_vectors,
    stack_factors,
)
from adaptertool.adapters.expert_lora import expert_factors, param_lora_keys, stack_experts
from adaptertool.adapters.modules import ModuleUpdate
from adaptertool.adapters.peft_config import uniform_scaling
from adaptertool.adapters.peft_keys import lora_keys, module_order
from adaptertool.adapters.svd import RankPolicy, factor_delta
from adaptertool.errors import InputError, OptionError
from adaptertool.io import (
    CheckpointWriter,
    TensorSpec,
    check_output,
    dtype_code,
    staged_output,
    write_adapter,
)
from adaptertool.ops.adapter_inputs import LoadedAdapter, load_adapter, read_checked
from adaptertool.ops.combine_plan import CombinePlan, ModulePlan, ParamPlan, plan_combine
from adaptertool.ops.measure import Stopwatch, peak_rss_bytes
from adaptertool.ops.options import SvdSettings, check_finite_numbers, check_float_dtype
from adaptertool.ops.targets import module_seed


__all__ = ["CombineConfig", "CombineReport", "ModuleReport", "combine"]

_PRUNING = ("ties", "dare", "magnitude_prune")  # method prefixes that take --density
_SIGNED = ("ties", "dare_ties")  # operations that elect a sign


@dataclass(frozen=True, kw_only=True)
class CombineConfig:
    adapters: tuple[Path, ...]
    out: Path
    weights: tuple[float, ...] | None = None  # one per adapter; None: 1 each
    method: str = "linear"
    density: float | None = None  # ties / dare_* / magnitude_prune: kept fraction in (0, 1]
    rank: int | None = None  # SVD methods; None: the largest input rank (PEFT's default)
    majority_sign: str | None = None  # ties / dare_ties: total (default) or frequency
    seed: int = 0  # DARE masks and randomized SVD
    svd: str = "randomized"
    dtype: torch.dtype | None = None  # factor dtype; None: float32
    force: bool = False

    def __post_init__(self) -> None:
        if not self.adapters:
            raise OptionError("no adapter given; combine needs at least one ADAPTER")
        if self.method not in METHODS:
            raise OptionError(f"--method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.weights is not None:
            if len(self.weights) != len(self.adapters):
                raise OptionError(f"{len(self.weights)} weights for {len(self.adapters)} adapters; give one weight per adapter")
            if not all(math.isfinite(w) for w in self.weights):
                raise OptionError(f"weights must be finite numbers, got {list(self.weights)}")
        check_finite_numbers("--weights", *(self.weights or ()))
        pruning = self.method.startswith(_PRUNING)
        if pruning and self.density is None:
            raise OptionError(f"--method {self.method} needs --density, the fraction of each delta kept, in (0, 1]")
        if self.density is not None and not pruning:
            raise OptionError(f"--density applies to ties, dare_* and magnitude_prune, not --method {self.method}")
        if self.density is not None and not 0.0 < self.density <= 1.0:
            raise OptionError(f"--density must lie in (0, 1], e.g. 0.5, not {self.density}")
        if self.rank is not None and self.method in EXACT_METHODS:
            raise OptionError(f"--method {self.method} is exact and its rank is the sum of the inputs' ranks; "
                              "use --method svd --rank R for a smaller adapter")
        if self.rank is not None and self.rank <= 0:
            raise OptionError(f"--rank must be a positive integer, not {self.rank}")
        if self.majority_sign is not None and METHODS[self.method] not in _SIGNED:
            raise OptionError(f"--majority-sign applies to ties and dare_ties, not --method {self.method}")
        if self.majority_sign not in (None, "total", "frequency"):
            raise OptionError(f"--majority-sign must be total or frequency, not {self.majority_sign!r}")
        self.svd_settings  # validates svd
        check_float_dtype(self.dtype)

    @property
    def svd_settings(self) -> SvdSettings:
        """``--svd`` with extract's randomized SVD settings (niter 6, oversample 16)."""
        return SvdSettings(method=self.svd)

    def weight_list(self) -> list[float]:
        return list(self.weights) if self.weights is not None else [1.0] * len(self.adapters)


@dataclass(frozen=True, kw_only=True)
class ModuleReport:
    module: str
    shape: list[int]  # the LoRA product's [out, in] ([D, V] for an embedding)
    rank: int
    inputs: int  # adapters combined into this module
    rel_error: float  # ||combined - B' A'||_F / ||combined||_F; 0 for the exact methods
    capped: bool = False  # the SVD rank was cut at the break-even point


@dataclass(frozen=True, kw_only=True)
class CombineReport:
    out: str
    files: list[str]
    method: str
    adapters: list[str]
    weights: list[float]
    rank: int  # the adapter's r (= lora_alpha); other ranks are in rank_pattern
    modules: list[ModuleReport]
    dropped: list[str]  # modules whose combined update is exactly zero
    modules_to_save: list[str]
    rel_error: float  # over all modules: sqrt(sum of residual energy / sum of combined energy)
    adapter_bytes: int
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_bytes: int = 0


@dataclass
class _Result:
    b: torch.Tensor
    a: torch.Tensor
    bias: torch.Tensor | None
    report: ModuleReport
    energy: float  # ||combined||_F^2, for the total error


def combine(cfg: CombineConfig, *, progress: bool = False) -> CombineReport:
    """Combine ``cfg.adapters`` with ``cfg.weights`` into the adapter ``cfg.out`` by ``cfg.method``.

    Raises:
        AdapterToolError: adapters for different bases (conflicting shapes), non-additive updates
            (DoRA, IA3), conflicting whole-tensor copies, or unusable options.
    """
    clock = Stopwatch()
    check_output(cfg.out, force=cfg.force, inputs=cfg.adapters)
    inputs: list[LoadedAdapter] = []
    try:
        for path, weight in zip(cfg.adapters, cfg.weight_list()):
            inputs.append(load_adapter(path, weight))
        plan = plan_combine(inputs, exact_method=cfg.method if cfg.method in EXACT_METHODS else None)
        results, dropped = _combine_all(plan, inputs, cfg, progress=progress)
        if not results and not plan.whole:
            raise InputError("every combined update is zero; nothing to write (are the weights all 0?)")
        config = _adapter_config(inputs, plan, results)
        with staged_output(cfg.out, force=cfg.force, inputs=cfg.adapters) as tmp:
            writer = _write(tmp, config, results, plan, inputs, cfg)
    finally:
        for item in inputs:
            item.close()
    energy = sum(r.energy for r in results.values())
    residual = sum(r.energy * r.report.rel_error**2 for r in results.values())
    return CombineReport(
        out=str(cfg.out), files=[f.name for f in writer.files], method=cfg.method,
        adapters=[str(p) for p in cfg.adapters], weights=cfg.weight_list(), rank=int(config["r"]),
        modules=sorted((r.report for r in results.values()), key=lambda m: module_order(m.module)),
        dropped=sorted(dropped, key=module_order),
        modules_to_save=sorted(config.get("modules_to_save") or [], key=module_order),
        rel_error=math.sqrt(residual / energy) if energy else 0.0, adapter_bytes=writer.total_bytes,
        notes=plan.notes, seconds=clock.seconds, peak_rss_bytes=peak_rss_bytes(),
    )


def _combine_all(plan: CombinePlan, inputs: list[LoadedAdapter], cfg: CombineConfig, *,
                 progress: bool) -> tuple[dict[str, _Result], list[str]]:
    """Combine every module and fused expert parameter, one at a time; (results by module or parameter
    path, those dropped as zero)."""
    ranks = [p.rank for m in plan.modules.values() for p in m.parts]
    target_rank = cfg.rank or max(ranks, default=1)
    any_bias = any(p.update.changes_bias for m in plan.modules.values() for p in m.parts)
    results: dict[str, _Result] = {}
    dropped: list[str] = []
    with tqdm(total=len(plan.modules) + len(plan.params), unit="module", desc="combine", disable=not progress) as bar:
        for name, module in plan.modules.items():
            result = _combine_module(module, inputs, cfg, target_rank, any_bias) if module.parts else None
            if result is None:
                dropped.append(name)
            else:
                results[name] = result
            bar.update(1)
        for name, param in plan.params.items():
            if param.parts:
                results[name] = _combine_param(param, inputs, cfg)
            else:
                dropped.append(name)
            bar.update(1)
    if dropped:
        plan.notes.append(f"{len(dropped)} modules combine to an exactly zero update and are left out (e.g. {dropped[0]})")
    return results, dropped


def _combine_param(param: ParamPlan, inputs: list[LoadedAdapter], cfg: CombineConfig) -> _Result:
    """A fused parameter's stacked factors: each expert's as linear/cat stack a module's, then the experts'."""
    tensors = [(read_checked(inputs[i], lora.a_key), read_checked(inputs[i], lora.b_key)) for i, lora in param.parts]
    weights = [inputs[i].weight for i, _ in param.parts]
    factors = []
    for expert in range(param.experts):
        parts = []
        for (lora_a, lora_b), (_, lora) in zip(tensors, param.parts):
            a, b = expert_factors(lora_a, lora_b, expert, experts=param.experts)
            parts.append(LowRank(b, a, lora.scaling))
        b, a = stack_factors(parts, weights, balanced=cfg.method == "linear")
        factors.append((a, b))
    lora_a, lora_b = stack_experts(factors)
    report = ModuleReport(module=param.path, shape=list(param.shape), rank=lora_a.shape[0] // param.experts,
                          inputs=len(param.parts), rel_error=0.0)
    return _Result(lora_b, lora_a, None, report, energy=0.0)


def _combine_module(module: ModulePlan, inputs: list[LoadedAdapter], cfg: CombineConfig, target_rank: int,
                    any_bias: bool) -> _Result | None:
    """One module's combined factors (and bias), or None when the combined update is exactly zero."""
    tensors = [_read(inputs[p.adapter], p.update) for p in module.parts]
    weights = [inputs[p.adapter].weight for p in module.parts]
    bias = None
    if any_bias and not module.embedding:
        bias = torch.zeros(module.shape[1] if module.parts[0].update.fan_in_fan_out else module.shape[0])
        for part, parts_tensors, weight in zip(module.parts, tensors, weights):
            if part.update.changes_bias:
                bias += parts_tensors["lora_B.bias"].float() * (weight * part.update.scaling)
    operation = METHODS[cfg.method]
    if not operation:
        b, a = stack_factors([_low_rank(p.update, t) for p, t in zip(module.parts, tensors)], weights,
                             balanced=cfg.method == "linear")
        report = ModuleReport(module=module.name, shape=[b.shape[0], a.shape[1]], rank=a.shape[0],
                              inputs=len(module.parts), rel_error=0.0)
        return _Result(b, a, bias, report, energy=0.0)
    taus = [_factor_space(p.update, p.update.delta(t)) for p, t in zip(module.parts, tensors)]
    generators = [torch.Generator().manual_seed(module_seed(cfg.seed, module.name, f"dare{p.adapter}")) for p in module.parts]
    combined = combine_task_vectors(taus, weights, operation=operation, density=cfg.density or 1.0,
                                    majority_sign=cfg.majority_sign or "total", generators=generators)
    del taus
    if not combined.any():
        if bias is None or not bias.any():
            return None
        # Only the bias changed: PEFT needs a LoRA layer to carry lora_B.bias, so a rank-1 zero update.
        b, a = torch.zeros(combined.shape[0], 1), torch.zeros(1, combined.shape[1])
        report = ModuleReport(module=module.name, shape=list(combined.shape), rank=1, inputs=len(module.parts), rel_error=0.0)
        return _Result(b, a, bias, report, energy=0.0)
    generator = torch.Generator().manual_seed(module_seed(cfg.seed, module.name, "svd"))
    bound = _sum_rank_bound(module) if operation == "sum" else None
    rank = target_rank if bound is None else min(target_rank, bound)
    svd = cfg.svd_settings
    f = factor_delta(combined, RankPolicy(rank=rank), method=svd.method, generator=generator,
                     niter=svd.niter, oversample=svd.oversample)
    report = ModuleReport(module=module.name, shape=list(combined.shape), rank=f.rank, inputs=len(module.parts),
                          rel_error=f.rel_error, capped=f.capped)
    return _Result(f.b, f.a, bias, report, energy=f.delta_norm**2)


def _sum_rank_bound(module: ModulePlan) -> int | None:
    """An upper bound on the rank of a weighted sum of the module's updates (None: none known).

    rank(sum) <= sum of ranks; a LoHa update (w1a w1b) * (w2a w2b) has rank <= r^2 (the Hadamard
    product of two rank-r matrices); a LoKr Kronecker product has no bound in terms of r.
    """
    total = 0
    for part in module.parts:
        if part.update.kind == "lokr":
            return None
        total += part.rank**2 if part.update.kind == "loha" else part.rank
    return total


def _read(item: LoadedAdapter, update: ModuleUpdate) -> dict[str, torch.Tensor]:
    return {part: read_checked(item, key) for part, key in update.keys.items()}


def _factor_space(update: ModuleUpdate, delta: torch.Tensor) -> torch.Tensor:
    """The delta as the LoRA product ``B @ A``: (out, in), or (D, V) for an embedding."""
    return delta.T if update.fan_in_fan_out or update.kind == "lora_embedding" else delta


def _low_rank(update: ModuleUpdate, t: dict[str, torch.Tensor]) -> LowRank:
    """An update as ``coefficient * B @ A`` in factor space (LoRA, embedding LoRA and AdaLoRA)."""
    if update.kind == "lora_embedding":
        return LowRank(t["lora_embedding_B"], t["lora_embedding_A"], update.scaling)
    if update.kind == "adalora":
        # PEFT divides by its float32 ranknum buffer (the rank) plus 1e-5; E scales A's rows.
        ranknum = float(torch.tensor(float(t["lora_A"].shape[0])) + 1e-5)
        return LowRank(t["lora_B"], t["lora_A"].float() * t["lora_E"].float(), update.scaling / ranknum)
    return LowRank(t["lora_B"], t["lora_A"], update.scaling)




def _adapter_config(inputs: list[LoadedAdapter], plan: CombinePlan, results: dict[str, _Result]) -> dict[str, Any]:
    """A plain LoRA config: scaling 1 everywhere, every module named in full."""
    contributing = [i for i in inputs if i.weight != 0.0]
    task_types = {i.config.get("task_type") for i in contributing} - {None}
    if len(task_types) > 1:
        plan.notes.append(f"the adapters have different task types ({', '.join(sorted(task_types))}); the output has none")
    saved = sorted({m for i in contributing for m in i.settings.modules_to_save})
    config: dict[str, Any] = {
        "peft_type": "LORA", **uniform_scaling({name: res.report.rank for name, res in results.items()}, default_rank=1),
        "lora_dropout": 0.0, "target_modules": sorted(name for name in results if name in plan.modules),
        "bias": "none", "use_rslora": False, "use_dora": False, "inference_mode": True, "init_lora_weights": True,
        "fan_in_fan_out": bool(plan.fan_in_fan_out),
        "base_model_name_or_path": contributing[0].settings.base_model if contributing else None,
        "task_type": task_types.pop() if len(task_types) == 1 else None,
    }
    if any(name in plan.params for name in results):
        # The inputs' own entries: each matched exactly the parameters its adapter holds.
        config["target_parameters"] = list(dict.fromkeys(t for i in contributing for t in i.target_parameters))
    if any(res.bias is not None for res in results.values()):
        config["lora_bias"] = True
    if plan.whole and saved:
        config["modules_to_save"] = saved
    return config


def _write(folder: Path, config: dict[str, Any], results: dict[str, _Result], plan: CombinePlan,
           inputs: list[LoadedAdapter], cfg: CombineConfig) -> CheckpointWriter:
    """Write the combined factors, then the whole tensors copied from their adapters."""
    out_dtype = cfg.dtype or torch.float32
    code = dtype_code(out_dtype)
    tensors: dict[str, torch.Tensor] = {}
    nested: dict[str, list[str]] = {}  # experts module -> its combined parameters, in registration order
    for name in (n for n in plan.params if n in results):
        nested.setdefault(plan.params[name].module, []).append(plan.params[name].param)
    for name, res in results.items():
        if name in plan.params:
            param = plan.params[name]
            order = sorted(nested[param.module], key=("gate_up_proj", "down_proj").index)
            a_key, b_key = param_lora_keys(param.module, order)[param.param]
            tensors[a_key], tensors[b_key] = res.a.to(out_dtype).contiguous(), res.b.to(out_dtype).contiguous()
            continue
        keys = lora_keys(name, embedding=plan.modules[name].embedding)
        tensors[keys.a] = res.a.to(out_dtype).contiguous()
        tensors[keys.b] = res.b.to(out_dtype).contiguous()
        if res.bias is not None:
            tensors[keys.bias] = res.bias.to(out_dtype)
    specs = [TensorSpec(key, code, tuple(t.shape)) for key, t in tensors.items()]
    copies = {key: inputs[index].weights for index, key in plan.whole.values()}
    specs += [TensorSpec(key, source[key].dtype, source[key].shape) for key, source in copies.items()]
    return write_adapter(folder, config, specs, lambda key: tensors[key] if key in tensors else copies[key].read(key))

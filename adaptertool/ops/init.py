"""init: a fresh PEFT LoRA adapter for a base checkpoint, initialised as PEFT does (see
:mod:`adaptertool.adapters.init`), and for PiSSA/OLoRA the residual base it goes with.

Plan from the base's headers: which 2-D weights are targets (``all-linear``: every 2-D float weight
except embeddings and the output head, as PEFT's "all-linear"; or names matched as PEFT's
``target_modules`` list, embeddings included). A mixture-of-experts base's experts take one of two
forms (:mod:`adaptertool.ops.expert_targets`): a Linear LoRA per expert, or PEFT's target_parameters
LoRA on each fused parameter, whose ``lora_A (E*r, in)`` is drawn expert by expert as PEFT's init
draws it and ``lora_B`` is zero. Only target weights are ever read, and only when a
method needs them (PiSSA, OLoRA, DoRA's magnitudes). PiSSA/OLoRA stream the base into
``residual_base``: each target weight becomes ``W - scaling * B @ A`` in the base's dtype, every
other tensor is copied byte for byte, and the side files come along.

The adapter's factors are held in memory until it is written (``r * (in + out)`` floats per
module, a small fraction of the model); the base never is.

adapter_config.json gets ``init_lora_weights: "gaussian"`` for the gaussian method and ``true``
otherwise. PEFT re-runs a "pissa"/"olora" initialisation whenever it loads an adapter whose config
says so, which would decompose the residual base a second time; PEFT's own PiSSA/OLoRA examples
save the initial adapter with ``init_lora_weights=True`` for that reason, and its PiSSA -> LoRA
conversion requires it.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from adaptertool.adapters.expert_lora import stack_experts
from adaptertool.adapters.experts import ExpertWeight
from adaptertool.adapters.init import (
    InitFactors,
    default_factors,
    dora_magnitude,
    embedding_factors,
    gaussian_factors,
    olora_factors,
    pissa_factors,
)
from adaptertool.adapters.lora import embedding_delta, linear_delta, lora_scaling
from adaptertool.adapters.peft_keys import lora_keys, module_order
from adaptertool.errors import InputError, OptionError
from adaptertool.io import (
    DEFAULT_MAX_SHARD_BYTES,
    FLOAT_CODES,
    Checkpoint,
    TensorSpec,
    check_output,
    dtype_code,
    open_checkpoint,
    staged_output,
    torch_dtype,
    write_adapter,
)
from adaptertool.io.hub_ids import source_name
from adaptertool.ops.expert_targets import (
    FORMS,
    ExpertPlan,
    ParamUnit,
    base_experts,
    peft_drop_notes,
    plan_experts,
    target_parameters,
)
from adaptertool.ops.measure import Stopwatch, peak_rss_bytes
from adaptertool.ops.model_files import write_model_files
from adaptertool.ops.options import check_float_dtype
from adaptertool.ops.stream import stream_checkpoint
from adaptertool.ops.targets import is_embedding, module_seed, targeted, task_type


__all__ = ["METHODS", "InitConfig", "InitReport", "init_adapter"]

METHODS = ("default", "gaussian", "pissa", "olora")
_RESIDUAL_METHODS = ("pissa", "olora")


@dataclass(frozen=True, kw_only=True)
class InitConfig:
    base: Path
    out: Path
    rank: int = 16
    alpha: float | None = None  # None: alpha = rank (scaling 1, PiSSA's recommendation)
    targets: tuple[str, ...] = ("all-linear",)  # or module names, matched as PEFT's target_modules list
    experts: str | None = None  # per-expert or fused (expert_targets); None: as the base stores them
    rslora: bool = False
    dora: bool = False
    method: str = "default"
    pissa_niter: int | None = None  # fast PiSSA: randomized SVD with this many power iterations
    residual_base: Path | None = None  # required by pissa/olora
    seed: int = 0
    dtype: torch.dtype | None = None  # adapter dtype; None: float32 (PEFT keeps adapters in float32)
    max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES  # residual base shards
    force: bool = False

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise OptionError(f"--rank must be a positive integer, not {self.rank}")
        if self.alpha is not None and not self.alpha > 0:
            raise OptionError(f"--alpha must be positive, not {self.alpha}")
        if self.method not in METHODS:
            raise OptionError(f"--method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.pissa_niter is not None and (self.method != "pissa" or self.pissa_niter < 0):
            raise OptionError("--pissa-niter takes a count >= 0 and only goes with --method pissa")
        if self.method in _RESIDUAL_METHODS and self.residual_base is None:
            raise OptionError(f"--method {self.method} moves the principal part of each weight into the adapter; "
                              "give --residual-base DIR for the base it leaves behind")
        if self.method not in _RESIDUAL_METHODS and self.residual_base is not None:
            raise OptionError(f"--residual-base only goes with --method pissa or olora; {self.method} leaves the base as it is")
        if self.residual_base is not None and self.residual_base.resolve() == self.out.resolve():
            raise OptionError("OUT and --residual-base must be different folders")
        check_float_dtype(self.dtype)
        if not self.targets:
            raise OptionError("--targets names no module")
        if self.experts not in (None, *FORMS):
            raise OptionError(f"--experts must be one of {', '.join(FORMS)}, not {self.experts!r}")

    @property
    def lora_alpha(self) -> float:
        return float(self.rank) if self.alpha is None else float(self.alpha)

    @property
    def scaling(self) -> float:
        return lora_scaling(self.lora_alpha, self.rank, rslora=self.rslora)

    @property
    def init_lora_weights(self) -> bool | str:
        return "gaussian" if self.method == "gaussian" else True


@dataclass(frozen=True, kw_only=True)
class InitReport:
    out: str
    files: list[str]
    method: str
    rank: int
    alpha: float
    scaling: float
    modules: int
    target_modules: list[str]
    adapter_bytes: int
    experts: str | None = None  # the form of the expert LoRAs: per-expert (among modules) or fused; None: no experts
    parameters: int = 0  # fused expert parameters with a target_parameters LoRA
    target_parameters: list[str] = field(default_factory=list)
    residual_base: str | None = None
    residual_files: list[str] = field(default_factory=list)
    copied: int = 0  # residual base tensors copied byte for byte
    # max over modules of ||float(stored residual) + scaling * B @ A - W||_F / ||W||_F (pissa/olora)
    reconstruction_error: float = 0.0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_bytes: int = 0


@dataclass(frozen=True)
class _Target:
    weight: str  # the base tensor holding the weight (a fused one, for an expert of a fused base)
    shape: tuple[int, ...]  # the weight's (out, in), or an embedding's (V, D)
    embedding: bool  # lora_embedding_A/B (an nn.Embedding) rather than lora_A/B
    expert: ExpertWeight | None = None  # an expert's Linear: where it is stored


def init_adapter(cfg: InitConfig, *, progress: bool = False) -> InitReport:
    """Write a fresh adapter for ``cfg.base`` to ``cfg.out`` (and the residual base for PiSSA/OLoRA).

    Raises:
        AdapterToolError: a target that matches no weight, a rank above a module's smaller side
            (PiSSA/OLoRA), an existing output without ``force``.
    """
    clock = Stopwatch()
    check_output(cfg.out, force=cfg.force, inputs=[cfg.base])
    if cfg.residual_base is not None:
        check_output(cfg.residual_base, force=cfg.force, inputs=[cfg.base, cfg.out])
    with open_checkpoint(cfg.base) as base, ExitStack() as outputs:
        notes: list[str] = []
        targets, experts = _plan_targets(base, cfg, notes)
        tensors: dict[str, torch.Tensor] = {}
        if cfg.residual_base is None:
            for module, target in tqdm(targets.items(), desc="init", disable=not progress):
                _add_module(tensors, module, _factors(base, module, target, cfg), base, target, cfg)
            error, residual_files, copied = 0.0, [], 0
        else:
            # Committed right after the adapter (the stack unwinds last); discarded if anything before fails.
            tmp = outputs.enter_context(staged_output(cfg.residual_base, force=cfg.force, inputs=[cfg.base]))
            error, residual_files, copied = _write_residual(tmp, base, targets, tensors, cfg, progress=progress)
        params = experts.params if experts is not None else ()
        for unit in params:
            tensors[unit.a_key], tensors[unit.b_key] = _param_factors(unit, cfg)
        config = _adapter_config(cfg, base, targets, experts)
        specs = [TensorSpec(key, dtype_code(t.dtype), tuple(t.shape)) for key, t in tensors.items()]
        with staged_output(cfg.out, force=cfg.force, inputs=[cfg.base]) as tmp:
            writer = write_adapter(tmp, config, specs, tensors.__getitem__)
    if any(t.embedding for t in targets.values()) and cfg.method != "default":
        notes.append(f"embedding modules get PEFT's embedding init (A = 0, B ~ N(0, 1)) whatever the method; "
                     f"{cfg.method} applies to the Linear modules")
    return InitReport(
        out=str(cfg.out), files=[f.name for f in writer.files], method=_method_name(cfg), rank=cfg.rank,
        alpha=cfg.lora_alpha, scaling=cfg.scaling, modules=len(targets),
        target_modules=sorted(config["target_modules"], key=module_order),
        adapter_bytes=writer.total_bytes, experts=experts.form if experts is not None else None,
        parameters=len(params), target_parameters=list(config.get("target_parameters", [])),
        residual_base=None if cfg.residual_base is None else str(cfg.residual_base),
        residual_files=residual_files, copied=copied, reconstruction_error=error, notes=notes,
        seconds=clock.seconds, peak_rss_bytes=peak_rss_bytes(),
    )


def _method_name(cfg: InitConfig) -> str:
    return f"pissa_niter_{cfg.pissa_niter}" if cfg.pissa_niter is not None else cfg.method


def _plan_targets(base: Checkpoint, cfg: InitConfig, notes: list[str]) -> tuple[dict[str, _Target], ExpertPlan | None]:
    """{module: target} in base order, then the experts in their per-expert form; and the expert plan.

    "all-linear" means PEFT's: every Linear but the output head, experts included (expert_targets).
    """
    experts = plan_experts(base_experts(base), cfg.experts, cfg.targets, source=str(cfg.base))
    named = tuple(t for t in cfg.targets if t != "all-linear")
    stored = experts.stored if experts is not None else frozenset()
    moved = experts.moved_names if experts is not None else ()
    targets: dict[str, _Target] = {}
    left_out: list[str] = []
    for name in base:
        module, _, part = name.rpartition(".")
        info = base[name]
        if part != "weight" or len(info.shape) != 2 or info.dtype not in FLOAT_CODES or name in stored:
            continue
        if not targeted(module, cfg.targets) or (experts is not None and module in experts.not_linear
                                                  and not targeted(module, named)):
            continue
        if experts is not None and experts.form == "fused" and module.rpartition(".")[2] in moved:
            if targeted(module, named):
                raise InputError(_moved_message(cfg, experts, module))
            left_out.append(module)
            continue
        targets[module] = _Target(name, info.shape, embedding=is_embedding(module))
    for unit in experts.units if experts is not None else ():
        targets[unit.module] = _Target(unit.where.tensor, unit.where.shape, embedding=False, expert=unit.where)
    _check_targets(base, cfg, targets, experts)
    if left_out:
        notes.append(f"{len(left_out)} Linears named {'/'.join(moved)} outside the experts (e.g. {left_out[0]}) are left "
                     "out: PEFT 0.21 on transformers 5 moves target_modules of those names onto the fused experts, so it "
                     "could not load their LoRAs beside these; --experts per-expert adapts them (for transformers 4)")
    if experts is not None:
        notes += peft_drop_notes(experts, [m for m, t in targets.items() if t.expert is None])
    return targets, experts


def _check_targets(base: Checkpoint, cfg: InitConfig, targets: dict[str, _Target], experts: ExpertPlan | None) -> None:
    units = [u.module for u in experts.units] + [p.path for p in experts.params] if experts is not None else []
    for target in cfg.targets:
        if target == "experts" and not units:
            raise OptionError(f"{cfg.base}: --targets experts, but the base has no experts (by its config.json and "
                              "tensor names)")
        if target not in ("all-linear", "experts") and not any(targeted(m, (target,)) for m in [*targets, *units]):
            raise OptionError(f"{cfg.base}: --targets {target} matches no 2-D float weight; check the module names (e.g. q_proj)")
    if not targets and not units:
        raise InputError(f"{cfg.base}: holds no 2-D float weight to put a LoRA on; is it a model checkpoint?")
    needs_weights = cfg.method in _RESIDUAL_METHODS or cfg.dora
    what = f"--method {cfg.method}" if cfg.method in _RESIDUAL_METHODS else "--dora"
    if needs_weights and experts is not None and experts.params:
        per_expert = all(layer.layout == "per-expert" for layer in experts.layout.layers)
        raise InputError(f"{cfg.base}: {what} is not defined for PEFT's target_parameters LoRAs on fused experts "
                         f"({experts.params[0].path}); {'use --experts per-expert, or ' if per_expert else ''}"
                         "leave the experts out of --targets")
    fused = next((m for m, t in targets.items() if t.expert is not None and t.expert.expert is not None), None)
    if needs_weights and fused is not None:
        raise InputError(f"{cfg.base}: {what} on {fused} needs its weight as a tensor of its own, but the base "
                         f"fuses its experts ({targets[fused].weight}); leave the experts out of --targets")
    if cfg.method in _RESIDUAL_METHODS:
        for module, target in targets.items():
            smaller = min(target.shape)
            if not target.embedding and cfg.rank > smaller:
                raise OptionError(f"{cfg.base}: --rank {cfg.rank} exceeds the smaller side ({smaller}) of {target.weight}; "
                                  f"{cfg.method} needs rank <= min(out, in)")


def _moved_message(cfg: InitConfig, experts: ExpertPlan, module: str) -> str:
    return (f"{cfg.base}: --targets names {module}, but PEFT 0.21 on transformers 5 moves target_modules named "
            f"{'/'.join(experts.moved_names)} onto the fused experts of a {experts.layout.model_type} model, so it could "
            "not load that LoRA beside them; use --experts per-expert (for transformers 4), or leave it out")


def _factors(base: Checkpoint, module: str, target: _Target, cfg: InitConfig, *,
             weight: torch.Tensor | None = None) -> InitFactors:
    """The module's initial factors; reads the weight (unless given) only when the method needs it."""
    generator = torch.Generator().manual_seed(module_seed(cfg.seed, module))
    rows, cols = target.shape
    if target.embedding:
        return embedding_factors(rows, cols, cfg.rank, generator=generator)
    if cfg.method == "default":
        return default_factors(rows, cols, cfg.rank, generator=generator)
    if cfg.method == "gaussian":
        return gaussian_factors(rows, cols, cfg.rank, generator=generator)
    weight = base.read(target.weight) if weight is None else weight
    if cfg.method == "olora":
        return olora_factors(weight, cfg.rank, cfg.scaling)
    return pissa_factors(weight, cfg.rank, cfg.scaling, niter=cfg.pissa_niter, generator=generator)


def _param_factors(unit: ParamUnit, cfg: InitConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """A fused parameter's ``(lora_A (E*r, in), lora_B (out, E*r))``: each expert's A drawn as PEFT
    draws the stacked one (kaiming-uniform's bound depends on ``in`` alone; gaussian's std is 1/r of
    the per-expert rank), B zero."""
    generator = torch.Generator().manual_seed(module_seed(cfg.seed, unit.path))
    draw = gaussian_factors if cfg.method == "gaussian" else default_factors
    out_features, in_features = unit.shape
    factors = [draw(out_features, in_features, cfg.rank, generator=generator) for _ in range(unit.layer.experts)]
    a, b = stack_experts([(f.a, f.b) for f in factors])
    out_dtype = cfg.dtype or torch.float32
    return a.to(out_dtype), b.to(out_dtype)


def _add_module(tensors: dict[str, torch.Tensor], module: str, factors: InitFactors, base: Checkpoint,
                target: _Target, cfg: InitConfig, *, stored: torch.Tensor | None = None) -> None:
    """Add one module's adapter tensors; ``stored`` is the weight the adapter will sit on, when already read."""
    out_dtype = cfg.dtype or torch.float32
    keys = lora_keys(module, embedding=target.embedding)
    a = tensors[keys.a] = factors.a.to(out_dtype)
    b = tensors[keys.b] = factors.b.to(out_dtype)
    if cfg.dora:
        # As PEFT computes it when it creates the layer: from the factors (as stored) on the weight
        # the adapter sits on (the stored residual for PiSSA/OLoRA), so the adapter starts as a no-op.
        delta = embedding_delta(a, b, cfg.scaling) if target.embedding else linear_delta(a, b, cfg.scaling)
        weight = stored if stored is not None else base.read(target.weight)
        tensors[keys.magnitude] = dora_magnitude(weight, delta, dim=0 if target.embedding else 1).to(out_dtype)


def _write_residual(tmp: Path, base: Checkpoint, targets: dict[str, _Target], tensors: dict[str, torch.Tensor],
                    cfg: InitConfig, *, progress: bool) -> tuple[float, list[str], int]:
    """Stream ``base`` into ``tmp`` with every target weight replaced by its residual; fill ``tensors``.

    Returns (reconstruction error, residual files, tensors copied byte for byte).
    """
    by_weight = {t.weight: module for module, t in targets.items()}
    worst = 0.0

    def residual(spec: TensorSpec) -> torch.Tensor | None:
        nonlocal worst
        module = by_weight.get(spec.name)
        if module is None:
            return None
        weight = base.read(spec.name)
        factors = _factors(base, module, targets[module], cfg, weight=weight)
        stored = weight if factors.residual is None else factors.residual.to(torch_dtype(spec.dtype))
        _add_module(tensors, module, factors, base, targets[module], cfg, stored=stored)
        worst = max(worst, _reconstruction_error(weight, stored, factors, cfg.scaling, targets[module]))
        return stored

    done = stream_checkpoint(base, tmp, base.specs(), max_shard_bytes=cfg.max_shard_bytes,
                             metadata={**base.metadata, "format": "pt"}, produce=residual, desc=cfg.method,
                             progress=progress)
    write_model_files(base.root, tmp)
    return worst, sorted(p.name for p in tmp.iterdir()), done.copied


def _reconstruction_error(weight: torch.Tensor, residual: torch.Tensor, factors: InitFactors, scaling: float,
                          target: _Target) -> float:
    """||float(residual) + scaling * B @ A - W||_F / ||W||_F: what storing the residual rounded off."""
    delta = (embedding_delta(factors.a, factors.b, scaling) if target.embedding
             else linear_delta(factors.a, factors.b, scaling))
    original = weight.float()
    norm = float(original.norm())
    return float((residual.float() + delta - original).norm()) / norm if norm else 0.0


def _adapter_config(cfg: InitConfig, base: Checkpoint, targets: dict[str, _Target],
                    experts: ExpertPlan | None) -> dict[str, object]:
    named = {t for t in cfg.targets if t not in ("all-linear", "experts") and any(targeted(m, (t,)) for m in targets)}
    if "all-linear" in cfg.targets:
        # PEFT saves the expanded list: the short names of the Linear modules it wrapped.
        names = sorted({m.rpartition(".")[2] for m in targets} | named)
    else:
        names = sorted(named | _expert_names(base, targets, experts, named) if "experts" in cfg.targets else named)
    alpha = cfg.lora_alpha
    config: dict[str, object] = {
        "peft_type": "LORA", "r": cfg.rank, "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "target_modules": names, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": cfg.rslora, "use_dora": cfg.dora, "init_lora_weights": cfg.init_lora_weights,
        "inference_mode": True,
        # PiSSA/OLoRA adapters belong on the residual base: point loaders (AutoPeftModel) at it.
        "base_model_name_or_path": str(cfg.residual_base) if cfg.residual_base is not None else source_name(cfg.base),
        "task_type": task_type(base),
    }
    if experts is not None and experts.params:
        config["target_parameters"] = target_parameters(experts.params, experts.layout)
    return config


def _expert_names(base: Checkpoint, targets: dict[str, _Target], experts: ExpertPlan | None,
                  named: set[str]) -> set[str]:
    """target_modules entries for the per-expert modules that ``--targets experts`` alone reaches: their
    short names, or their full names where a Linear outside the experts has that short name too."""
    untargeted = {n.rpartition(".")[2] for n in (name.rpartition(".")[0] for name in base) if n not in targets}
    units = [u.module for u in experts.units] if experts is not None else []
    return {m if (short := m.rpartition(".")[2]) in untargeted else short
            for m in units if not any(targeted(m, (t,)) for t in named)}

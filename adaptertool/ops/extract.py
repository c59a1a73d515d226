"""extract: a PEFT LoRA adapter approximating a full fine-tune, by truncated SVD of each weight delta.

Plan from both headers (:mod:`adaptertool.ops.extract_plan`: same tensor names and shapes, float
dtypes may differ; each tensor's role), then stream the two checkpoints in step, one module at a time: ``delta = float32(tuned) - float32(base)``, skip it when
it is exactly zero, else keep the rank the policy picks (see :mod:`adaptertool.adapters.svd`).
Ranks are only known after the SVDs, but the writer lays out its header first, so the factors go to
an anonymous spool file as they are made and are copied into the adapter at the end: memory holds
one module's tensors at a time, never the whole adapter.

The adapter has ``r == lora_alpha`` (scaling 1, no rsLoRA); modules whose rank differs from the most
common one get ``rank_pattern`` and ``alpha_pattern`` entries. Changed biases of extracted modules go
to ``lora_B.bias`` with ``lora_bias: true``; changed embeddings / lm_head are saved whole as
``modules_to_save`` (never when unchanged), and a tied head is saved beside a changed embedding;
changed norms (modules holding only 1-D tensors) are saved whole as ``modules_to_save`` too (``norms``);
``--embeddings lora`` factors them instead: the head as a Linear LoRA, input embeddings as PEFT's
embedding LoRA (``lora_embedding_A`` (r, vocab), ``lora_embedding_B`` (dim, r), the transpose of a
Linear's layout). GPT-2's Conv1D weights are stored (in, out): they are factored transposed and the
adapter says ``fan_in_fan_out``. A mixture-of-experts fine-tune's experts become a LoRA per expert
(default, in either layout of the base) or PEFT target_parameters LoRAs on the fused
parameters (``experts="fused"``; :mod:`adaptertool.ops.extract_experts`); the report groups them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from adaptertool.adapters.peft_config import uniform_scaling
from adaptertool.adapters.peft_keys import PEFT_PREFIX, lora_keys, module_order
from adaptertool.adapters.svd import RankPolicy, break_even_rank, factor_delta, rounding_noise_std
from adaptertool.errors import InputError, OptionError
from adaptertool.io import (
    Checkpoint,
    TensorSource,
    CheckpointWriter,
    TensorSpec,
    TensorSpool,
    check_output,
    open_checkpoint,
    staged_output,
    write_adapter,
)
from adaptertool.io.hub_ids import source_name
from adaptertool.ops.expert_targets import FORMS, ExpertUnit, ParamUnit, peft_drop_notes, target_parameters
from adaptertool.ops.extract_experts import ExpertGroupReport, factor_experts, group_reports
from adaptertool.ops.extract_report import Spectrum, check_report_path, wants_html, write_report
from adaptertool.ops.extract_plan import (
    TIED_INPUTS,
    ExtractPlan,
    changed,
    dropped_notes,
    dtype_notes,
    plan_extract,
    rank_notes,
    same_values,
)
from adaptertool.ops.measure import Stopwatch, peak_rss_bytes
from adaptertool.ops.options import SvdSettings, check_device, check_float_dtype, resolve_device
from adaptertool.ops.quantized import open_quantized_view, read_values
from adaptertool.ops.targets import module_seed, task_type

__all__ = ["ExtractConfig", "ExtractReport", "ModuleReport", "extract"]

_EMBEDDING_MODES = ("auto", "skip", "save", "lora")


@dataclass(frozen=True, kw_only=True)
class ExtractConfig:
    base: Path
    tuned: Path
    out: Path
    rank: int = 16
    energy: float | None = None  # per-module retained-energy target in (0, 1]
    auto_rank: bool = False  # keep singular values above the bf16/fp16 rounding-noise edge
    max_rank: int | None = None  # global cap; None: rank (fixed) or 128 (energy / auto)
    targets: tuple[str, ...] = ("all-linear",)  # or module names, matched as PEFT's target_modules list
    experts: str | None = None  # per-expert or fused (expert_targets); None: per-expert (fused for gpt-oss)
    svd: str = "randomized"  # these three make svd_settings (options.SvdSettings says why 6 and 16)
    niter: int = 6
    oversample: int = 16
    embeddings: str = "auto"  # auto/save: modules_to_save when changed; skip: never; lora: factored
    norms: bool = True  # changed norm modules (only 1-D tensors) saved whole as modules_to_save
    report: Path | None = None  # also write the report here: a page for a name ending .html/.htm, else JSON
    device: str = "cpu"
    seed: int = 0
    dtype: torch.dtype | None = None  # factor dtype; None: float32
    force: bool = False

    def __post_init__(self) -> None:
        self.policy()  # validates rank, energy, max_rank
        self.svd_settings  # validates svd, niter, oversample
        if self.embeddings not in _EMBEDDING_MODES:
            raise OptionError(f"--embeddings must be one of {', '.join(_EMBEDDING_MODES)}, not {self.embeddings!r}")
        check_device(self.device)
        check_float_dtype(self.dtype)
        if not self.targets:
            raise OptionError("--targets names no module")
        if self.experts not in (None, *FORMS):
            raise OptionError(f"--experts must be one of {', '.join(FORMS)}, not {self.experts!r}")

    def policy(self) -> RankPolicy:
        return RankPolicy(rank=self.rank, energy=self.energy, auto=self.auto_rank, max_rank=self.max_rank)

    @property
    def svd_settings(self) -> SvdSettings:
        return SvdSettings(method=self.svd, niter=self.niter, oversample=self.oversample)


@dataclass(frozen=True, kw_only=True)
class ModuleReport:
    module: str
    shape: list[int]  # [out, in]
    rank: int
    retained: float  # sum S_r^2 / ||delta||_F^2
    rel_error: float  # ||delta - B A||_F / ||delta||_F
    delta_norm: float  # ||delta||_F
    capped: bool  # the rank rule wanted more than --max-rank or the break-even point allowed
    bias: bool = False
    size_capped: bool = False  # capped at the break-even point: a higher rank would not be smaller than the delta
    noise_floor: float = 0.0  # rel_error that the tuned side's bf16/fp16 rounding alone leaves (an estimate)
    expert: int | None = None  # an expert's LoRA: its number (fused form: of the parameter ``module``, whose rank it has)
    group: str | None = None  # the experts reported together: model.layers.0.mlp.experts.*.gate_proj, or the parameter


@dataclass(frozen=True, kw_only=True)
class NormReport:
    """A changed norm module saved whole (modules_to_save)."""

    module: str
    tensors: list[str]
    rel_change: float  # ||tuned - base||_F / ||base||_F over the module's tensors
    bytes: int


@dataclass(frozen=True, kw_only=True)
class ExtractReport:
    out: str
    files: list[str]
    svd: str
    device: str
    rank: int  # the adapter's r (= lora_alpha); other ranks are in rank_pattern
    modules: list[ModuleReport]
    unchanged: list[str]  # targeted modules skipped because tuned == base
    modules_to_save: list[str]  # every module saved whole: embeddings / head and the norms
    norms: list[NormReport]  # the changed norm modules among them
    retained: float  # whole model: sum of kept energy / sum of delta energy, over extracted modules
    rel_error: float
    noise_floor: float  # whole-model rel_error that 16-bit rounding of TUNED alone leaves (0 for float32)
    adapter_bytes: int
    delta_bytes: int  # the extracted modules' deltas and the tensors saved whole, at the tuned checkpoint's dtype
    experts: str | None = None  # the form of the expert LoRAs (per-expert or fused); None: no experts
    expert_groups: list[ExpertGroupReport] = field(default_factory=list)  # per layer and projection / parameter
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_bytes: int = 0


def extract(cfg: ExtractConfig, *, progress: bool = False) -> ExtractReport:
    """Extract a LoRA adapter ``cfg.out`` approximating ``cfg.tuned - cfg.base``.

    Raises:
        AdapterToolError: checkpoints of different architectures or shapes, no module to extract
            (identical models), or an unusable option.
    """
    clock = Stopwatch()
    device = resolve_device(cfg.device)
    out_dtype = cfg.dtype or torch.float32
    # Refuse an existing OUT now, not after minutes of SVDs (staged_output checks again at the end).
    check_output(cfg.out, force=cfg.force, inputs=[cfg.base, cfg.tuned])
    if cfg.report is not None:
        check_report_path(cfg.report, out=cfg.out, inputs=[cfg.base, cfg.tuned])
    # The page draws the singular values the SVDs computed anyway; only it needs them kept.
    spectra: dict[str, Spectrum] | None = {} if wants_html(cfg.report) else None
    with open_checkpoint(cfg.base) as stored, open_checkpoint(cfg.tuned) as tuned:
        # A quantised BASE (FP8, MXFP4, 4-bit) counts as the model it encodes: deltas against its values.
        view = open_quantized_view(stored)
        base = stored if view is None else view
        plan = plan_extract(base, tuned, cfg)
        notes = dtype_notes(base, tuned)
        if view is not None:
            kinds = " and ".join(f"{n} {scheme.upper()}" for scheme, n in sorted(view.schemes().items()))
            notes.append(f"BASE holds {kinds} weights: deltas are taken against their dequantised values")
        with TensorSpool(cfg.out.resolve().parent) as spool:
            modules, unchanged, delta_bytes = _factor_all(base, tuned, plan, cfg, spool, device=device,
                                                          out_dtype=out_dtype, progress=progress, spectra=spectra)

            def factor(base_weight: torch.Tensor, tuned_weight: torch.Tensor,
                       key: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]] | None:
                return _factor_module(base_weight, tuned_weight, key, cfg, device=device, transpose=False,
                                      factor_bytes=out_dtype.itemsize, spectra=spectra)

            experts, idle, expert_bytes, params = factor_experts(base, tuned, plan, spool, factor, out_dtype=out_dtype)
            units = plan.units
            modules = [_in_group(m, units) for m in modules]
            modules += [ModuleReport(module=f.module, shape=f.shape, expert=f.expert, group=f.group, **f.figures)
                        for f in experts]
            unchanged += idle
            delta_bytes += expert_bytes
            saved, norms = _saved_whole(base, tuned, plan, cfg, notes, extracted=bool(modules))
            # What a dense delta would hold too: the tensors saved whole (a tied head's once).
            delta_bytes += sum(tuned[src].nbytes for src in set(saved.values()))
            notes += rank_notes(modules, tuned, plan, cfg, out_dtype)
            config = _adapter_config(cfg, base, plan, modules, saved, params)
            if plan.experts is not None:
                notes += peft_drop_notes(plan.experts, [m.module for m in modules if m.group is None])
            with staged_output(cfg.out, force=cfg.force, inputs=[cfg.base, cfg.tuned]) as tmp:
                writer = _write_adapter(tmp, config, spool, tuned, {PEFT_PREFIX + key: src for key, src in saved.items()})
    kept_energy = sum(m.retained * m.delta_norm**2 for m in modules)
    total = sum(m.delta_norm**2 for m in modules)
    noise = sum((m.noise_floor * m.delta_norm) ** 2 for m in modules)
    report = ExtractReport(
        out=str(cfg.out), files=[f.name for f in writer.files], svd=cfg.svd, device=str(device), rank=int(config["r"]),
        modules=sorted(modules, key=lambda m: module_order(m.module)), unchanged=sorted(unchanged, key=module_order),
        modules_to_save=sorted(config.get("modules_to_save") or [], key=module_order),
        norms=norms, retained=kept_energy / total if total else 1.0,
        rel_error=max(0.0, 1.0 - kept_energy / total) ** 0.5 if total else 0.0,
        noise_floor=(noise / total) ** 0.5 if total else 0.0,
        adapter_bytes=writer.total_bytes, delta_bytes=delta_bytes,
        experts=plan.experts.form if plan.experts is not None else None,
        expert_groups=group_reports(modules, unchanged, plan), notes=notes,
        seconds=clock.seconds, peak_rss_bytes=peak_rss_bytes(),
    )
    if cfg.report is not None:
        write_report(cfg.report, report, spectra, policy=cfg.policy(), inputs=[cfg.base, cfg.tuned])
    return report


def _factor_all(base: TensorSource, tuned: Checkpoint, plan: ExtractPlan, cfg: ExtractConfig, spool: TensorSpool, *,
                device: torch.device, out_dtype: torch.dtype, progress: bool,
                spectra: dict[str, Spectrum] | None) -> tuple[list[ModuleReport], list[str], int]:
    """Factor every changed targeted module into ``spool``; (reports, unchanged modules, delta bytes)."""
    modules: list[ModuleReport] = []
    unchanged: list[str] = []
    delta_bytes = 0
    # PEFT's lora_bias gives every LoRA layer a lora_B.bias and warns about any not saved, so once
    # one bias changed, every extracted module carries one (zero where its bias did not change).
    # Biases are small: finding out first costs little.
    any_bias = any(changed(base, tuned, f"{m}.bias") for m in plan.linear if f"{m}.bias" in base)
    if any_bias and plan.embedding_lora:  # PEFT refuses to load lora_bias with an embedding LoRA
        raise InputError(f"{cfg.tuned}: changed biases need PEFT's lora_bias, which PEFT does not allow beside "
                         f"the embedding LoRA of {min(plan.embedding_lora)}; use --embeddings save to save it whole")
    total = sum(base[n].nbytes for n in plan.linear.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="extract", disable=not progress) as bar:
        for module, name in plan.linear.items():
            bias_name = f"{module}.bias"
            bias_changed = bias_name in base and changed(base, tuned, bias_name)
            transpose = module in plan.transposed
            factored = _factor_module(read_values(base, name), tuned.read(name), module, cfg, device=device, transpose=transpose,
                                      factor_bytes=out_dtype.itemsize, spectra=spectra)
            bar.update(base[name].nbytes)
            if factored is None and not bias_changed:
                unchanged.append(module)
                continue
            out_features, in_features = reversed(base[name].shape) if transpose else base[name].shape
            if factored is None:
                # Only the bias changed: PEFT needs a LoRA layer to carry lora_B.bias, and rank 0 is
                # invalid, so the weight gets a rank-1 zero update.
                factored = (torch.zeros(out_features, 1), torch.zeros(1, in_features),
                            {"rank": 1, "retained": 1.0, "rel_error": 0.0, "delta_norm": 0.0, "capped": False,
                             "size_capped": False, "noise_floor": 0.0})
            b, a, figures = factored
            delta_bytes += base[name].nbytes if base[name].dtype == tuned[name].dtype else tuned[name].nbytes
            keys = lora_keys(module, embedding=module in plan.embedding_lora)
            spool.add(keys.a, a.to(out_dtype))
            spool.add(keys.b, b.to(out_dtype))
            if any_bias:
                bias = (tuned.read(bias_name).float() - base.read(bias_name).float() if bias_changed
                        else torch.zeros(out_features))
                spool.add(keys.bias, bias.to(out_dtype))
            modules.append(ModuleReport(module=module, shape=[out_features, in_features], bias=bias_changed, **figures))
    return modules, unchanged, delta_bytes


def _in_group(m: ModuleReport, units: dict[str, ExpertUnit]) -> ModuleReport:
    """``m`` with its expert and group, if it is an expert's (those the Linear loop factored)."""
    unit = units.get(m.module)
    return m if unit is None else replace(m, expert=unit.expert, group=unit.group)


def _factor_module(base_weight: torch.Tensor, tuned_weight: torch.Tensor, module: str, cfg: ExtractConfig, *,
                   device: torch.device, transpose: bool, factor_bytes: int,
                   spectra: dict[str, Spectrum] | None) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]] | None:
    """(B, A, report figures) for one module's weight delta (its transpose with ``transpose``), or
    None when the weight did not change; its spectrum goes to ``spectra`` (if given) under ``module``."""
    if same_values(base_weight, tuned_weight):
        return None
    policy = cfg.policy()
    # The rounding noise of a 16-bit TUNED sets the error floor that the report explains (and the
    # --auto-rank edge); float32 noise is far below anything reported.
    sixteen_bit = tuned_weight.is_floating_point() and tuned_weight.element_size() == 2
    noise = rounding_noise_std(tuned_weight) if policy.auto or sixteen_bit else 0.0
    out_features, in_features = reversed(base_weight.shape) if transpose else base_weight.shape
    break_even = break_even_rank(out_features, in_features, factor_bytes=factor_bytes,
                                 delta_bytes=tuned_weight.element_size())
    # In place, with the 16-bit base promoted element by element: one float32 matrix, not three.
    # (tuned_weight may be that very matrix when it is float32 already; it is not used again.)
    delta = tuned_weight.to(device, torch.float32)
    delta.sub_(base_weight.to(device))
    if transpose:
        delta = delta.T  # a view: the SVD reads it strided rather than copying the matrix
    # Seeded per module from its name: its factors depend only on (seed, module), not on which
    # modules came before it or were skipped.
    generator = torch.Generator().manual_seed(module_seed(cfg.seed, module))
    f = factor_delta(delta, policy, method=cfg.svd, generator=generator, niter=cfg.niter,
                     oversample=cfg.oversample, noise_std=noise, break_even=break_even)
    if spectra is not None:
        spectra[module] = Spectrum(f.singular_values.tolist(), f.threshold)
    figures = {"rank": f.rank, "retained": f.retained, "rel_error": f.rel_error, "delta_norm": f.delta_norm,
               "capped": f.capped, "size_capped": f.size_capped, "noise_floor": f.noise_floor}
    return f.b, f.a, figures


def _saved_whole(base: TensorSource, tuned: Checkpoint, plan: ExtractPlan, cfg: ExtractConfig, notes: list[str], *,
                 extracted: bool) -> tuple[dict[str, str], list[NormReport]]:
    """The changed tensors saved whole, {adapter key without prefix: tuned tensor}, and the norm
    reports among them; appends to ``notes`` what changed but stays out.

    Raises:
        AdapterToolError: nothing to extract (``extracted`` is False and no embedding is saved).
    """
    saved = _changed_embeddings(base, tuned, plan, cfg, notes)
    changed_others = [n for n in plan.others if changed(base, tuned, n)]
    norms = _changed_norms(base, tuned, plan, set(changed_others)) if cfg.norms else []
    kept = {t for n in norms for t in n.tensors}
    notes += dropped_notes([n for n in changed_others if n not in kept], base, plan)
    if not extracted and not saved:  # norms alone make no LoRA adapter
        what = "BASE and TUNED hold identical tensors" if not changed_others else "no targeted module changed"
        raise InputError(f"{cfg.tuned}: {what}; nothing to extract (are they the same model?)")
    saved.update((t, t) for t in sorted(kept))
    return saved, norms


def _changed_embeddings(base: TensorSource, tuned: Checkpoint, plan: ExtractPlan, cfg: ExtractConfig,
                        notes: list[str]) -> dict[str, str]:
    """{adapter key without prefix: tuned tensor} for the embeddings saved as modules_to_save."""
    saved: dict[str, str] = {}
    for name in plan.embeddings:
        if not changed(base, tuned, name):
            continue
        if cfg.embeddings == "skip":
            notes.append(f"{name} changed but --embeddings skip leaves it out; the adapter will not reproduce it")
            continue
        saved[name] = name
        if plan.tied_head and name.rpartition(".")[0].endswith(TIED_INPUTS):
            # Tied weights: the tuned head is the tuned embedding. PEFT copies each module in
            # modules_to_save separately, so the head must be saved too or it keeps the old values.
            saved["lm_head.weight"] = name
            notes.append(f"{name} changed and the head is tied to it: both saved as modules_to_save")
    return saved


def _changed_norms(base: TensorSource, tuned: Checkpoint, plan: ExtractPlan, changed_names: set[str]) -> list[NormReport]:
    """The norm modules with a changed tensor, each saved whole (PEFT copies the whole module)."""
    reports = []
    for module, names in plan.norms.items():
        if not changed_names.intersection(names):
            continue
        diff = sum(float((tuned.read(n).double() - base.read(n).double()).square().sum()) for n in names)
        size = sum(float(base.read(n).double().square().sum()) for n in names)
        rel = math.sqrt(diff / size) if size else math.inf
        reports.append(NormReport(module=module, tensors=list(names), rel_change=rel,
                                  bytes=sum(tuned[n].nbytes for n in names)))
    return reports


def _adapter_config(cfg: ExtractConfig, base: TensorSource, plan: ExtractPlan, modules: list[ModuleReport],
                    saved: dict[str, str], params: list[ParamUnit]) -> dict[str, object]:
    linear = [m for m in modules if m.group != m.module]  # all but the fused parameters
    extracted = {m.module for m in linear}
    targets: list[str] = []
    for short in sorted({m.rpartition(".")[2] for m in extracted}):
        group = [m for m in plan.modules if m.rpartition(".")[2] == short]
        # A short name would also wrap the skipped (unchanged) modules, which have no weights in
        # the adapter: PEFT warns about missing keys. Name modules in full where some were skipped.
        targets += [short] if all(m in extracted for m in group) else sorted(m for m in group if m in extracted)
    # A fused parameter has one rank (its experts' reports all carry it).
    ranks = {m.module: m.rank for m in modules}
    config: dict[str, object] = {
        # r == lora_alpha for every module (patterns for the ranks that differ from r), so every
        # scaling is 1 and B @ A is the delta itself.
        "peft_type": "LORA", **uniform_scaling(ranks, default_rank=cfg.rank),
        "lora_dropout": 0.0, "target_modules": targets,
        "bias": "none", "fan_in_fan_out": bool(plan.transposed - plan.embedding_lora), "use_rslora": False, "use_dora": False, "inference_mode": True,
        "init_lora_weights": True, "base_model_name_or_path": source_name(cfg.base), "task_type": task_type(base),
    }
    if params and plan.experts is not None:
        config["target_parameters"] = target_parameters(params, plan.experts.layout)
    if any(m.bias for m in modules):
        config["lora_bias"] = True
    if saved:
        config["modules_to_save"] = sorted({key.rpartition(".")[0] for key in saved})
    return config


def _write_adapter(folder: Path, config: dict[str, object], spool: TensorSpool, tuned: Checkpoint,
                   saved: dict[str, str]) -> CheckpointWriter:
    """Write the adapter: the spooled factors, then whole tensors ``saved`` (key -> tuned tensor)."""
    specs = [*spool.specs(), *(TensorSpec(key, tuned[src].dtype, tuned[src].shape) for key, src in saved.items())]
    return write_adapter(folder, config, specs, lambda name: spool.read(name) if name in spool else tuned.read(saved[name]))

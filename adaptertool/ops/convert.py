"""convert: rewrite a PEFT adapter without a base model. Steps, applied in this order to every module:

1. ``--from-pissa INITIAL`` / ``--from-olora INITIAL``: a trained PiSSA/OLoRA adapter (A, B), which
   sits on the residual base ``W - s B0 A0``, becomes a plain LoRA over the ORIGINAL base ``W``:
   ``W_res + s B A = W + s (B A - B0 A0) = W + s [B | -B0] [A ; A0]``, so ``A' = cat(A, A0)``,
   ``B' = cat(B, -B0)`` at rank 2r. Per-module scaling is kept by doubling ``r`` and
   ``lora_alpha`` (rsLoRA: ``alpha * sqrt(2)``) and every rank/alpha pattern entry, as PEFT's
   ``path_initial_model_for_weight_conversion`` does (it refuses rsLoRA with patterns; we scale
   the alpha patterns by sqrt(2) there, which keeps each module's scaling).
2. ``--rank R`` / ``--energy F``: each module's full delta ``s B A`` (or any LoRA-family delta:
   AdaLoRA, LoHa, LoKr) is re-factored by truncated SVD with extract's rank rules; the output has
   ``r == lora_alpha`` (scaling 1), with rank/alpha patterns where ranks differ. A LoRA's delta has
   rank at most r, so a module is never given more than its current rank.
3. ``--export``: the scaling is folded into B (``B' = s B``, ``lora_B.bias' = s bias``) and every
   module is zero-padded to the largest rank, so one ``r == lora_alpha`` and no rsLoRA and no
   patterns describe the whole adapter, as llama.cpp's and vLLM's loaders expect. Each module's
   delta is unchanged.

DoRA magnitude vectors are kept through steps 1 and 2 (the PiSSA conversion reproduces the trained
DoRA model; a resized DoRA adapter rescales the approximated direction) and refused by ``--export``,
whose consumers do not read DoRA. IA3 is not additive and is refused. Full tensors
(modules_to_save) are carried over unchanged.

The adapters are read tensor by tensor; the new adapter is held in memory until it is written.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from adaptertool.adapters.lora import linear_delta
from adaptertool.adapters.modules import ModuleUpdate
from adaptertool.adapters.peft_config import uniform_scaling
from adaptertool.adapters.peft_keys import lora_keys, module_order, split_adapter_key
from adaptertool.adapters.svd import RankPolicy, factor_delta
from adaptertool.errors import InputError, OptionError
from adaptertool.io import (
    FLOAT_CODES,
    TensorSpec,
    check_output,
    dtype_code,
    staged_output,
    torch_dtype,
    write_adapter,
)
from adaptertool.ops.adapter_inputs import AdapterModule, LoadedAdapter, load_adapter, plan_adapter
from adaptertool.ops.measure import Stopwatch, peak_rss_bytes
from adaptertool.ops.options import SvdSettings, check_float_dtype
from adaptertool.ops.targets import module_seed


__all__ = ["ConvertConfig", "ConvertReport", "ModuleChange", "convert", "factor_dtype"]


@dataclass(frozen=True, kw_only=True)
class ConvertConfig:
    adapter: Path
    out: Path
    from_pissa: Path | None = None  # the PiSSA adapter as init wrote it
    from_olora: Path | None = None  # the OLoRA adapter as init wrote it
    rank: int | None = None  # resize every module to this rank
    energy: float | None = None  # or: per module, the smallest rank keeping this share of ||delta||_F^2
    max_rank: int | None = None  # cap for --energy (default 128) or --rank
    svd: str = "randomized"
    niter: int = 6  # svd, niter, oversample make svd_settings, as extract's
    oversample: int = 16
    export: bool = False
    seed: int = 0
    dtype: torch.dtype | None = None  # factor dtype; None: the adapter's
    force: bool = False

    def __post_init__(self) -> None:
        if self.from_pissa is not None and self.from_olora is not None:
            raise OptionError("--from-pissa and --from-olora both given; an adapter was initialised one way")
        if self.rank is not None and self.energy is not None:
            raise OptionError("--rank and --energy are two rank rules; choose one")
        if self.max_rank is not None and not self.resize:
            raise OptionError("--max-rank caps a resize; give --rank or --energy too")
        if self.initial is None and not self.resize and not self.export:
            raise OptionError("nothing to do: give --from-pissa/--from-olora INITIAL, --rank R (or --energy F), or --export")
        if self.resize:
            self.policy()  # validates rank, energy, max_rank
        self.svd_settings  # validates svd, niter, oversample
        check_float_dtype(self.dtype)

    @property
    def svd_settings(self) -> SvdSettings:
        return SvdSettings(method=self.svd, niter=self.niter, oversample=self.oversample)

    @property
    def initial(self) -> Path | None:
        return self.from_pissa if self.from_pissa is not None else self.from_olora

    @property
    def resize(self) -> bool:
        return self.rank is not None or self.energy is not None

    def policy(self) -> RankPolicy:
        return RankPolicy(rank=self.rank if self.rank is not None else 16, energy=self.energy, max_rank=self.max_rank)


@dataclass(frozen=True, kw_only=True)
class ModuleChange:
    module: str
    rank_in: int  # 0 where the input has no rank (LoKr)
    rank: int
    rel_error: float  # ||delta' - delta||_F / ||delta||_F; 0 for the exact steps


@dataclass(frozen=True, kw_only=True)
class ConvertReport:
    out: str
    files: list[str]
    steps: list[str]
    rank: int  # the output's r; other ranks are in rank_pattern
    alpha: float
    modules: list[ModuleChange]
    rel_error: float  # over all modules: sqrt(sum ||delta' - delta||^2 / sum ||delta||^2)
    adapter_bytes: int
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_bytes: int = 0


@dataclass
class _Module:
    """One module's LoRA in float32: delta = scaling * B @ A (transposed for embeddings/fan_in_fan_out)."""

    name: str
    embedding: bool
    a: torch.Tensor  # (r, in), or (r, V); r = 0 until a LoHa/LoKr module is re-factored
    b: torch.Tensor  # (out, r), or (D, r)
    scaling: float
    bias: torch.Tensor | None = None  # lora_B.bias
    magnitude: torch.Tensor | None = None  # DoRA
    rank_in: int = 0  # 0 for LoKr, whose factors show no rank
    error_energy: float = 0.0  # ||delta' - delta||_F^2
    energy: float = 0.0  # ||delta||_F^2
    delta_of: Callable[[], torch.Tensor] | None = None  # LoHa/LoKr: the dense delta, computed when resized

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta(self) -> torch.Tensor:
        """The float32 delta in the factors' layout (``B @ A``: (out, in), or (D, V) for an embedding)."""
        return self.delta_of() if self.delta_of is not None else linear_delta(self.a, self.b, self.scaling)


def convert(cfg: ConvertConfig, *, progress: bool = False) -> ConvertReport:
    """Convert ``cfg.adapter`` into ``cfg.out``; see the module docstring.

    Raises:
        AdapterToolError: an INITIAL adapter that does not match, a family a step cannot take
            (IA3; DoRA for --export; LoHa/LoKr without a resize), or an unusable option.
    """
    clock = Stopwatch()
    inputs = [cfg.adapter] + ([cfg.initial] if cfg.initial is not None else [])
    check_output(cfg.out, force=cfg.force, inputs=inputs)
    notes: list[str] = []
    steps: list[str] = []
    with closing(load_adapter(cfg.adapter, 1.0)) as adapter:
        full, planned = plan_adapter(adapter)
        modules = _load_modules(adapter, planned, need_factors=cfg.initial is not None or not cfg.resize)
        if cfg.initial is not None:
            steps.append("from-pissa" if cfg.from_pissa is not None else "from-olora")
            with closing(load_adapter(cfg.initial, 1.0)) as initial:
                _add_initial(modules, adapter, initial, notes)
        if cfg.resize:
            steps.append("resize")
            _resize(modules, cfg, notes, progress=progress)
        if cfg.export:
            steps.append("export")
            _export(modules, adapter, notes)
            if full:
                notes.append(f"{len(full)} full tensors (modules_to_save) kept as they are; llama.cpp's converter refuses them")
        config = _output_config(adapter, modules, cfg)
        tensors = _output_tensors(modules, cfg.dtype or factor_dtype(adapter))
        specs = [TensorSpec(key, dtype_code(t.dtype), tuple(t.shape)) for key, t in tensors.items()]
        specs += [adapter.weights[key].spec for key in full]
        with staged_output(cfg.out, force=cfg.force, inputs=inputs) as tmp:
            writer = write_adapter(tmp, config, specs, lambda k: tensors[k] if k in tensors else adapter.weights.read(k))
    energy = sum(m.energy for m in modules.values())
    error = sum(m.error_energy for m in modules.values())
    changes = [ModuleChange(module=m.name, rank_in=m.rank_in, rank=m.rank,
                            rel_error=math.sqrt(m.error_energy / m.energy) if m.energy else 0.0)
               for m in sorted(modules.values(), key=lambda m: module_order(m.name))]
    return ConvertReport(
        out=str(cfg.out), files=[f.name for f in writer.files], steps=steps, rank=int(config["r"]),
        alpha=float(config["lora_alpha"]), modules=changes, rel_error=math.sqrt(error / energy) if energy else 0.0,
        adapter_bytes=writer.total_bytes, notes=notes, seconds=clock.seconds, peak_rss_bytes=peak_rss_bytes(),
    )


def _load_modules(adapter: LoadedAdapter, planned: dict[str, AdapterModule], *, need_factors: bool) -> dict[str, _Module]:
    """Every adapted module as LoRA factors (float32), or, for LoHa/LoKr, a delta computed on demand."""
    if not planned:
        raise InputError(f"{adapter.path}: holds no adapter module (only full tensors); there is nothing to convert")
    modules: dict[str, _Module] = {}
    for name, module in planned.items():
        update = module.update
        read = {part: adapter.weights.read(key) for part, key in update.keys.items()}
        if update.kind == "ia3":
            raise InputError(f"{adapter.path}: module {name} is IA3, which rescales weights instead of adding a delta; "
                             "convert takes LoRA-family adapters only")
        if update.kind in ("lora", "lora_embedding", "adalora"):
            modules[name] = _lora_module(name, update.kind, read, update.scaling)
        elif need_factors:
            raise InputError(f"{adapter.path}: module {name} is {update.kind.upper()}, not LoRA factors; re-factor it "
                             "as a LoRA with --rank R (or --energy F) first")
        else:
            modules[name] = _Module(name, False, torch.empty(0), torch.empty(0), 1.0,
                                    delta_of=_dense_delta(update, read))
        modules[name].magnitude = read["lora_magnitude_vector"].float() if "lora_magnitude_vector" in read else None
    return modules


def _lora_module(name: str, kind: str, read: dict[str, torch.Tensor], scaling: float) -> _Module:
    if kind == "adalora":
        # B @ (A * E) * scaling / (r + 1e-5): the same delta as LoRA factors (A * E, B) at that scaling.
        a, b = read["lora_A"].float() * read["lora_E"].float(), read["lora_B"].float()
        rank = a.shape[0]
        scaling = float(torch.tensor(scaling, dtype=torch.float32) / (torch.tensor(float(rank)) + 1e-5))
        return _Module(name, False, a, b, scaling, rank_in=rank)
    embedding = kind == "lora_embedding"
    a = read["lora_embedding_A" if embedding else "lora_A"].float()
    b = read["lora_embedding_B" if embedding else "lora_B"].float()
    bias = read["lora_B.bias"].float() if "lora_B.bias" in read else None
    return _Module(name, embedding, a, b, scaling, bias=bias, rank_in=a.shape[0])


def _dense_delta(update: ModuleUpdate, read: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    # ModuleUpdate.delta is in the base weight's layout; the factors' layout is its transpose under fan_in_fan_out.
    return lambda: update.delta(read).T.contiguous() if update.fan_in_fan_out else update.delta(read)


def _add_initial(modules: dict[str, _Module], adapter: LoadedAdapter, initial: LoadedAdapter, notes: list[str]) -> None:
    """PiSSA/OLoRA -> LoRA over the original base: ``A' = cat(A, A0)``, ``B' = cat(B, -B0)``, same scaling."""
    for opened in (adapter, initial):
        if opened.settings.peft_type != "LORA":
            raise InputError(f"{opened.path}: is {opened.settings.peft_type}; PiSSA/OLoRA adapters are LORA")
    start = _load_modules(initial, plan_adapter(initial)[1], need_factors=True)
    extra = sorted(set(modules) ^ set(start))
    if extra:
        owner = initial.path if extra[0] in start else adapter.path
        raise InputError(f"{owner}: only this adapter has module {extra[0]}; is INITIAL the adapter {adapter.path} "
                         "was trained from?")
    for name, m in modules.items():
        m0 = start[name]
        if (m0.a.shape, m0.b.shape, m0.embedding) != (m.a.shape, m.b.shape, m.embedding):
            raise InputError(f"{initial.path}: module {name} has factors {list(m0.a.shape)}/{list(m0.b.shape)} but "
                             f"{list(m.a.shape)}/{list(m.b.shape)} in {adapter.path}; is INITIAL the right adapter?")
        if not math.isclose(m0.scaling, m.scaling, rel_tol=1e-6):
            raise InputError(f"{initial.path}: module {name} has scaling {m0.scaling:g} but {m.scaling:g} in "
                             f"{adapter.path}; the adapters must share r, lora_alpha and use_rslora")
        m.a = torch.cat([m.a, m0.a], dim=0)  # (2r, in)
        m.b = torch.cat([m.b, -m0.b], dim=1)  # (out, 2r)
    if adapter.settings.base_model:
        notes.append(f"base_model_name_or_path is kept ({adapter.settings.base_model}); the converted adapter belongs on "
                     "the ORIGINAL base, so edit it if it names the residual base")
    if adapter.settings.rslora and adapter.settings.alpha_pattern:
        notes.append("rsLoRA with alpha_pattern: alpha patterns scaled by sqrt(2) to keep each scaling (PEFT refuses this case)")


def _resize(modules: dict[str, _Module], cfg: ConvertConfig, notes: list[str], *, progress: bool) -> None:
    """Re-factor every module's delta by truncated SVD (scaling 1): the optimal rank-r approximation."""
    policy = cfg.policy()
    kept = capped = zero = 0
    for m in tqdm(list(modules.values()), desc="resize", disable=not progress):
        delta = m.delta()
        m.energy = float(torch.linalg.vector_norm(delta, dtype=torch.float64)) ** 2
        if m.bias is not None:
            m.bias = m.bias * m.scaling
        if m.energy == 0.0:  # an untrained (B = 0) module: PEFT has no rank 0, so keep rank 1 of zeros
            m.a, m.b, m.scaling = torch.zeros(1, delta.shape[1]), torch.zeros(delta.shape[0], 1), 1.0
            zero += 1
            continue
        rule = policy
        if m.rank_in and (policy.adaptive or policy.rank > m.rank_in):
            # A LoRA's delta has rank <= r_in: triplets past it are rounding noise.
            kept += not policy.adaptive
            rule = RankPolicy(rank=min(policy.rank, m.rank_in), energy=policy.energy,
                              max_rank=min(m.rank_in, policy.ceiling))
        generator = torch.Generator().manual_seed(module_seed(cfg.seed, m.name))
        f = factor_delta(delta, rule, method=cfg.svd, generator=generator, niter=cfg.niter, oversample=cfg.oversample)
        capped += not rule.adaptive and f.rank < rule.rank
        m.a, m.b, m.scaling = f.a, f.b, 1.0
        m.error_energy = f.rel_error**2 * m.energy
    if kept:
        notes.append(f"{kept} modules keep their rank, which is below --rank {cfg.rank}: a LoRA's delta has rank <= r")
    if any(m.magnitude is not None for m in modules.values()):
        notes.append("DoRA magnitude vectors kept as they are: the merge rescales the approximated direction to them")
    if zero:
        notes.append(f"{zero} modules have a zero delta (untrained: B = 0) and are kept as rank-1 zeros")
    if capped:
        notes.append(f"{capped} modules capped below the break-even rank out*in/(out+in), where LoRA stops saving space")


def _export(modules: dict[str, _Module], adapter: LoadedAdapter, notes: list[str]) -> None:
    """Fold each scaling into B and zero-pad every module to the largest rank: scaling 1 everywhere."""
    dora = next((m.name for m in modules.values() if m.magnitude is not None), None)
    if dora is not None:
        raise InputError(f"{adapter.path}: module {dora} is DoRA, which the loaders --export targets do not read "
                         "(llama.cpp refuses it); merge the adapter into its base instead")
    top = max(m.rank for m in modules.values())
    padded = 0
    for m in modules.values():
        b = m.b * m.scaling
        if m.bias is not None:
            m.bias = m.bias * m.scaling
        missing = top - m.rank
        if missing:
            padded += 1
            m.a = torch.cat([m.a, torch.zeros(missing, m.a.shape[1])], dim=0)  # zero rows add nothing to B @ A
            b = torch.cat([b, torch.zeros(b.shape[0], missing)], dim=1)
        m.b, m.scaling = b, 1.0
    if padded:
        notes.append(f"{padded} modules of lower rank zero-padded to r={top}: the export form has one rank for all modules")


def _output_config(adapter: LoadedAdapter, modules: dict[str, _Module], cfg: ConvertConfig) -> dict[str, Any]:
    settings = adapter.settings
    if settings.peft_type == "LORA":
        config = dict(adapter.config)
    else:  # a LoHa/LoKr/AdaLoRA adapter re-factored as a LoRA: PEFT list semantics, full module names
        config = {k: adapter.config[k] for k in ("base_model_name_or_path", "revision", "task_type", "modules_to_save")
                  if k in adapter.config}
        config.update(peft_type="LORA", target_modules=sorted(modules), lora_dropout=0.0, bias="none",
                      fan_in_fan_out=settings.fan_in_fan_out, use_dora=False)
    if cfg.initial is not None and not (cfg.resize or cfg.export):
        # Twice the rank and the alpha that keeps each scaling: alpha/r -> 2alpha/2r, alpha/sqrt(r) -> sqrt(2)alpha/sqrt(2r).
        factor = math.sqrt(2) if settings.rslora else 2.0
        config["r"] = 2 * settings.rank
        config["lora_alpha"] = _number(settings.alpha * factor)
        if settings.rank_pattern:
            config["rank_pattern"] = {k: 2 * v for k, v in settings.rank_pattern.items()}
        if settings.alpha_pattern:
            config["alpha_pattern"] = {k: _number(v * factor) for k, v in settings.alpha_pattern.items()}
    if cfg.resize or cfg.export:
        # Every module now has scaling 1; the input's patterns described the old ranks and scalings.
        config.pop("rank_pattern", None)
        config.pop("alpha_pattern", None)
        # Never empty: _load_modules refuses an adapter without modules, so the default is unused.
        ranks = {m.name: m.rank for m in modules.values()}
        config.update(uniform_scaling(ranks, default_rank=1), use_rslora=False)
    # The factors are what they are: loading must not re-run a PiSSA/OLoRA decomposition on the base.
    config.update(init_lora_weights=True, inference_mode=True)
    return config


def _output_tensors(modules: dict[str, _Module], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for m in modules.values():
        keys = lora_keys(m.name, embedding=m.embedding)
        tensors[keys.a] = m.a.contiguous().to(dtype)
        tensors[keys.b] = m.b.contiguous().to(dtype)
        if m.bias is not None:
            tensors[keys.bias] = m.bias.to(dtype)
        if m.magnitude is not None:
            tensors[keys.magnitude] = m.magnitude.to(dtype)
    return tensors


def factor_dtype(adapter: LoadedAdapter) -> torch.dtype:
    """The dtype of the adapter's first factor tensor: the output keeps it unless --dtype says otherwise."""
    key = next(k for k in adapter.weights if split_adapter_key(k) is not None)
    code = adapter.weights[key].dtype
    return torch_dtype(code if code in FLOAT_CODES else "F32")


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value

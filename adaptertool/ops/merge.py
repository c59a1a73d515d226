"""merge and subtract: fold PEFT adapters into (or out of) a base checkpoint, streamed tensor by tensor.

Plan from headers: every adapter module is mapped to its base tensor and every shape checked, and
adapter tensors are scanned for NaN/Inf, before a byte is written. Then the base streams through:
each changed tensor is read once, updated in float32 by every adapter in order, and rounded once to
the output dtype; every other tensor is copied byte for byte (or cast, with ``dtype``).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adaptertool.adapters.lora import merge_linear_into
from adaptertool.errors import InputError, OptionError
from adaptertool.io import (
    DEFAULT_MAX_SHARD_BYTES,
    TensorSource,
    TensorSpec,
    TensorSpool,
    cast_specs,
    check_output,
    code_of_name,
    dtype_code,
    dtype_name,
    is_adapter,
    open_checkpoint,
    scratch_prefix,
    staged_output,
    torch_dtype,
)
from adaptertool.io.hub_ids import source_name
from adaptertool.ops.adapter_inputs import LoadedAdapter, load_adapter
from adaptertool.ops.quantized import QuantizedView, model_config, open_quantized_view, read_quantized_state, read_values
from adaptertool.ops.measure import Stopwatch, peak_rss_bytes
from adaptertool.ops.merge_plan import MergePlan, ReplaceStep, Step, Target, UpdateStep, plan_targets
from adaptertool.ops.merge_experts import apply_expert_step, expert_lora_factors, merge_fused
from adaptertool.ops.merge_plan import ExpertStep, fused_target
from adaptertool.ops.model_files import write_model_files
from adaptertool.ops.options import check_device, check_finite_numbers, check_float_dtype, resolve_device
from adaptertool.ops.stream import Produce, SpooledGroups, stream_checkpoint
from adaptertool.quant import (
    QUANT_TYPES,
    Fp8Scheme,
    Mxfp4Weight,
    QuantizedKeys,
    find_quantized_weights,
    requantize_fp8,
    requantize_mxfp4,
)


__all__ = ["MergeConfig", "MergeReport", "merge", "subtract"]

_PROVENANCE = "adaptertool."  # prefix of the metadata keys recording a merge's inputs


@dataclass(frozen=True, kw_only=True)
class MergeConfig:
    base: Path
    adapters: tuple[tuple[Path, float], ...]  # (adapter folder, weight), applied in order
    out: Path
    scale: float = 1.0  # multiplies every adapter's weight
    dtype: torch.dtype | None = None  # output float dtype; None keeps the base's
    max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES
    device: str = "cpu"  # where deltas are computed: cpu, cuda, or auto
    force: bool = False
    subtract: bool = False  # W - weight * delta; refuses updates that cannot be undone
    requantize: bool = False  # 4-bit base: quantise the merged model again with the base's settings

    def __post_init__(self) -> None:
        if not self.adapters:
            raise OptionError("no adapter given")
        check_finite_numbers("--scale", self.scale)
        for path, weight in self.adapters:
            check_finite_numbers(f"the weight of {path}", weight)
            check_finite_numbers(f"the weight of {path} times --scale", weight * self.scale)
        check_float_dtype(self.dtype)
        if self.requantize and self.dtype is not None:
            raise OptionError("--requantize keeps the base's 4-bit settings; it cannot be combined with --dtype")
        check_device(self.device)


@dataclass(frozen=True, kw_only=True)
class MergeReport:
    out: str
    files: list[str]
    adapters: list[str]
    merged: int  # tensors updated by an adapter
    replaced: int  # tensors replaced outright (modules_to_save)
    copied: int  # tensors copied byte for byte
    cast: int  # untouched tensors cast: to the output dtype, or dequantised from 4-bit
    dtype: str  # output float dtype, or "as base"
    device: str
    side_files: list[str]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_bytes: int = 0


def subtract(cfg: MergeConfig, *, progress: bool = False) -> MergeReport:
    """Remove adapters from a merged model: ``W - weight * delta``; see :func:`merge`."""
    return merge(dataclasses.replace(cfg, subtract=True), progress=progress)


def merge(cfg: MergeConfig, *, progress: bool = False) -> MergeReport:
    """Merge ``cfg.adapters`` into ``cfg.base`` (or subtract them) and write ``cfg.out``.

    Raises:
        AdapterToolError: an adapter that does not fit the base, is broken, or cannot be undone.
    """
    _check_order(cfg)
    if cfg.requantize and _fourbit_base(cfg.base):
        return _merge_requantized(cfg, progress=progress)
    return _merge(cfg, progress=progress, then_requantize=False)


def _merge(cfg: MergeConfig, *, progress: bool, then_requantize: bool) -> MergeReport:
    """The one streamed pass; ``then_requantize``: the caller quantises the 16-bit output again, so
    the note that quantised weights are written dequantised does not apply. ``cfg.requantize`` (an
    FP8 or MXFP4 base) writes the merged weights in the base's own format in this same pass."""
    clock = Stopwatch()
    device = resolve_device(cfg.device)
    adapters = [load_adapter(path, weight * cfg.scale) for path, weight in cfg.adapters]
    try:
        with open_checkpoint(cfg.base) as stored:
            view = open_quantized_view(stored)
            if cfg.requantize and view is None:
                raise OptionError(f"{cfg.base}: --requantize needs a quantised base (bitsandbytes 4-bit, FP8 or "
                                  "MXFP4), and this one holds no quantised weights")
            base = stored if view is None else view
            plan = plan_targets(base, adapters, subtract=cfg.subtract)
            if view is not None and (cfg.requantize or not then_requantize):
                plan.notes.append(_requantized_note(view, plan) if cfg.requantize else _dequantized_note(view))
            # Requantising copies the stored codes of every weight no adapter changes.
            source = stored if cfg.requantize else base
            specs = _output_specs(source, plan.extra, cfg.dtype)
            inputs = [cfg.base, *(a.path for a in adapters)]
            with staged_output(cfg.out, force=cfg.force, inputs=inputs) as tmp, ExitStack() as stack:
                produce: Produce = _Merger(base, plan.targets, adapters, device)
                if view is not None and cfg.requantize:
                    produce = _requantizing(produce, view, stack.enter_context(TensorSpool(tmp)))
                done = stream_checkpoint(source, tmp, specs, max_shard_bytes=cfg.max_shard_bytes,
                                         metadata=_metadata(base.metadata, cfg), produce=produce, desc="merge",
                                         progress=progress, postfix="merged")
                side = write_model_files(base.root, tmp, dtype=cfg.dtype, untie=bool(plan.extra),
                                         drop_quantization=view is not None and not cfg.requantize)
    finally:
        for adapter in adapters:
            adapter.close()
    return MergeReport(
        out=str(cfg.out), files=done.files, adapters=[str(a.path) for a in adapters],
        merged=len(plan.targets) - plan.replaced, replaced=plan.replaced, copied=done.copied, cast=done.cast,
        dtype=dtype_name(cfg.dtype) if cfg.dtype else "as base", device=str(device),
        side_files=side, notes=plan.notes, seconds=clock.seconds, peak_rss_bytes=peak_rss_bytes(),
    )


def _metadata(base: dict[str, str], cfg: MergeConfig) -> dict[str, str]:
    """The base's safetensors metadata plus what this merge came from (``push`` puts it on the
    model card); a subtract drops the record of earlier merges, which no longer holds."""
    kept = {k: v for k, v in base.items() if not k.startswith(_PROVENANCE)}
    if cfg.subtract:
        return {**kept, "format": "pt"}
    adapters = [f"{source_name(path)}:{weight * cfg.scale:g}" for path, weight in cfg.adapters]
    return {**kept, "format": "pt", f"{_PROVENANCE}base_model": source_name(cfg.base),
            f"{_PROVENANCE}adapters": json.dumps(adapters)}


def _check_order(cfg: MergeConfig) -> None:
    # BASE and ADAPTER given the other way round would otherwise fail on "no adapter_config.json".
    first = cfg.adapters[0][0]
    if is_adapter(cfg.base) and not is_adapter(first) and first.exists():
        usage = "subtract MODEL ADAPTER OUT" if cfg.subtract else "merge BASE ADAPTER OUT"
        raise InputError(f"{cfg.base} is a PEFT adapter and {first} is not: are they swapped? the order is {usage}")


def _merge_requantized(cfg: MergeConfig, *, progress: bool) -> MergeReport:
    """Merge into 16-bit beside OUT, then quantise that with the base's own 4-bit settings.

    Two streamed passes instead of one: re-quantising compounds rounding (the merged weights are
    quantised afresh, offsets and nested scales recomputed), and the 16-bit model briefly needs disk.
    """
    from adaptertool.ops.quantize import QuantConfig, quantize

    check_output(cfg.out, force=cfg.force, inputs=[cfg.base, *(path for path, _ in cfg.adapters)])
    settings = _fourbit_settings(cfg.base)
    with tempfile.TemporaryDirectory(prefix=scratch_prefix(cfg.out, "merge16"), dir=cfg.out.resolve().parent) as scratch:
        merged = _merge(dataclasses.replace(cfg, out=Path(scratch) / "merged", requantize=False, dtype=None, force=False),
                        progress=progress, then_requantize=True)
        quantized = quantize(QuantConfig(source=Path(scratch) / "merged", out=cfg.out, force=cfg.force,
                                         max_shard_bytes=cfg.max_shard_bytes, **settings), progress=progress)
    note = (f"re-quantised {quantized.quantized} weights to {quantized.quant_type.upper()} "
            f"(blocksize {quantized.blocksize}{', double-quant' if quantized.double_quant else ''}) with the base's settings")
    return dataclasses.replace(merged, out=str(cfg.out), files=quantized.files, notes=[*merged.notes, note],
                               seconds=merged.seconds + quantized.seconds,
                               peak_rss_bytes=max(merged.peak_rss_bytes, quantized.peak_rss_bytes))


def _fourbit_base(base: Path) -> bool:
    """Whether ``base`` holds bitsandbytes 4-bit weights (FP8 and MXFP4 requantise in the one pass)."""
    with open_checkpoint(base) as stored:
        return bool(find_quantized_weights(stored.tensors, source=str(base)))


def _fourbit_settings(base: Path) -> dict[str, object]:
    """QuantConfig arguments that reproduce how ``base`` was quantised (its quant states and config.json)."""
    with open_checkpoint(base) as stored:
        states = [read_quantized_state(stored, keys) for keys in find_quantized_weights(stored.tensors).values()]
        config = model_config(stored)
    quantization = config.get("quantization_config") or {}
    compute = quantization.get("bnb_4bit_compute_dtype")
    return {
        "quant_type": states[0].quant_type,
        "blocksize": states[0].blocksize,
        "double_quant": states[0].nested,
        "skip": tuple(quantization.get("llm_int8_skip_modules") or ()),
        "compute_dtype": torch_dtype(code_of_name(compute)) if compute else None,
    }


def _output_specs(base: TensorSource, extra: dict[str, str], dtype: torch.dtype | None) -> list[TensorSpec]:
    """The base's specs (float ones cast to ``dtype``), plus tensors the merge adds (a tied head made real)."""
    specs = [*base.specs(), *(TensorSpec(name, base[source].dtype, base[source].shape) for name, source in extra.items())]
    return cast_specs(specs, dtype_code(dtype) if dtype is not None else None)


class _Workspace:
    """Grow-only scratch buffers reused for every tensor: fresh multi-MB allocations each cost page
    faults that take longer than the arithmetic, and fragment the heap."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, role: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buffer = self._buffers.get((role, dtype))
        if buffer is None or buffer.numel() < numel:
            del buffer
            self._buffers.pop((role, dtype), None)  # freed before its successor is allocated: one at a peak
            buffer = self._buffers[(role, dtype)] = torch.empty(numel, dtype=dtype)
        return buffer[:numel]


class _Merger:
    """merge's ``produce`` hook: each target tensor read once, updated by its steps, rounded once."""

    def __init__(self, base: TensorSource, targets: dict[str, Target], adapters: list[LoadedAdapter],
                 device: torch.device) -> None:
        self.base, self.targets, self.adapters, self.device = base, targets, adapters, device
        self.space = _Workspace()

    def __call__(self, spec: TensorSpec) -> torch.Tensor | None:
        target = self.targets.get(spec.name)
        if target is None:
            return None  # copied byte for byte, or cast
        source, steps = target.source, target.steps
        out_dtype = torch_dtype(spec.dtype)
        factors = self._lora_factors(steps) if self.device.type == "cpu" and self.base.copyable(source) else None
        if factors is not None:  # one plain LoRA: merged in row blocks that stay in cache
            weight = self.base.read(source, buffer=self.space.get("read", self.base[source].nbytes, torch.uint8))
            out = self.space.get("out", weight.numel(), out_dtype).view(weight.shape)
            return merge_linear_into(out, weight, *factors, scale=steps[0].scale)
        return self.merged(spec.name, out_dtype)

    def _lora_factors(self, steps: list[Step]) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A, B, scaling) where ``steps`` is one plain Linear LoRA: a module's, or one expert's of a
        target_parameters LoRA on its own tensor; else None."""
        if len(steps) != 1:
            return None
        step, adapter = steps[0], self.adapters[steps[0].adapter]
        if isinstance(step, ExpertStep):
            return expert_lora_factors(step, adapter)
        if isinstance(step, UpdateStep) and not step.bias and step.update.blockwise:
            keys = step.update.keys
            return adapter.weights.read(keys["lora_A"]), adapter.weights.read(keys["lora_B"]), step.update.scaling
        return None

    def merged(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Target ``name`` merged in float32 and rounded once to ``dtype``, on the CPU."""
        target = self.targets[name]
        buffer = self.space.get("read", self.base[target.source].nbytes, torch.uint8)
        weight = read_values(self.base, target.source, buffer=buffer, device=self.device)
        if fused_target(target.steps):  # experts of a fused tensor, one at a time: never all of it in float32
            return merge_fused(weight, target.steps, self.adapters, self.device, dtype).cpu()
        # A decoded quantised weight is a fresh float32 tensor: the steps may work on it in place.
        owned = isinstance(self.base, QuantizedView) and target.source in self.base.quantized
        return _apply(weight, target.steps, self.adapters, self.device, owned=owned).to(dtype)


def _requantizing(merger: _Merger, view: QuantizedView, spool: TensorSpool) -> Produce:
    """--requantize on an FP8 or MXFP4 base, in the one pass: each quantised weight an adapter changes
    is merged in float32 and quantised again into its stored codes and scales (blocks or groups the
    adapters leave alone keep their bytes); other targets are merged in their own dtype."""
    groups = {key: name for name in merger.targets if name in view.quantized
              for key in _requantized_keys(view.quantized[name].layout)}

    def requantize(weight: str) -> dict[str, torch.Tensor]:
        stored, ckpt = view.quantized[weight], view.checkpoint
        codes, scales = _requantized_keys(stored.layout)
        source = str(ckpt[codes].file)
        if isinstance(stored.layout, Fp8Scheme):
            parts = requantize_fp8(merger.merged(weight), ckpt.read(codes), ckpt.read(scales), stored.layout, source=source)
        else:
            parts = requantize_mxfp4(merger.merged(weight), ckpt.read(codes), ckpt.read(scales), transposed=True,
                                     name=weight, source=source)
        return dict(zip((codes, scales), parts, strict=True))

    spooled = SpooledGroups(spool, groups, requantize)

    def produce(spec: TensorSpec) -> torch.Tensor | TensorSource | None:
        made = spooled(spec)
        return made if made is not None else merger(spec)

    return produce


def _requantized_keys(layout: QuantizedKeys | Fp8Scheme | Mxfp4Weight) -> tuple[str, str]:
    """The stored codes and scales that requantising a weight rewrites."""
    if isinstance(layout, Fp8Scheme):
        return layout.weight, layout.scale
    if isinstance(layout, Mxfp4Weight):
        return layout.blocks, layout.scales
    raise AssertionError(f"{layout.weight}: bitsandbytes bases requantise in a second pass (_merge_requantized)")


def _dequantized_note(view: QuantizedView) -> str:
    schemes = view.schemes()
    if set(schemes) <= set(QUANT_TYPES):
        what, tables, dtype = f"{len(view.quantized)} bitsandbytes 4-bit", "tables", "16-bit"
    else:
        what = " and ".join(f"{n} {scheme.upper()}" for scheme, n in sorted(schemes.items()))
        tables = "scales"
        dtype = "/".join(sorted({dtype_name(torch_dtype(w.spec.dtype)) for w in view.quantized.values()}))
    return (f"the base holds {what} weights: they are dequantised with their stored {tables} and written in {dtype} "
            "(--requantize to quantise again), and config.json loses its quantization_config")


def _requantized_note(view: QuantizedView, plan: MergePlan) -> str:
    changed = Counter(view.quantized[name].scheme for name in plan.targets if name in view.quantized)
    what = " and ".join(f"{n} {scheme.upper()}" for scheme, n in sorted(changed.items())) or "no quantised"
    return (f"{what} weights that the adapters change are quantised again in the base's layout (blocks they leave "
            "alone keep their bytes); every other quantised weight is copied, and config.json keeps its quantization_config")


def _apply(weight: torch.Tensor, steps: list[Step], adapters: list[LoadedAdapter], device: torch.device, *,
           owned: bool = False) -> torch.Tensor:
    # One float32 working copy on the compute device; each step updates it in place.
    work = weight.to(device=device, dtype=torch_dtype("F32"), copy=not owned)
    for step in steps:
        adapter = adapters[step.adapter]
        if isinstance(step, ReplaceStep):
            work = adapter.weights.read(step.key).to(device=device).float()
            continue
        if isinstance(step, ExpertStep):
            apply_expert_step(work, step, adapter, device)
            continue
        tensors = {part: adapter.weights.read(key).to(device) for part, key in step.update.keys.items()}
        if step.bias:
            step.update.apply_bias_(work, tensors, scale=step.scale)
        else:
            step.update.apply_(work, tensors, scale=step.scale)
    return work.cpu()

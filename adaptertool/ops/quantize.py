"""quantize / dequantize: a 16-bit checkpoint <-> the bitsandbytes 4-bit checkpoint transformers saves.

quantize writes what ``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))``
followed by ``save_pretrained`` writes: same keys, dtypes, shapes, file layout and bytes, except
~0.2 % of the nested absmax codes, where bitsandbytes' CPU table is not exactly nearest (see
:mod:`adaptertool.quant.nested`). Streamed tensor by tensor, without building the model. Which
weights: :mod:`adaptertool.quant.selection`; the layout: :mod:`adaptertool.quant.bnb_format`.

Two passes, each source tensor read once. The header needs every entry's size before any data,
and with double quantisation the quant_state's length depends on the nested offset, known only
after quantising; and the writer stores a shard's float32 entries (nested_absmax, quant_map)
before its uint8 ones (packed codes, absmax codes). So pass 1 quantises each weight once and
spills its packed codes and absmax to a scratch checkpoint inside the staging folder, keeping only
the small parts (nested scales, quant_state) in memory; pass 2 writes the output in the writer's
order, copying the spilled bytes in kernel space. Memory holds one weight; scratch disk holds the
quantised weights once more, briefly.

dequantize expands every 4-bit weight with the checkpoint's own code tables and absmax.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from adaptertool.adapters.peft_keys import module_order
from adaptertool.errors import AdapterToolError
from adaptertool.io import (
    DEFAULT_MAX_SHARD_BYTES,
    DTYPES,
    FLOAT_CODES,
    Checkpoint,
    CheckpointWriter,
    TensorSpec,
    copy_side_files,
    dtype_code,
    open_checkpoint,
    read_json,
    staged_output,
    torch_dtype,
)
from adaptertool.ops.measure import Stopwatch, peak_rss_bytes
from adaptertool.ops.quantized import QuantSummary, describe_quantization, read_quantized_state, read_quantized_weight
from adaptertool.quant import (
    BLOCKSIZES,
    FLOAT_DTYPES,
    QUANT_TYPES,
    codebook,
    dynamic_map,
    entry_layout,
    find_quantized_weights,
    fourbit_values,
    nested_codebook,
    quantization_config,
    quantize_weight,
    select_weights,
)

__all__ = [
    "DequantConfig", "DequantReport", "QuantConfig", "QuantReport", "QuantSummary",
    "dequantize", "describe_quantization", "quantize", "read_quantized_weight",
]

_CONFIG = "config.json"


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    source: Path
    out: Path
    quant_type: str = "nf4"
    blocksize: int = 64  # bitsandbytes' and transformers' default
    double_quant: bool = True
    skip: tuple[str, ...] = ()  # module patterns kept 16-bit, matched as llm_int8_skip_modules
    compute_dtype: torch.dtype | None = None  # None: the dtype the weights are quantised from
    dtype: torch.dtype | None = None  # None: keep each tensor's dtype; else cast floats (before quantising)
    max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES
    force: bool = False

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise AdapterToolError(f"--quant-type must be nf4 or fp4, not {self.quant_type!r}")
        if self.blocksize not in BLOCKSIZES:
            raise AdapterToolError(f"--blocksize must be a power of two from 32 to 4096, not {self.blocksize}")
        for what, dtype in (("--dtype", self.dtype), ("--compute-dtype", self.compute_dtype)):
            if dtype is not None and _name(dtype) not in FLOAT_DTYPES:
                raise AdapterToolError(f"{what} must be bf16, fp16 or fp32, not {dtype}")


@dataclass(frozen=True, kw_only=True)
class QuantReport:
    out: str
    files: list[str]
    quant_type: str
    blocksize: int
    double_quant: bool
    quantized: int  # weights quantised
    kept: list[str]  # Linear-looking modules left unquantised (lm_head, pooler...)
    copied: int  # tensors copied byte for byte
    cast: int  # tensors cast to --dtype
    bytes_in: int
    bytes_written: int
    side_files: list[str]
    seconds: float
    peak_rss_bytes: int


@dataclass(frozen=True, kw_only=True)
class _Quantized:
    """Pass 1's results: packed codes and absmax in a scratch checkpoint, the small parts in memory."""

    spill: Path  # scratch checkpoint: P.weight (packed) and P.weight.absmax (as raw bytes) per weight
    dtypes: dict[str, torch.dtype]  # weight -> the dtype it was quantised from
    nested_scales: dict[str, torch.Tensor]  # weight -> nested_absmax (double quantisation only)
    states: dict[str, bytes]  # weight -> quant_state JSON


def quantize(cfg: QuantConfig, *, progress: bool = False) -> QuantReport:
    """Quantise ``cfg.source`` to the bitsandbytes 4-bit layout in ``cfg.out``; see the module docstring."""
    clock = Stopwatch()
    with open_checkpoint(cfg.source) as source:
        config = _model_config(source)
        selection = select_weights({s.name: (DTYPES[s.dtype][1], s.shape) for s in source.specs()}, config,
                                   skip=cfg.skip, source=str(cfg.source))
        dtypes = _quantized_dtypes(source, selection.quantize, cfg.dtype)
        config["quantization_config"] = quantization_config(
            quant_type=cfg.quant_type, double_quant=cfg.double_quant,
            compute_dtype=_name(cfg.compute_dtype or next(iter(dtypes.values()))), skip_modules=selection.skip_modules)
        if cfg.dtype is not None:
            _set_dtype(config, cfg.dtype)
        with staged_output(cfg.out, force=cfg.force, inputs=[cfg.source]) as tmp:
            done = _quantize_weights(source, dtypes, cfg, tmp / ".quantized", progress)
            specs, entries = _output_specs(source, done, cfg)
            writer = CheckpointWriter(tmp, specs, max_shard_bytes=cfg.max_shard_bytes, metadata={"format": "pt"})
            copied = 0
            with open_checkpoint(done.spill) as spill, writer, \
                    tqdm(total=writer.total_bytes, unit="B", unit_scale=True, desc="write", disable=not progress) as bar:
                for spec in writer.order:
                    if spec.name in entries:
                        _write_entry(writer, spec, entries[spec.name], done, spill, cfg)
                    elif spec == source[spec.name].spec:
                        writer.copy(spec.name, source)
                        copied += 1
                    else:
                        writer.write(spec.name, source.read(spec.name).to(torch_dtype(spec.dtype)))
                    bar.update(spec.nbytes)
            shutil.rmtree(done.spill)
            side = copy_side_files(source.root, tmp, skip=(_CONFIG,))
            _write_config(tmp, config)
        bytes_in = sum(s.nbytes for s in source.specs())
    return QuantReport(
        out=str(cfg.out), files=[f.name for f in writer.files], quant_type=cfg.quant_type, blocksize=cfg.blocksize,
        double_quant=cfg.double_quant, quantized=len(dtypes), kept=sorted(selection.kept, key=module_order), copied=copied,
        cast=len(specs) - len(entries) - copied, bytes_in=bytes_in, bytes_written=writer.total_bytes,
        side_files=sorted([*side, _CONFIG]), seconds=clock.seconds, peak_rss_bytes=peak_rss_bytes(),
    )


def _quantized_dtypes(source: Checkpoint, weights: list[str], dtype: torch.dtype | None) -> dict[str, torch.dtype]:
    """weight -> the dtype it is quantised from: --dtype, else its own (transformers casts first, too)."""
    dtypes = {w: dtype or torch_dtype(source[w].dtype) for w in weights}
    for weight, target in dtypes.items():
        if _name(target) not in FLOAT_DTYPES:
            raise AdapterToolError(f"{source[weight].file}: tensor {weight} is {target}; bitsandbytes quantises 16/32-bit floats: pass --dtype")
    return dtypes


def _quantize_weights(source: Checkpoint, dtypes: dict[str, torch.dtype], cfg: QuantConfig, spill: Path,
                      progress: bool) -> _Quantized:
    """Pass 1: quantise each weight once; spill packed codes and absmax (as bytes), keep the small parts."""
    book, code_map = codebook(cfg.quant_type), nested_codebook() if cfg.double_quant else None
    specs = []
    for weight in dtypes:
        layout = {key: shape for key, _, shape in _layout(weight, source[weight].shape, cfg, state_bytes=0)}
        absmax_bytes = layout[weight + ".absmax"][0] * (1 if cfg.double_quant else 4)
        specs += [TensorSpec(weight, "U8", layout[weight]), TensorSpec(weight + ".absmax", "U8", (absmax_bytes,))]
    spill.mkdir()
    nested_scales: dict[str, torch.Tensor] = {}
    states: dict[str, bytes] = {}
    # One file, all uint8 (float32 absmax as its bytes), so the writer orders entries by name and a
    # weight's absmax follows its packed codes; it waits in ``pending`` meanwhile.
    pending: dict[str, torch.Tensor] = {}
    with CheckpointWriter(spill, specs, max_shard_bytes=None, stem="quantized") as writer:
        for spec in tqdm(writer.order, desc="quantize", unit="tensor", disable=not progress):
            if spec.name not in dtypes:
                writer.write(spec.name, pending.pop(spec.name.removesuffix(".absmax")))
                continue
            weight = spec.name
            done = quantize_weight(_read(source, weight, dtypes[weight]), book, blocksize=cfg.blocksize,
                                   code_map=code_map, name=weight, source=str(source[weight].file))
            if done.nested is not None:
                nested_scales[weight] = done.nested.scales
            states[weight] = done.state.to_json()
            pending[weight] = done.absmax.view(torch.uint8)
            writer.write(weight, done.packed)
    return _Quantized(spill=spill, dtypes=dtypes, nested_scales=nested_scales, states=states)


def _output_specs(source: Checkpoint, done: _Quantized, cfg: QuantConfig) -> tuple[list[TensorSpec], dict[str, tuple[str, str]]]:
    """Every source tensor in storage order, each quantised weight replaced in place by its entries.

    Returns the specs and ``{entry key: (weight, role)}`` with role weight/absmax/quant_map/... .
    """
    specs: list[TensorSpec] = []
    entries: dict[str, tuple[str, str]] = {}
    for spec in source.specs():
        if spec.name not in done.dtypes:
            recast = cfg.dtype is not None and spec.dtype in FLOAT_CODES
            specs.append(TensorSpec(spec.name, dtype_code(cfg.dtype), spec.shape) if recast else spec)  # type: ignore[arg-type]
            continue
        for key, dtype_name, shape in _layout(spec.name, spec.shape, cfg, state_bytes=len(done.states[spec.name])):
            specs.append(TensorSpec(key, dtype_code(getattr(torch, dtype_name)), shape))
            suffix = key[len(spec.name) :]
            entries[key] = (spec.name, "quant_state" if suffix.startswith(".quant_state.") else suffix[1:] or "weight")
    return specs, entries


def _write_entry(writer: CheckpointWriter, spec: TensorSpec, entry: tuple[str, str], done: _Quantized,
                 spill: Checkpoint, cfg: QuantConfig) -> None:
    weight, role = entry
    if role == "weight" or (role == "absmax" and cfg.double_quant):
        writer.copy(spec.name, spill)  # same uint8 spec: bytes copied in kernel space
    elif role == "absmax":  # float32 absmax, spilled as its bytes
        writer.write(spec.name, spill.read(spec.name).view(torch.float32))
    elif role == "quant_map":
        writer.write(spec.name, fourbit_values(cfg.quant_type))
    elif role == "nested_absmax":
        writer.write(spec.name, done.nested_scales[weight])
    elif role == "nested_quant_map":
        writer.write(spec.name, dynamic_map())
    else:
        writer.write(spec.name, torch.frombuffer(bytearray(done.states[weight]), dtype=torch.uint8))


def _layout(weight: str, shape: tuple[int, ...], cfg: QuantConfig, *, state_bytes: int) -> list[tuple[str, str, tuple[int, ...]]]:
    return entry_layout(weight, shape, quant_type=cfg.quant_type, blocksize=cfg.blocksize,
                        double_quant=cfg.double_quant, state_bytes=state_bytes)


def _read(source: Checkpoint, name: str, dtype: torch.dtype) -> torch.Tensor:
    tensor = source.read(name)
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _model_config(source: Checkpoint) -> dict[str, Any]:
    config_path = source.root / _CONFIG if source.root is not None else None
    if config_path is None or not config_path.is_file():
        raise AdapterToolError(
            f"{source.path}: no {_CONFIG} beside the weights; quantize needs the model's folder (loaders need the config)"
        )
    config = read_json(config_path)
    existing = config.get("quantization_config")
    if existing:
        method = existing.get("quant_method", "?") if isinstance(existing, dict) else "?"
        raise AdapterToolError(f"{config_path}: the model is already quantised ({method}); dequantize it first")
    return config


def _set_dtype(config: dict[str, Any], dtype: torch.dtype) -> None:
    config["dtype"] = _name(dtype)
    if "torch_dtype" in config:  # older transformers' name for the same field
        config["torch_dtype"] = _name(dtype)


def _write_config(folder: Path, config: dict[str, Any]) -> None:
    # transformers' PretrainedConfig.to_json_file: indent 2, sorted keys, trailing newline
    (folder / _CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# --- dequantize ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DequantConfig:
    source: Path
    out: Path
    dtype: torch.dtype | None = None  # None: each weight's recorded dtype, other tensors kept
    max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES
    force: bool = False

    def __post_init__(self) -> None:
        if self.dtype is not None and _name(self.dtype) not in FLOAT_DTYPES:
            raise AdapterToolError(f"--dtype must be bf16, fp16 or fp32, not {self.dtype}")


@dataclass(frozen=True, kw_only=True)
class DequantReport:
    out: str
    files: list[str]
    dequantized: int
    copied: int
    cast: int
    bytes_written: int
    side_files: list[str]
    seconds: float
    peak_rss_bytes: int


def dequantize(cfg: DequantConfig, *, progress: bool = False) -> DequantReport:
    """Expand every bitsandbytes 4-bit weight of ``cfg.source`` into a plain checkpoint at ``cfg.out``."""
    clock = Stopwatch()
    with open_checkpoint(cfg.source) as source:
        found = find_quantized_weights(source, source=str(cfg.source))
        if not found:
            raise AdapterToolError(f"{cfg.source}: holds no bitsandbytes 4-bit weights; nothing to dequantize")
        companions = {key for keys in found.values() for key in keys.keys}
        specs: list[TensorSpec] = []
        for spec in source.specs():
            if spec.name in found:
                state = read_quantized_state(source, found[spec.name])
                specs.append(TensorSpec(spec.name, dtype_code(cfg.dtype or getattr(torch, state.dtype)), state.shape))
            elif spec.name not in companions:
                recast = cfg.dtype is not None and spec.dtype in FLOAT_CODES
                specs.append(TensorSpec(spec.name, dtype_code(cfg.dtype), spec.shape) if recast else spec)  # type: ignore[arg-type]
        with staged_output(cfg.out, force=cfg.force, inputs=[cfg.source]) as tmp:
            writer = CheckpointWriter(tmp, specs, max_shard_bytes=cfg.max_shard_bytes, metadata={"format": "pt"})
            copied = 0
            with writer, tqdm(total=writer.total_bytes, unit="B", unit_scale=True, desc="dequantize", disable=not progress) as bar:
                for spec in writer.order:
                    if spec.name in found:
                        writer.write(spec.name, read_quantized_weight(source, found[spec.name], dtype=torch_dtype(spec.dtype)))
                    elif spec == source[spec.name].spec:
                        writer.copy(spec.name, source)
                        copied += 1
                    else:
                        writer.write(spec.name, source.read(spec.name).to(torch_dtype(spec.dtype)))
                    bar.update(spec.nbytes)
            side = copy_side_files(source.root, tmp, skip=(_CONFIG,))
            if source.root is not None and (source.root / _CONFIG).is_file():
                config = read_json(source.root / _CONFIG)
                config.pop("quantization_config", None)
                if cfg.dtype is not None:
                    _set_dtype(config, cfg.dtype)
                _write_config(tmp, config)
                side = sorted([*side, _CONFIG])
    return DequantReport(
        out=str(cfg.out), files=[f.name for f in writer.files], dequantized=len(found), copied=copied,
        cast=len(specs) - len(found) - copied, bytes_written=writer.total_bytes, side_files=side,
        seconds=clock.seconds, peak_rss_bytes=peak_rss_bytes(),
    )

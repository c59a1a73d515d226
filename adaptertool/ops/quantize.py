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
spools its packed codes and absmax (:class:`~adaptertool.io.TensorSpool`, beside the output),
keeping only the small parts (nested scales, quant_state) in memory; pass 2 streams the output in
the writer's order, copying the spooled bytes in kernel space. Memory holds one weight; scratch
disk holds the quantised weights once more, briefly.

dequantize expands every 4-bit weight with the checkpoint's own code tables and absmax.
"""

from __future__ import annotations

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
    Checkpoint,
    TensorSpec,
    TensorSpool,
    cast_specs,
    copy_side_files,
    dtype_code,
    dtype_name,
    open_checkpoint,
    read_json,
    staged_output,
    torch_dtype,
)
from adaptertool.ops.measure import Stopwatch, peak_rss_bytes
from adaptertool.ops.model_files import CONFIG, set_config_dtype, write_config, write_model_files
from adaptertool.ops.quantized import QuantSummary, describe_quantization, read_quantized_state, read_quantized_weight
from adaptertool.ops.stream import stream_checkpoint
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
        _check_sixteen_or_32_bit(self.dtype)
        _check_sixteen_or_32_bit(self.compute_dtype, "--compute-dtype")


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
    """Pass 1's results: packed codes and absmax in a spool, the small parts in memory."""

    spool: TensorSpool  # P.weight (packed codes) and P.weight.absmax per weight
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
            compute_dtype=dtype_name(cfg.compute_dtype or next(iter(dtypes.values()))), skip_modules=selection.skip_modules)
        if cfg.dtype is not None:
            set_config_dtype(config, cfg.dtype)
        with staged_output(cfg.out, force=cfg.force, inputs=[cfg.source]) as tmp, TensorSpool(tmp) as spool:
            done = _quantize_weights(source, dtypes, cfg, spool, progress)
            specs, entries = _output_specs(source, done, cfg)
            written = stream_checkpoint(source, tmp, specs, max_shard_bytes=cfg.max_shard_bytes,
                                        metadata={"format": "pt"}, produce=lambda spec: _entry(spec, entries, done, cfg),
                                        desc="write", progress=progress)
            side = copy_side_files(source.root, tmp, skip=(CONFIG,))
            write_config(tmp, config)
        bytes_in = sum(s.nbytes for s in source.specs())
    return QuantReport(
        out=str(cfg.out), files=written.files, quant_type=cfg.quant_type, blocksize=cfg.blocksize,
        double_quant=cfg.double_quant, quantized=len(dtypes), kept=sorted(selection.kept, key=module_order),
        copied=written.copied, cast=written.cast, bytes_in=bytes_in, bytes_written=written.bytes_written,
        side_files=sorted([*side, CONFIG]), seconds=clock.seconds, peak_rss_bytes=peak_rss_bytes(),
    )


def _check_sixteen_or_32_bit(dtype: torch.dtype | None, option: str = "--dtype") -> None:
    """bitsandbytes quantises from, and dequantises to, 16/32-bit floats only."""
    if dtype is not None and dtype_name(dtype) not in FLOAT_DTYPES:
        raise AdapterToolError(f"{option} must be bf16, fp16 or fp32, not {dtype}")


def _quantized_dtypes(source: Checkpoint, weights: list[str], dtype: torch.dtype | None) -> dict[str, torch.dtype]:
    """weight -> the dtype it is quantised from: --dtype, else its own (transformers casts first, too)."""
    dtypes = {w: dtype or torch_dtype(source[w].dtype) for w in weights}
    for weight, target in dtypes.items():
        if dtype_name(target) not in FLOAT_DTYPES:
            raise AdapterToolError(f"{source[weight].file}: tensor {weight} is {target}; bitsandbytes quantises 16/32-bit floats: pass --dtype")
    return dtypes


def _quantize_weights(source: Checkpoint, dtypes: dict[str, torch.dtype], cfg: QuantConfig, spool: TensorSpool,
                      progress: bool) -> _Quantized:
    """Pass 1: quantise each weight once; spool packed codes and absmax, keep the small parts."""
    book, code_map = codebook(cfg.quant_type), nested_codebook() if cfg.double_quant else None
    nested_scales: dict[str, torch.Tensor] = {}
    states: dict[str, bytes] = {}
    for weight in tqdm(dtypes, desc="quantize", unit="tensor", disable=not progress):
        done = quantize_weight(_read(source, weight, dtypes[weight]), book, blocksize=cfg.blocksize,
                               code_map=code_map, name=weight, source=str(source[weight].file))
        if done.nested is not None:
            nested_scales[weight] = done.nested.scales
        states[weight] = done.state.to_json()
        spool.add(weight, done.packed)
        spool.add(weight + ".absmax", done.absmax)
    return _Quantized(spool=spool, dtypes=dtypes, nested_scales=nested_scales, states=states)


def _output_specs(source: Checkpoint, done: _Quantized, cfg: QuantConfig) -> tuple[list[TensorSpec], dict[str, tuple[str, str]]]:
    """Every source tensor in storage order, each quantised weight replaced in place by its entries.

    Returns the specs and ``{entry key: (weight, role)}`` with role weight/absmax/quant_map/... .
    """
    specs: list[TensorSpec] = []
    entries: dict[str, tuple[str, str]] = {}
    for spec in cast_specs(source.specs(), dtype_code(cfg.dtype) if cfg.dtype is not None else None):
        if spec.name not in done.dtypes:
            specs.append(spec)
            continue
        for key, entry_dtype, shape in _layout(spec.name, spec.shape, cfg, state_bytes=len(done.states[spec.name])):
            specs.append(TensorSpec(key, dtype_code(getattr(torch, entry_dtype)), shape))
            suffix = key[len(spec.name) :]
            entries[key] = (spec.name, "quant_state" if suffix.startswith(".quant_state.") else suffix[1:] or "weight")
    return specs, entries


def _entry(spec: TensorSpec, entries: dict[str, tuple[str, str]], done: _Quantized,
           cfg: QuantConfig) -> torch.Tensor | TensorSpool | None:
    """Pass 2's ``produce`` hook: a quantised weight's entry, from the spool or made here; None for other tensors."""
    if spec.name not in entries:
        return None
    weight, role = entries[spec.name]
    if role in ("weight", "absmax"):
        return done.spool
    if role == "quant_map":
        return fourbit_values(cfg.quant_type)
    if role == "nested_absmax":
        return done.nested_scales[weight]
    if role == "nested_quant_map":
        return dynamic_map()
    return torch.frombuffer(bytearray(done.states[weight]), dtype=torch.uint8)


def _layout(weight: str, shape: tuple[int, ...], cfg: QuantConfig, *, state_bytes: int) -> list[tuple[str, str, tuple[int, ...]]]:
    return entry_layout(weight, shape, quant_type=cfg.quant_type, blocksize=cfg.blocksize,
                        double_quant=cfg.double_quant, state_bytes=state_bytes)


def _read(source: Checkpoint, name: str, dtype: torch.dtype) -> torch.Tensor:
    tensor = source.read(name)
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _model_config(source: Checkpoint) -> dict[str, Any]:
    config_path = source.root / CONFIG if source.root is not None else None
    if config_path is None or not config_path.is_file():
        raise AdapterToolError(
            f"{source.path}: no {CONFIG} beside the weights; quantize needs the model's folder (loaders need the config)"
        )
    config = read_json(config_path)
    existing = config.get("quantization_config")
    if existing:
        method = existing.get("quant_method", "?") if isinstance(existing, dict) else "?"
        raise AdapterToolError(f"{config_path}: the model is already quantised ({method}); dequantize it first")
    return config


# --- dequantize ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DequantConfig:
    source: Path
    out: Path
    dtype: torch.dtype | None = None  # None: each weight's recorded dtype, other tensors kept
    max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES
    force: bool = False

    def __post_init__(self) -> None:
        _check_sixteen_or_32_bit(self.dtype)


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
        for spec in cast_specs(source.specs(), dtype_code(cfg.dtype) if cfg.dtype is not None else None):
            if spec.name in found:
                state = read_quantized_state(source, found[spec.name])
                specs.append(TensorSpec(spec.name, dtype_code(cfg.dtype or getattr(torch, state.dtype)), state.shape))
            elif spec.name not in companions:
                specs.append(spec)

        def expand(spec: TensorSpec) -> torch.Tensor | None:
            # Straight to the output dtype: a read at the recorded dtype, then a cast, would round twice.
            keys = found.get(spec.name)
            return None if keys is None else read_quantized_weight(source, keys, dtype=torch_dtype(spec.dtype))

        with staged_output(cfg.out, force=cfg.force, inputs=[cfg.source]) as tmp:
            written = stream_checkpoint(source, tmp, specs, max_shard_bytes=cfg.max_shard_bytes, metadata={"format": "pt"},
                                        produce=expand, desc="dequantize", progress=progress)
            side = write_model_files(source.root, tmp, dtype=cfg.dtype, drop_quantization=True)
    return DequantReport(
        out=str(cfg.out), files=written.files, dequantized=len(found), copied=written.copied,
        cast=written.cast, bytes_written=written.bytes_written, side_files=side,
        seconds=clock.seconds, peak_rss_bytes=peak_rss_bytes(),
    )

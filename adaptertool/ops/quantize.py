"""quantize: a 16/32-bit checkpoint -> the bitsandbytes 4-bit checkpoint transformers saves.

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

``--format fp8-block|fp8-channel|mxfp4`` writes the FP8 and MXFP4 layouts instead, in one pass:
:mod:`adaptertool.ops.quantize_scaled`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from adaptertool.adapters.peft_keys import module_order
from adaptertool.errors import InputError, OptionError
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
from adaptertool.ops.model_files import CONFIG, set_config_dtype, write_config
from adaptertool.ops.quantize_scaled import SCALED_FORMATS, quantize_scaled
from adaptertool.ops.stream import stream_checkpoint
from adaptertool.quant import (
    BLOCKSIZES,
    FLOAT_DTYPES,
    QUANT_TYPES,
    codebook,
    dynamic_map,
    entry_layout,
    fourbit_values,
    nested_codebook,
    quantization_config,
    quantize_weight,
    select_weights,
)

__all__ = ["QuantConfig", "QuantReport", "quantize", "quantized_dtypes"]

@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    source: Path
    out: Path
    quant_type: str = "nf4"  # --format: nf4, fp4 (bitsandbytes) or one of SCALED_FORMATS
    blocksize: int = 64  # bitsandbytes' and transformers' default
    block: tuple[int, int] = (128, 128)  # fp8-block: rows x columns per scale, DeepSeek-V3's
    double_quant: bool = True
    skip: tuple[str, ...] = ()  # module patterns kept 16-bit, matched as llm_int8_skip_modules
    compute_dtype: torch.dtype | None = None  # None: the dtype the weights are quantised from
    dtype: torch.dtype | None = None  # None: keep each tensor's dtype; else cast floats (before quantising)
    max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES
    force: bool = False

    def __post_init__(self) -> None:
        if self.quant_type not in (*QUANT_TYPES, *SCALED_FORMATS):
            raise OptionError(f"--format must be one of {', '.join((*QUANT_TYPES, *SCALED_FORMATS))}, not {self.quant_type!r}")
        if len(self.block) != 2 or min(self.block) < 1:
            raise OptionError(f"--block must be two positive sizes such as 128x128, not {self.block}")
        if self.blocksize not in BLOCKSIZES:
            raise OptionError(f"--blocksize must be a power of two from 32 to 4096, not {self.blocksize}")
        check_sixteen_or_32_bit(self.dtype)
        check_sixteen_or_32_bit(self.compute_dtype, "--compute-dtype")


@dataclass(frozen=True, kw_only=True)
class QuantReport:
    out: str
    files: list[str]
    quant_type: str  # the format
    blocksize: int  # bitsandbytes formats; 0 for the others
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
    block: list[int] | None = None  # fp8-block: rows x columns per scale


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
        if cfg.quant_type in SCALED_FORMATS:
            return quantize_scaled(cfg, source, config, clock, progress=progress)
        selection = select_weights({s.name: (DTYPES[s.dtype][1], s.shape) for s in source.specs()}, config,
                                   skip=cfg.skip, source=str(cfg.source))
        dtypes = quantized_dtypes(source, selection.quantize, cfg.dtype)
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


def check_sixteen_or_32_bit(dtype: torch.dtype | None, option: str = "--dtype") -> None:
    """bitsandbytes quantises from, and dequantises to, 16/32-bit floats only."""
    if dtype is not None and dtype_name(dtype) not in FLOAT_DTYPES:
        raise OptionError(f"{option} must be bf16, fp16 or fp32, not {dtype}")


def quantized_dtypes(source: Checkpoint, weights: list[str], dtype: torch.dtype | None) -> dict[str, torch.dtype]:
    """weight -> the dtype it is quantised from: --dtype, else its own (transformers casts first, too).

    Raises:
        AdapterToolError: a weight that is not a 16/32-bit float, with no --dtype to cast it.
    """
    dtypes = {w: dtype or torch_dtype(source[w].dtype) for w in weights}
    for weight, target in dtypes.items():
        if dtype_name(target) not in FLOAT_DTYPES:
            raise InputError(f"{source[weight].file}: tensor {weight} is {target}; bitsandbytes quantises 16/32-bit floats: pass --dtype")
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
        raise InputError(
            f"{source.path}: no {CONFIG} beside the weights; quantize needs the model's folder (loaders need the config)"
        )
    config = read_json(config_path)
    existing = config.get("quantization_config")
    if existing:
        method = existing.get("quant_method", "?") if isinstance(existing, dict) else "?"
        raise InputError(f"{config_path}: the model is already quantised ({method}); dequantize it first")
    return config

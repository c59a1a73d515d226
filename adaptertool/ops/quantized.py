"""Reading a quantised checkpoint: one weight, a summary for info, or the whole as a plain view.

The maths and the checks are :mod:`adaptertool.quant`'s (bitsandbytes 4-bit, FP8, MXFP4); this
module only binds them to an opened checkpoint. In the view each quantised weight appears as one
plain tensor of its original dtype and shape, decoded when read, and its stored entries disappear:

- bitsandbytes ``P.weight`` (packed codes, absmax, quant_map, nested tables, quant_state) ->
  ``P.weight`` in the dtype its quant_state records;
- FP8 ``P.weight`` (F8_E4M3 codes) with ``P.weight_scale_inv`` or ``P.weight_scale`` -> ``P.weight``;
- MXFP4 ``P_blocks`` with ``P_scales`` -> ``P`` in gpt-oss's parameter layout (E, in, out), as
  transformers saves a dequantised gpt-oss.

FP8 and MXFP4 record no original dtype: the view uses config.json's ``dtype`` where it is a 16/32-bit
float, else bfloat16, the dtype these releases are published in. Every other tensor passes through
untouched, so pipelines written for plain checkpoints (merge, extract, dequantize) work on quantised
bases unchanged; a quant_method this module does not read is refused.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from adaptertool.errors import InputError
from adaptertool.io import (
    Checkpoint,
    TensorInfo,
    TensorSource,
    TensorSpec,
    TensorTable,
    code_of_name,
    read_json,
    torch_dtype,
)
from adaptertool.quant import (
    FLOAT_DTYPES,
    FourBitState,
    MXFP4_GROUP_SIZE,
    Fp8Scheme,
    Mxfp4Weight,
    QuantizedKeys,
    dequantize_fp8,
    dequantize_mxfp4,
    dequantize_stored,
    find_fp8_weights,
    find_mxfp4_weights,
    find_quantized_weights,
    read_state,
    read_stored,
)

__all__ = [
    "QUANT_METHODS", "QuantSummary", "QuantizedView", "QuantizedWeight", "describe_quantization", "model_config",
    "open_quantized_view", "read_quantized_state", "read_quantized_weight", "read_values",
]

# config.json quant_method values this module decodes.
QUANT_METHODS = ("bitsandbytes", "fp8", "compressed-tensors", "mxfp4")


def read_quantized_weight(ckpt: Checkpoint, keys: QuantizedKeys, *, dtype: torch.dtype | None = torch.float32,
                          device: torch.device | str | None = None) -> torch.Tensor:
    """Read one 4-bit weight's entries from ``ckpt`` and dequantise it with its stored tables.

    Args:
        ckpt: the opened 4-bit checkpoint.
        keys: from :func:`adaptertool.quant.find_quantized_weights` over ``ckpt``'s names.
        dtype: output dtype (float32 by default, for adding deltas); None for the recorded dtype.
        device: where to expand it; None for the CPU, where the entries are read.

    Raises:
        AdapterToolError: a malformed quant_state or entries whose sizes do not fit it.
    """
    stored = read_stored(ckpt.read, keys, source=str(ckpt[keys.weight].file))
    return dequantize_stored(stored, dtype=dtype, device=device)


def read_quantized_state(ckpt: Checkpoint, keys: QuantizedKeys) -> FourBitState:
    """Parse one 4-bit weight's stored quant_state (a few hundred bytes; the weight is not read)."""
    return read_state(ckpt.read, keys, source=str(ckpt[keys.quant_state].file))


@dataclass(frozen=True)
class QuantizedWeight:
    """One quantised weight as the view shows it: the tensor it decodes to, and how it is stored."""

    spec: TensorSpec  # the decoded tensor: name, original dtype, shape
    stored: tuple[str, ...]  # the checkpoint's tensors it stands for, hidden in the view; the first holds its place
    scheme: str  # nf4, fp4, fp8-block, fp8-channel, fp8-tensor or mxfp4: for messages and notes
    layout: QuantizedKeys | Fp8Scheme | Mxfp4Weight


class QuantizedView(TensorTable):
    """Read-only, checkpoint-like view: a :class:`~adaptertool.io.TensorSource` over ``ckpt``."""

    def __init__(self, ckpt: Checkpoint, quantized: dict[str, QuantizedWeight]) -> None:
        self.checkpoint = ckpt
        self.path = ckpt.path
        self.quantized = quantized
        by_first = {w.stored[0]: w for w in quantized.values()}
        hidden = {key for w in quantized.values() for key in w.stored}
        self.tensors: dict[str, TensorInfo] = {}
        for name, info in ckpt.tensors.items():
            if name in by_first:  # the decoded weight takes the place of its first stored tensor
                spec = by_first[name].spec
                self.tensors[spec.name] = TensorInfo(spec, info.file, info.offset)
            elif name not in hidden:
                self.tensors[name] = info

    @property
    def root(self) -> Path | None:
        return self.checkpoint.root

    @property
    def metadata(self) -> dict[str, str]:
        return self.checkpoint.metadata

    def schemes(self) -> Counter[str]:
        """How many weights each scheme holds."""
        return Counter(w.scheme for w in self.quantized.values())

    def read(self, name: str, *, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """A plain tensor; quantised weights come back decoded to the view's dtype for them."""
        if name not in self.quantized:
            return self.checkpoint.read(name, buffer=buffer)
        return self.decode(name)

    def decode(self, name: str, *, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        """Quantised weight ``name`` decoded straight to ``dtype`` (None: the view's), rounded once."""
        weight = self.quantized[name]
        dtype = dtype or torch_dtype(weight.spec.dtype)
        layout, ckpt = weight.layout, self.checkpoint
        if isinstance(layout, QuantizedKeys):
            return read_quantized_weight(ckpt, layout, dtype=dtype, device=device)
        source = str(ckpt[weight.stored[0]].file)
        if isinstance(layout, Fp8Scheme):
            return dequantize_fp8(ckpt.read(layout.weight), ckpt.read(layout.scale), layout, dtype=dtype, device=device,
                                  source=source)
        return dequantize_mxfp4(ckpt.read(layout.blocks), ckpt.read(layout.scales), dtype=dtype, device=device,
                                transposed=True, name=layout.name, source=source)

    def float32(self, name: str, *, device: torch.device | str | None = None) -> torch.Tensor:
        """Quantised weight ``name`` in float32, for arithmetic on it (merge, extract).

        bitsandbytes defines a 4-bit weight as its dequantisation to the recorded dtype (what
        bitsandbytes, transformers and PEFT merge into); FP8 and MXFP4 weights are codes times
        scales, decoded straight to float32 so that a merge rounds only once, at the end.
        """
        if isinstance(self.quantized[name].layout, QuantizedKeys):
            return self.decode(name, device=device).float()
        return self.decode(name, dtype=torch.float32, device=device)

    def copyable(self, name: str) -> bool:
        """Whether ``name``'s stored bytes are the tensor (a quantised weight's are its codes)."""
        return name not in self.quantized

    def copy_bytes(self, name: str, dst: BinaryIO) -> None:
        if name in self.quantized:
            raise ValueError(f"{name} is quantised; it cannot be copied as plain bytes")
        self.checkpoint.copy_bytes(name, dst)


def read_values(source: TensorSource, name: str, *, buffer: torch.Tensor | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Tensor ``name`` for arithmetic on it: as stored (read into ``buffer`` if given), or, for a
    quantised weight of a view, its values in float32 (:meth:`QuantizedView.float32`, on ``device``)."""
    if isinstance(source, QuantizedView) and name in source.quantized:
        return source.float32(name, device=device)
    return source.read(name, buffer=buffer)


def open_quantized_view(ckpt: Checkpoint) -> QuantizedView | None:
    """The plain view of ``ckpt`` if it holds quantised weights this module decodes, else None.

    Raises:
        AdapterToolError: a quant_method it does not read, or quantised tensors that do not fit their format.
    """
    config = model_config(ckpt)
    settings = config.get("quantization_config") or {}
    method = settings.get("quant_method") if isinstance(settings, dict) else None
    source = str(ckpt.path)
    if method is not None and method not in QUANT_METHODS:
        raise InputError(f"{source}: config.json's quant_method is {method!r}; adaptertool reads "
                         f"{', '.join(QUANT_METHODS)} checkpoints: dequantize it with the tool that made it first")
    quantized: dict[str, QuantizedWeight] = {}
    for weight, keys in find_quantized_weights(ckpt.tensors, source=source).items():
        state = read_quantized_state(ckpt, keys)
        stored = (weight, *(key for key in keys.keys if key != weight))
        quantized[weight] = QuantizedWeight(TensorSpec(weight, code_of_name(state.dtype), state.shape), stored,
                                            state.quant_type, keys)
    headers = {name: (info.dtype, info.shape) for name, info in ckpt.tensors.items()}
    dtype = _published_dtype(config)
    if method in ("fp8", "compressed-tensors"):
        for weight, scheme in find_fp8_weights(headers, settings, source=source).items():
            # compressed-tensors' static activation scale belongs to the quantised layer, not the weight
            activation = [key for key in (weight.removesuffix("weight") + "input_scale",) if key in headers]
            quantized[weight] = QuantizedWeight(TensorSpec(weight, dtype, ckpt[weight].shape),
                                                (weight, scheme.scale, *activation), f"fp8-{scheme.strategy}", scheme)
    elif method == "mxfp4":
        for name, layout in find_mxfp4_weights(headers, source=source).items():
            experts, rows, cols = layout.shape
            quantized[name] = QuantizedWeight(TensorSpec(name, dtype, (experts, cols, rows)),
                                              (layout.blocks, layout.scales), "mxfp4", layout)
    return QuantizedView(ckpt, quantized) if quantized else None


def model_config(ckpt: Checkpoint) -> dict[str, Any]:
    """config.json beside the checkpoint's tensors, or {} where there is none."""
    path = ckpt.root / "config.json" if ckpt.root is not None else None
    return read_json(path) if path is not None and path.is_file() else {}


def _published_dtype(config: dict[str, Any]) -> str:
    """The safetensors code of the dtype FP8/MXFP4 weights decode to: the model's, else bfloat16."""
    name = config.get("dtype") or config.get("torch_dtype")
    return code_of_name(name) if name in FLOAT_DTYPES else "BF16"


_PER_SCALE = {"channel": "row", "tensor": "tensor"}  # FP8 strategies without a block


@dataclass(frozen=True, kw_only=True)
class QuantSummary:
    method: str  # config.json's quant_method (bitsandbytes when the config does not say)
    quant_types: dict[str, int]  # scheme (nf4, fp8-block, mxfp4...) -> weights
    blocksizes: dict[str, int]  # elements or block per scale ("64", "128x128", "row", "tensor", "32") -> weights
    double_quant: int  # weights with double-quantised absmax (bitsandbytes)
    scale_format: str | None  # FP8: float or ue8m0; MXFP4: e8m0; bitsandbytes: None
    weights: int
    parameters: int  # elements the quantised weights stand for
    stored_bytes: int  # bytes of all their entries
    original_bytes: int  # bytes at the dtype they decode to
    bytes_saved: int
    compute_dtype: str | None  # bitsandbytes: from config.json, where present
    skip_modules: list[str] | None  # what the config keeps unquantised (llm_int8_skip_modules, modules_to_not_convert, ignore)


def describe_quantization(view: QuantizedView) -> QuantSummary:
    """Summarise a view's quantised weights from headers, config.json and bitsandbytes' small
    quant_state entries (no weight is read)."""
    ckpt = view.checkpoint
    weights = list(view.quantized.values())
    blocks, double, formats = Counter(), 0, set()
    for weight in weights:
        layout = weight.layout
        if isinstance(layout, QuantizedKeys):
            state = read_quantized_state(ckpt, layout)
            blocks[str(state.blocksize)] += 1
            double += state.nested
        elif isinstance(layout, Fp8Scheme):
            blocks[f"{layout.block[0]}x{layout.block[1]}" if layout.block else _PER_SCALE[layout.strategy]] += 1
            formats.add(layout.scale_fmt)
        else:
            blocks[str(MXFP4_GROUP_SIZE)] += 1
            formats.add("e8m0")
    numel = [math.prod(w.spec.shape) for w in weights]
    original = sum(n * torch_dtype(w.spec.dtype).itemsize for n, w in zip(numel, weights, strict=True))
    stored = sum(ckpt[key].nbytes for w in weights for key in w.stored)
    settings = model_config(ckpt).get("quantization_config") or {}
    skipped = next((settings[k] for k in ("llm_int8_skip_modules", "modules_to_not_convert", "ignore") if settings.get(k)), None)
    return QuantSummary(
        method=settings.get("quant_method", "bitsandbytes"), quant_types=dict(view.schemes()), blocksizes=dict(blocks),
        double_quant=double, scale_format="/".join(sorted(formats)) or None, weights=len(weights), parameters=sum(numel),
        stored_bytes=stored, original_bytes=original, bytes_saved=original - stored,
        compute_dtype=settings.get("bnb_4bit_compute_dtype"), skip_modules=skipped,
    )

"""FP8 weights (E4M3 codes times a float scale): layout, dequantise, quantise; pure tensors.

An FP8 Linear weight ``P.weight`` (F8_E4M3, shape (N, K)) sits beside a scale tensor whose values
multiply the codes back to weights. Two conventions name and shape it:

    quant_method "fp8" (DeepSeek-V3, Qwen3-*-FP8; transformers' FineGrainedFP8Config)
        P.weight_scale_inv   F32 (ceil(N/bn), ceil(K/bk)) for weight_block_size [bn, bk] (default
                             [128, 128]); a scalar for weight_block_size null. scale_fmt "ue8m0":
                             every scale a power of two (F32, or F8_E8M0 bytes).
    quant_method "compressed-tensors", format "float-quantized" (llm-compressor; "naive-quantized" alike)
        P.weight_scale       the model's float dtype; [1] per tensor, [N, 1] per channel,
                             (ceil(N/bn), ceil(K/bk)) per block (weights.block_structure).
                             P.input_scale, if any, is an activation scale and no concern here.

Dequantised, ``W[i, j] = q[i, j] * s[i // bn, j // bk]``: exact in float64, rounded once to the output
dtype. The grid rounds up and an edge block covers only its valid elements, as in DeepSeek-V3's
README ("zero-padded to 128 before calculating the scale"), vLLM and compressed-tensors.
transformers 5.25 infers the block from the grid instead and so gets edge blocks wrong; it is no
reference for them.

Quantised, per block over its valid elements: ``s = amax / 448`` (1 for an all-zero block), under
ue8m0 rounded up to a power of two, stored in the scale's dtype; then ``q = RNE(clamp(w / s, ±448))``
in float32, as DeepSeek's ``weight_quant`` and compressed-tensors compute it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from adaptertool.errors import InputError

__all__ = [
    "FP8_MAX",
    "Fp8Format",
    "Fp8Scheme",
    "check_fp8",
    "dequantize_fp8",
    "find_fp8_weights",
    "fp8_format",
    "fp8_scale_key",
    "quantize_fp8",
    "requantize_fp8",
]

FP8_MAX = 448.0  # largest finite E4M3 (fn) value
_CONVENTIONS = ("fp8", "compressed-tensors")
_STRATEGIES = ("block", "channel", "tensor")
_SCALE_FORMATS = ("float", "ue8m0")
_SCALE_SUFFIX = {"fp8": "_scale_inv", "compressed-tensors": "_scale"}
_SCALE_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F8_E8M0": "float8_e8m0fnu"}
_CT_FORMATS = ("float-quantized", "naive-quantized")  # both store the weight cast to float8_e4m3fn
_DEFAULT_BLOCK = (128, 128)  # transformers' FineGrainedFP8Config when weight_block_size is absent
_SCALE_LIMIT = torch.finfo(torch.float32).max / FP8_MAX  # above it 448 * s overflows float32
_CHUNK_ELEMENTS = 1 << 20  # weight elements processed at a time: bounds every temporary
_CODE_SHIFT = 256.0  # an E4M3 code's value over its float16 reading in _codes_shifted


@dataclass(frozen=True)
class Fp8Format:
    """What a config.json ``quantization_config`` says about its FP8 weights."""

    convention: str  # "fp8" or "compressed-tensors"
    layouts: tuple[tuple[str, tuple[int, int] | None], ...]  # (strategy, block) pairs the weights may use
    scale_fmt: str = "float"


@dataclass(frozen=True, kw_only=True)
class Fp8Scheme:
    """How one FP8 weight is stored: its key, its scale's key and dtype, and the layout of the scale."""

    weight: str
    scale: str
    convention: str  # "fp8" (scale key ``<weight>_scale_inv``) or "compressed-tensors" (``<weight>_scale``)
    strategy: str  # "block", "channel" or "tensor"
    block: tuple[int, int] | None  # (rows, cols) per scale; block strategy only
    scale_fmt: str = "float"  # "ue8m0": every scale a power of two
    scale_dtype: str = "F32"  # safetensors code of the scale tensor

    def __post_init__(self) -> None:
        problem = None
        if self.convention not in _CONVENTIONS:
            problem = f"convention {self.convention!r}"
        elif self.strategy not in _STRATEGIES:
            problem = f"strategy {self.strategy!r}"
        elif (self.block is not None) != (self.strategy == "block") or (
            self.block is not None and (len(self.block) != 2 or min(self.block) < 1)
        ):
            problem = f"block {self.block!r} for strategy {self.strategy!r}"
        elif self.scale_fmt not in _SCALE_FORMATS:
            problem = f"scale_fmt {self.scale_fmt!r}"
        elif self.scale_dtype not in _SCALE_DTYPES or (self.scale_dtype == "F8_E8M0" and self.scale_fmt != "ue8m0"):
            problem = f"scale dtype {self.scale_dtype} with scale_fmt {self.scale_fmt!r}"
        if problem:
            raise InputError(f"FP8 weight {self.weight}: unsupported {problem}")

    def block_size(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """Rows and columns one scale covers in a weight of ``shape`` (a channel is one row, a tensor all)."""
        rows, cols = shape
        if self.strategy == "block":
            assert self.block is not None
            return self.block
        return (1, cols) if self.strategy == "channel" else (max(rows, 1), max(cols, 1))

    def grid(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """Scales down and across a weight of ``shape``: the block grid, rounded up."""
        (rows, cols), (bn, bk) = shape, self.block_size(shape)
        return -(-rows // bn), -(-cols // bk)

    def scale_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        """Shapes the scale of a weight of ``shape`` may have; the first is the one quantising writes."""
        if self.strategy == "tensor":  # transformers writes a scalar, compressed-tensors [1]
            return ((), (1,)) if self.convention == "fp8" else ((1,), ())
        return (self.grid(shape),)


def fp8_scale_key(weight: str, convention: str) -> str:
    """``P.weight`` -> ``P.weight_scale_inv`` ("fp8") or ``P.weight_scale`` ("compressed-tensors")."""
    return weight + _SCALE_SUFFIX[convention]


def fp8_format(quantization_config: Mapping[str, Any], *, source: str = "checkpoint") -> Fp8Format:
    """Read the FP8 convention, block size(s) and scale format from config.json's ``quantization_config``.

    "fp8" has one block size (``weight_block_size``; absent means [128, 128], null per tensor).
    compressed-tensors may list several schemes in ``config_groups``; each must be float-quantized
    8-bit float weights, and a weight's scale shape then says which scheme it uses.

    Raises:
        AdapterToolError: another quant_method, or a scheme adaptertool cannot read.
    """
    method = quantization_config.get("quant_method")
    if method == "fp8":
        raw = quantization_config.get("weight_block_size", _DEFAULT_BLOCK)
        layout = ("tensor", None) if raw is None else ("block", _block(raw, "weight_block_size", source))
        scale_fmt = quantization_config.get("scale_fmt") or "float"
        if scale_fmt not in _SCALE_FORMATS:
            raise InputError(f"{source}: quantization_config has scale_fmt {scale_fmt!r}; expected 'float' or 'ue8m0'")
        return Fp8Format("fp8", (layout,), scale_fmt)
    if method == "compressed-tensors":
        groups = quantization_config.get("config_groups") or {}
        if not isinstance(groups, Mapping) or not groups:
            raise InputError(f"{source}: compressed-tensors quantization_config has no config_groups; config.json is corrupt")
        layouts: list[tuple[str, tuple[int, int] | None]] = []
        for name, group in groups.items():
            layout = _group_layout(name, group, quantization_config.get("format"), source)
            if layout not in layouts:
                layouts.append(layout)
        return Fp8Format("compressed-tensors", tuple(layouts))
    raise InputError(f"{source}: quant_method {method!r} is not an FP8 format; expected 'fp8' or 'compressed-tensors'")


def find_fp8_weights(specs: Mapping[str, tuple[str, tuple[int, ...]]], quantization_config: Mapping[str, Any], *,
                     source: str = "checkpoint") -> dict[str, Fp8Scheme]:
    """Find the FP8 weights among a checkpoint's tensors, from its header and config only.

    A tensor is FP8 when its dtype is F8_E4M3 and its scale (``<name>_scale_inv`` or ``<name>_scale``,
    by the convention) exists; every other tensor is high precision and passes through.

    Args:
        specs: ``{tensor name: (safetensors dtype code, shape)}`` of the whole checkpoint.
        quantization_config: config.json's ``quantization_config``.

    Returns:
        ``{weight name: Fp8Scheme}`` in the order of ``specs``.

    Raises:
        AdapterToolError: an F8_E4M3 tensor without its scale, a weight that is not 2-D, a scale of
        another dtype than F32/BF16/F16/F8_E8M0, or a scale whose shape fits no layout of the config.
    """
    fmt = fp8_format(quantization_config, source=source)
    found: dict[str, Fp8Scheme] = {}
    for name, (code, shape) in specs.items():
        scale = fp8_scale_key(name, fmt.convention)
        if code != "F8_E4M3":
            if code == "F8_E5M2" and scale in specs:
                raise InputError(f"{source}: FP8 weight {name} is F8_E5M2; adaptertool reads F8_E4M3 weights only")
            continue
        if scale not in specs:
            raise InputError(f"{source}: F8_E4M3 tensor {name} has no {scale}; the checkpoint is incomplete")
        if len(shape) != 2:
            raise InputError(f"{source}: FP8 weight {name} has shape {list(shape)}; adaptertool reads 2-D FP8 weights only")
        scale_code, scale_shape = specs[scale]
        if scale_code not in _SCALE_DTYPES:
            raise InputError(f"{source}: FP8 scale {scale} is {scale_code}; expected F32, BF16, F16 or F8_E8M0")
        scale_fmt = "ue8m0" if scale_code == "F8_E8M0" else fmt.scale_fmt  # E8M0 holds powers of two only
        candidates = [Fp8Scheme(weight=name, scale=scale, convention=fmt.convention, strategy=strategy, block=block,
                                scale_fmt=scale_fmt, scale_dtype=scale_code) for strategy, block in fmt.layouts]
        fitting = [c for c in candidates if tuple(scale_shape) in c.scale_shapes(shape)]
        if not fitting:  # several can fit only where they mean the same scales (e.g. block (1, k) and channel)
            expected = " or ".join(f"{list(c.scale_shapes(shape)[0])} ({_describe(c)})" for c in candidates)
            raise InputError(f"{source}: FP8 scale {scale} has shape {list(scale_shape)} but weight {name} "
                             f"{list(shape)} needs {expected}; the checkpoint is corrupt")
        found[name] = fitting[0]
    return found


def check_fp8(q: torch.Tensor, scale: torch.Tensor, scheme: Fp8Scheme, *, source: str = "checkpoint") -> None:
    """:func:`dequantize_fp8`'s checks of the codes and scale, for a caller that decodes the same tensors
    again and again (training) and passes ``checked=True`` after this: no pass and no device sync per decode.

    Raises:
        AdapterToolError: as :func:`dequantize_fp8`.
    """
    _checked_grid(q, scale, scheme, q.device, source)
    if bool((q.view(torch.uint8) & 0x7F).eq_(0x7F).any()):  # S.1111.111: E4M3's NaNs
        raise InputError(f"{source}: FP8 weight {scheme.weight} holds NaN codes; the checkpoint is corrupt")


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, scheme: Fp8Scheme, *, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None, source: str = "checkpoint",
                   chunk_elements: int = _CHUNK_ELEMENTS, checked: bool = False) -> torch.Tensor:
    """The dense weight ``q * s``, each scale over its block, rounded once to ``dtype``.

    Works through ``chunk_elements`` at a time, so beyond the output it holds only chunk-sized
    temporaries. float32 products of float32 operands round once already; for a narrower dtype the
    exact product (float64) is rounded to float32 with round-to-odd first, which makes the final
    rounding to ``dtype`` the only one.

    Args:
        q: the stored float8_e4m3fn codes (N, K).
        scale: the stored scale, of a shape in ``scheme.scale_shapes``.
        device: where to build the result; None for ``q``'s device.
        checked: :func:`check_fp8` passed on these tensors: their values are not checked again.

    Raises:
        AdapterToolError: tensors that do not fit ``scheme``, NaN codes, or a scale that is NaN,
        infinite, not positive or so large that ``448 * s`` overflows float32.
    """
    device = q.device if device is None else torch.device(device)
    grid = _checked_grid(q, scale, scheme, device, source, values=not checked)
    rows, cols = q.shape
    bn, bk = scheme.block_size((rows, cols))
    spread = _spread_columns(grid, bk, cols)
    out = torch.empty((rows, cols), dtype=dtype, device=device)
    spread = spread * _CODE_SHIFT  # exact (a power of two): see _codes_shifted
    for r0, r1 in _row_chunks(rows, cols, bn, grid.shape[0], chunk_elements):
        codes, scales = _codes_shifted(q[r0:r1].to(device), scheme, source, nan_check=not checked), _rows(spread, bn, r0, r1)
        if dtype == torch.float32:
            torch.mul(codes, scales, out=out[r0:r1])
        elif dtype == torch.float64:
            out[r0:r1] = codes.double().mul_(scales.double())
        else:
            out[r0:r1] = _round_to_odd(codes.double().mul_(scales.double()))
    return out


def quantize_fp8(weight: torch.Tensor, scheme: Fp8Scheme, *, source: str = "checkpoint",
                 chunk_elements: int = _CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a float (N, K) ``weight`` to float8_e4m3fn codes and scales, as ``scheme`` lays them out.

    ``weight`` is read, never modified; beyond the outputs only chunk-sized temporaries are held.

    Returns:
        ``(q, scale)``: codes (N, K) and the scale in ``scheme.scale_dtype`` of shape
        ``scheme.scale_shapes((N, K))[0]``.

    Raises:
        AdapterToolError: NaN or Inf in ``weight``, or a scale that underflows the scale dtype.
    """
    if weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise InputError(f"{source}: FP8 weight {scheme.weight} must be a 2-D float tensor, "
                         f"not {weight.dtype} {list(weight.shape)}")
    shape = (rows, cols) = (weight.shape[0], weight.shape[1])
    bn, bk = scheme.block_size(shape)
    chunks = _row_chunks(rows, cols, bn, scheme.grid(shape)[0], chunk_elements)
    amax = torch.zeros(scheme.grid(shape), dtype=torch.float32, device=weight.device)
    for r0, r1 in chunks:
        part = _block_max(weight[r0:r1].float().abs(), bn, bk)
        first = r0 // bn  # chunks hold whole blocks, or the grid has one row
        amax[first:first + part.shape[0]] = torch.maximum(amax[first:first + part.shape[0]], part)
    if not bool(torch.isfinite(amax).all()):
        raise InputError(f"{source}: tensor {scheme.weight} holds NaN or Inf; it cannot be quantised "
                         "(find them with adaptertool verify --nan)")
    scales = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    if scheme.scale_fmt == "ue8m0":
        scales = _power_of_two_up(scales)
    stored = scales.to(_torch_dtype(scheme.scale_dtype))
    scales = stored.float()  # divide by exactly what is stored (a BF16 scale may round below amax / 448: the clamp saturates)
    if not bool((scales > 0).all()):
        raise InputError(f"{source}: tensor {scheme.weight} has blocks too small for {scheme.scale_dtype} scales "
                         "(a scale rounds to 0); quantise with float32 scales")
    spread = _spread_columns(scales, bk, cols)
    q = torch.empty(shape, dtype=torch.float8_e4m3fn, device=weight.device)
    for r0, r1 in chunks:
        q[r0:r1] = torch.div(weight[r0:r1].float(), _rows(spread, bn, r0, r1)).clamp_(-FP8_MAX, FP8_MAX).to(q.dtype)
    return q, stored.reshape(scheme.scale_shapes(shape)[0])


def requantize_fp8(weight: torch.Tensor, stored_q: torch.Tensor, stored_scale: torch.Tensor, scheme: Fp8Scheme, *,
                   source: str = "checkpoint", chunk_elements: int = _CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_fp8`, except that a block whose values equal the stored ones keeps the stored bytes.

    A merge passes its float32 ``weight = dequantize_fp8(stored) + delta`` here: blocks the delta
    left alone come back bit-identical, whichever tool made them. Quantising them again would not
    always do that, though the values would not change: about 7% of the scales transformers writes
    (``1 / (448 / amax)``) come back one ulp apart, a ue8m0 block whose largest code is 224 comes back
    with half the scale and twice the codes, and a clipping observer's scales come back larger.

    Returns:
        ``(q, scale)`` shaped and typed as ``stored_q`` and ``stored_scale``.
    """
    if stored_q.shape != weight.shape:
        raise InputError(f"{source}: FP8 weight {scheme.weight} is {list(stored_q.shape)} "
                         f"but its new values are {list(weight.shape)}")
    device = weight.device
    old = _checked_grid(stored_q, stored_scale, scheme, device, source)
    rows, cols = stored_q.shape
    bn, bk = scheme.block_size((rows, cols))
    chunks = _row_chunks(rows, cols, bn, old.shape[0], chunk_elements)
    old_spread = _spread_columns(old, bk, cols) * _CODE_SHIFT
    changed = torch.zeros(old.shape, dtype=torch.bool, device=device)
    for r0, r1 in chunks:
        before = _codes_shifted(stored_q[r0:r1].to(device), scheme, source).mul_(_rows(old_spread, bn, r0, r1))
        part = _block_max((weight[r0:r1].float() != before).to(torch.uint8), bn, bk).bool()
        changed[r0 // bn:r0 // bn + part.shape[0]] |= part
    q, scale = quantize_fp8(weight, scheme, source=source, chunk_elements=chunk_elements)
    spread = _spread_columns(changed, bk, cols)
    for r0, r1 in chunks:
        q[r0:r1] = _select(_rows(spread, bn, r0, r1), q[r0:r1], stored_q[r0:r1].to(device))
    return q, _select(changed, scale.reshape(old.shape), stored_scale.to(device).reshape(old.shape)).reshape(stored_scale.shape)


def _checked_grid(q: torch.Tensor, scale: torch.Tensor, scheme: Fp8Scheme, device: torch.device,
                  source: str, *, values: bool = True) -> torch.Tensor:
    """The scale as a float32 (rows, cols) grid on ``device``, after checking both tensors against ``scheme``
    (``values``: the scale's values too, a pass and, on a GPU, a sync)."""
    if q.dtype != torch.float8_e4m3fn or q.dim() != 2:
        raise InputError(f"{source}: FP8 weight {scheme.weight} is {q.dtype} {list(q.shape)}; expected 2-D float8_e4m3fn")
    shape = (q.shape[0], q.shape[1])
    if tuple(scale.shape) not in scheme.scale_shapes(shape):
        raise InputError(f"{source}: FP8 scale {scheme.scale} has shape {list(scale.shape)} but weight {scheme.weight} "
                         f"{list(shape)} needs {list(scheme.scale_shapes(shape)[0])} ({_describe(scheme)}); the checkpoint is corrupt")
    if scale.dtype != _torch_dtype(scheme.scale_dtype):
        raise InputError(f"{source}: FP8 scale {scheme.scale} is {scale.dtype}; its header said {scheme.scale_dtype}")
    grid = scale.to(device=device, dtype=torch.float32).reshape(scheme.grid(shape))
    if values and not bool(((grid > 0) & (grid <= _SCALE_LIMIT)).all()):
        raise InputError(f"{source}: FP8 scale {scheme.scale} holds a scale that is NaN, infinite, not positive or "
                         f"above {_SCALE_LIMIT:.3g}; the checkpoint is corrupt")
    return grid


def _codes_shifted(q: torch.Tensor, scheme: Fp8Scheme, source: str, *, nan_check: bool = True) -> torch.Tensor:
    """float32 values of float8_e4m3fn codes, divided by _CODE_SHIFT (exact).

    torch converts float8 to float element by element (about 7 ns each here); this is a few
    vectorised passes instead: an E4M3 byte's exponent and mantissa bits, moved into a float16's
    (sign to bit 15, the rest up by 7), make a float16 of exactly the code's value / 256,
    subnormals included, since both exponent biases differ by 8 (15 - 7). NaN codes (0x7F, 0xFF)
    would come out finite, so they are refused.
    """
    bits = q.view(torch.int8).to(torch.int16)  # sign-extended: the sign bit fills bits 8-15
    sign = bits & -0x8000
    bits <<= 7
    bits &= 0x3F80
    if nan_check and bool((bits == 0x3F80).any()):
        raise InputError(f"{source}: FP8 weight {scheme.weight} holds NaN codes; the checkpoint is corrupt")
    bits |= sign
    return bits.view(torch.float16).float()


def _row_chunks(rows: int, cols: int, block_rows: int, grid_rows: int, budget: int) -> list[tuple[int, int]]:
    """Row ranges of about ``budget`` elements; one block row each where blocks span rows and the grid
    has several, so that one row of scales broadcasts over the chunk (see :func:`_rows`)."""
    step = max(1, budget // max(cols, 1))
    if grid_rows > 1:
        step = block_rows if block_rows > 1 else step
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


def _spread_columns(grid: torch.Tensor, block_cols: int, cols: int) -> torch.Tensor:
    """``grid`` repeated across each block's columns, (grid rows, cols); left as is with one grid column."""
    if grid.shape[1] == 1:
        return grid
    return grid.repeat_interleave(block_cols, dim=1)[:, :cols]


def _rows(spread: torch.Tensor, block_rows: int, r0: int, r1: int) -> torch.Tensor:
    """The per-element values of rows ``r0:r1`` from a column-spread grid (broadcastable): within one
    block row a view of that row of scales, else (one row per scale row) the rows gathered."""
    if spread.shape[0] == 1:
        return spread
    if r1 - r0 <= block_rows and r0 // block_rows == (r1 - 1) // block_rows:
        return spread[r0 // block_rows]
    return spread.index_select(0, torch.arange(r0, r1, device=spread.device) // block_rows)


def _block_max(x: torch.Tensor, block_rows: int, block_cols: int) -> torch.Tensor:
    """Max over each (block_rows, block_cols) block of ``x``; edge blocks are partial. NaN propagates."""
    return _group_max(_group_max(x, block_cols, 1), block_rows, 0)


def _group_max(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    length = x.shape[dim]
    whole = length // size * size
    parts = []
    if whole:
        parts.append(x.narrow(dim, 0, whole).unflatten(dim, (whole // size, size)).amax(dim + 1))
    if whole < length:
        parts.append(x.narrow(dim, whole, length - whole).amax(dim, keepdim=True))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _power_of_two_up(x: torch.Tensor) -> torch.Tensor:
    """The least power of two (2**-126 at least) >= each positive float32 of ``x``, exactly (mantissa carried up)."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x7FFFFF) & 0x7F800000).view(torch.float32)


def _round_to_odd(x: torch.Tensor) -> torch.Tensor:
    """float64 ``x`` to float32, rounding an inexact value toward zero and setting its last bit.

    Rounded so, a later round-to-nearest to any float with at least two bits fewer (bfloat16,
    float16) equals rounding ``x`` there directly: float32 then bfloat16 by nearest-even twice would
    not, for about one product in 60,000 (bfloat16) or 20,000 (float16) of arbitrary float32 scales.
    """
    near = x.float()
    back = near.double()
    inexact = back != x
    bits = near.view(torch.int32) - (inexact & (back.abs() > x.abs())).int()  # one ulp toward zero where it rounded up
    return (bits | inexact.int()).view(torch.float32)


def _select(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``torch.where`` by bytes, so one-byte float dtypes (no CPU kernel) work and every bit is kept."""
    if new.element_size() == 1:
        return torch.where(mask, new.view(torch.uint8), old.view(torch.uint8)).view(new.dtype)
    return torch.where(mask, new, old)


def _torch_dtype(code: str) -> torch.dtype:
    dtype = getattr(torch, _SCALE_DTYPES[code], None)
    if dtype is None:
        raise InputError(f"FP8 scales of dtype {code} need a newer torch than {torch.__version__}; upgrade torch")
    return dtype


def _block(raw: Any, what: str, source: str) -> tuple[int, int]:
    if not (isinstance(raw, (list, tuple)) and len(raw) == 2 and all(isinstance(v, int) and v > 0 for v in raw)):
        raise InputError(f"{source}: quantization_config {what} is {raw!r}; expected two positive integers")
    return int(raw[0]), int(raw[1])


def _group_layout(name: str, group: Any, default_format: Any, source: str) -> tuple[str, tuple[int, int] | None]:
    weights = group.get("weights") if isinstance(group, Mapping) else None
    fmt = (group.get("format") if isinstance(group, Mapping) else None) or default_format
    if not isinstance(weights, Mapping) or fmt not in _CT_FORMATS or weights.get("type") != "float" \
            or weights.get("num_bits") != 8:
        raise InputError(f"{source}: compressed-tensors group {name} is not float-quantized FP8 weights; "
                         "adaptertool reads 8-bit float weights only")
    if not weights.get("symmetric", True):
        raise InputError(f"{source}: compressed-tensors group {name} has asymmetric weights; adaptertool reads symmetric FP8 only")
    strategy = weights.get("strategy")
    if strategy == "block":
        return "block", _block(weights.get("block_structure"), f"config_groups.{name}.weights.block_structure", source)
    if strategy in ("channel", "tensor"):
        return strategy, None
    raise InputError(f"{source}: compressed-tensors group {name} has weight strategy {strategy!r}; "
                     "adaptertool reads block, channel and tensor FP8")


def _describe(scheme: Fp8Scheme) -> str:
    return f"block {list(scheme.block)}" if scheme.block is not None else f"per {scheme.strategy}"

"""MXFP4 expert weights as gpt-oss stores them: layout, dequantise, quantise; pure tensors.

The format is OCP Microscaling (MX) v1.0 with FP4 E2M1 elements in groups of 32 sharing one E8M0
scale. gpt-oss (``quant_method: "mxfp4"``) stores each fused expert parameter ``P``
(``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``) as two uint8 tensors:

    P_blocks   U8 (E, out, in/32, 16)   two codes a byte: element 2j in the low nibble, 2j+1 in the high
    P_scales   U8 (E, out, in/32)       the group's scale 2**(byte - 127); byte 255 is NaN

so ``value = E2M1[code] * 2**(byte - 127)``, exact in float32. Groups run along the input dimension.
gpt-oss' own parameters (and what transformers saves once dequantised) are the transpose,
(E, in, out); ``transposed=True`` gives and takes that layout.

Quantising a group follows the default of triton_kernels' ``downcast_to_mxfp`` (what transformers
calls): the scale is the least power of two >= amax / 6, read off float32's exponent field, so no
element saturates, a nonzero group's byte is at least 1 and an all-zero group's is 0. Each code is
the E2M1 value nearest ``v / scale``, ties to the even code, with ``v``'s sign bit: -0.0 and small
negatives give code 8 (-0), so a dequantised -0 comes back as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from adaptertool.errors import InputError

__all__ = [
    "E2M1_VALUES", "MXFP4_GROUP_SIZE", "Mxfp4Weight", "dequantize_mxfp4", "find_mxfp4_weights", "quantize_mxfp4",
    "requantize_mxfp4",
]

MXFP4_GROUP_SIZE = 32  # elements per scale
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # by code
# magnitude thresholds between codes c and c + 1, and whether a tie goes up (to the even code c + 1)
_THRESHOLDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))
_NAN_SCALE = 255
_OVERFLOW_SCALE = 253  # from here 4 * 2**(byte - 127) exceeds float32


@dataclass(frozen=True, kw_only=True)
class Mxfp4Weight:
    """One MXFP4 parameter: the keys of its two stored tensors and its dense (E, out, in) shape."""

    name: str  # P, e.g. model.layers.0.mlp.experts.gate_up_proj
    blocks: str  # P_blocks
    scales: str  # P_scales
    shape: tuple[int, int, int]


def find_mxfp4_weights(specs: Mapping[str, tuple[str, tuple[int, ...]]], *,
                       source: str = "checkpoint") -> dict[str, Mxfp4Weight]:
    """Find the ``P_blocks``/``P_scales`` pairs of a checkpoint whose quant_method is mxfp4.

    Args:
        specs: ``{tensor name: (safetensors dtype code, shape)}`` of the whole checkpoint.

    Returns:
        ``{P: Mxfp4Weight}`` in the order of the ``_blocks`` tensors in ``specs``.

    Raises:
        AdapterToolError: a half without the other, a half that is not U8, or shapes that do not pair up.
    """
    found: dict[str, Mxfp4Weight] = {}
    for key, (code, shape) in specs.items():
        if key.endswith("_scales") and key.removesuffix("_scales") + "_blocks" not in specs:
            raise InputError(f"{source}: MXFP4 scales {key} have no {key.removesuffix('_scales')}_blocks; the checkpoint is incomplete")
        if not key.endswith("_blocks"):
            continue
        name = key.removesuffix("_blocks")
        scales = name + "_scales"
        if scales not in specs:
            raise InputError(f"{source}: MXFP4 blocks {key} have no {scales}; the checkpoint is incomplete")
        scale_code, scale_shape = specs[scales]
        if code != "U8" or scale_code != "U8":
            raise InputError(f"{source}: MXFP4 tensors {key} and {scales} are {code} and {scale_code}; both must be U8")
        if len(shape) != 4 or shape[-1] != MXFP4_GROUP_SIZE // 2 or tuple(scale_shape) != tuple(shape[:-1]):
            raise InputError(f"{source}: MXFP4 blocks {key} {list(shape)} and scales {scales} {list(scale_shape)} do not "
                             "pair as (E, out, G, 16) and (E, out, G); the checkpoint is corrupt")
        found[name] = Mxfp4Weight(name=name, blocks=key, scales=scales, shape=(shape[0], shape[1], shape[2] * MXFP4_GROUP_SIZE))
    return found


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, *, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None, transposed: bool = False, name: str = "weight",
                     source: str = "checkpoint") -> torch.Tensor:
    """The dense weight (E, out, in), or (E, in, out) with ``transposed``; exact, rounded once to ``dtype``.

    One expert at a time, so the temporaries stay a few times one expert's size.

    Args:
        blocks: uint8 (E, out, G, 16); scales: uint8 (E, out, G).
        device: where to build the result; None for ``blocks``' device.
        name: the parameter, for errors.

    Raises:
        AdapterToolError: tensors that do not pair up, a NaN scale (byte 255), or values beyond float32.
    """
    device = blocks.device if device is None else torch.device(device)
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.dim() != 4 \
            or blocks.shape[-1] != MXFP4_GROUP_SIZE // 2 or scales.shape != blocks.shape[:-1]:
        raise InputError(f"{source}: MXFP4 tensors of {name} are {blocks.dtype} {list(blocks.shape)} and "
                         f"{scales.dtype} {list(scales.shape)}; expected uint8 (E, out, G, 16) and (E, out, G)")
    experts, rows, groups, _ = blocks.shape
    top = int(scales.max()) if scales.numel() else 0
    if top == _NAN_SCALE:
        raise InputError(f"{source}: MXFP4 scales {name}_scales hold byte 255, which is NaN in E8M0; the checkpoint is corrupt")
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
    cols = groups * MXFP4_GROUP_SIZE
    out = torch.empty((experts, cols, rows) if transposed else (experts, rows, cols), dtype=dtype, device=device)
    for e in range(experts):
        packed = blocks[e].to(device)
        codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).int()  # (rows, G, 16, 2): even, odd elements
        exponents = scales[e].to(device).int().sub_(127).unsqueeze(-1)
        values = torch.ldexp(lut[codes].reshape(rows, groups, MXFP4_GROUP_SIZE), exponents).reshape(rows, cols)
        if top >= _OVERFLOW_SCALE and not bool(torch.isfinite(values).all()):
            raise InputError(f"{source}: MXFP4 scales {name}_scales make values beyond float32 in expert {e}; "
                             "the checkpoint is corrupt")
        out[e] = values.T if transposed else values
    return out


def quantize_mxfp4(weight: torch.Tensor, *, transposed: bool = False, name: str = "weight",
                   source: str = "checkpoint") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a float (E, out, in) ``weight`` (or (E, in, out) with ``transposed``) to MXFP4, in float32.

    Returns:
        ``(blocks, scales)``: uint8 (E, out, in/32, 16) and (E, out, in/32).

    Raises:
        AdapterToolError: a shape whose input dimension is not a multiple of 32, or NaN/Inf in ``weight``.
    """
    if weight.dim() != 3 or not weight.dtype.is_floating_point:
        raise InputError(f"{source}: MXFP4 weight {name} must be a 3-D float tensor, not {weight.dtype} {list(weight.shape)}")
    if transposed:
        weight = weight.transpose(1, 2)
    experts, rows, cols = weight.shape
    if cols % MXFP4_GROUP_SIZE:
        raise InputError(f"{source}: MXFP4 weight {name} has {cols} inputs; MXFP4 needs a multiple of {MXFP4_GROUP_SIZE}")
    groups = cols // MXFP4_GROUP_SIZE
    blocks = torch.empty((experts, rows, groups, MXFP4_GROUP_SIZE // 2), dtype=torch.uint8, device=weight.device)
    scales = torch.empty((experts, rows, groups), dtype=torch.uint8, device=weight.device)
    for e in range(experts):
        x = weight[e].float().reshape(rows, groups, MXFP4_GROUP_SIZE)
        amax = x.abs().amax(-1)
        if not bool(torch.isfinite(amax).all()):
            raise InputError(f"{source}: tensor {name} holds NaN or Inf in expert {e}; it cannot be quantised "
                             "(find them with adaptertool verify --nan)")
        # the least power of two >= amax / 6: carry any mantissa bit into the exponent; 0 stays byte 0
        exponent = ((amax / 6).view(torch.int32) + 0x7FFFFF) >> 23
        scales[e] = exponent.to(torch.uint8)
        v = x / torch.ldexp(torch.ones_like(amax), exponent - 127).unsqueeze(-1)  # exact: a power of two
        magnitude = v.abs()
        codes = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
        for threshold, tie_up in _THRESHOLDS:
            codes += (magnitude >= threshold) if tie_up else (magnitude > threshold)
        codes |= torch.signbit(v).to(torch.uint8) << 3
        blocks[e] = (codes[..., 0::2] | (codes[..., 1::2] << 4)).reshape(rows, groups, MXFP4_GROUP_SIZE // 2)
    return blocks, scales


def requantize_mxfp4(weight: torch.Tensor, stored_blocks: torch.Tensor, stored_scales: torch.Tensor, *,
                     transposed: bool = False, name: str = "weight",
                     source: str = "checkpoint") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_mxfp4`, except that a group whose values equal the stored ones keeps the stored bytes.

    A merge passes its float32 ``weight = dequantize_mxfp4(stored) + delta`` here: groups the delta
    left alone come back bit-identical. Quantising them again would not always do that though the
    values would not change (a group whose largest value is 3 comes back with half the scale).

    Returns:
        ``(blocks, scales)`` shaped as ``stored_blocks`` and ``stored_scales``.
    """
    blocks, scales = quantize_mxfp4(weight, transposed=transposed, name=name, source=source)
    if blocks.shape != stored_blocks.shape or scales.shape != stored_scales.shape:
        raise InputError(f"{source}: MXFP4 weight {name} of shape {list(weight.shape)} does not fit its stored "
                         f"blocks {list(stored_blocks.shape)}")
    experts, rows, groups, _ = blocks.shape
    for e in range(experts):  # one expert at a time: the comparison's temporaries stay small
        old = dequantize_mxfp4(stored_blocks[e : e + 1], stored_scales[e : e + 1], name=name, source=source)[0]
        new = weight[e].T if transposed else weight[e]
        same = (new.float().reshape(rows, groups, MXFP4_GROUP_SIZE) == old.reshape(rows, groups, MXFP4_GROUP_SIZE)).all(-1)
        scales[e] = torch.where(same, stored_scales[e], scales[e])
        blocks[e] = torch.where(same.unsqueeze(-1), stored_blocks[e], blocks[e])
    return blocks, scales

"""Blockwise 4-bit quantisation (first level): absmax per block, a 4-bit code per element, two per byte.

For block b of ``blocksize`` consecutive elements of ``W.flatten()`` (the last block may be partial):

    absmax[b] = max |W[i]|                          (float32, exact)
    x[i]      = float32(W[i]) * float32(1 / absmax[b])
    code[i]   = the codebook's code for x[i]        (see :mod:`adaptertool.quant.tables`)
    byte[k]   = code[2k] << 4 | code[2k+1]          (first element in the high nibble)

and back: ``W'[i] = float32(values[code[i]] * absmax[b])``, rounded once to the output dtype.

Three details follow bitsandbytes 0.50 on the CPU bit for bit: the reciprocal is taken of
``max(absmax, 1e-38)`` (so an all-zero block codes 0.0 and stores absmax 0); the last, partial block
divides by its absmax instead of multiplying by the reciprocal, and stores that absmax clamped to
1e-38; an odd element count pads the last low nibble with the code of 0.0.
"""

from __future__ import annotations

import sys

import torch

from adaptertool.quant.lookup import lookup_codes
from adaptertool.quant.tables import AMBIGUOUS, Codebook

__all__ = ["BLOCKSIZES", "block_absmax", "block_count", "dequantize_4bit", "packed_size", "quantize_4bit"]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

_TINY = 1e-38  # bitsandbytes' floor under absmax before taking its reciprocal
_CHUNK_ELEMENTS = 1 << 19  # elements per slice: temporaries (~5 MB) stay in L3; measured best on 1-2 cores (2**18..2**21 tried)
# integer view and sign-clearing mask per float dtype: |x| as bits orders like |x| as a value
_MAGNITUDE_BITS = {
    torch.float32: (torch.int32, 0x7FFFFFFF),
    torch.float16: (torch.int16, 0x7FFF),
    torch.bfloat16: (torch.int16, 0x7FFF),
}


def block_count(numel: int, blocksize: int) -> int:
    """Number of absmax blocks for ``numel`` elements: ``ceil(numel / blocksize)``."""
    return -(-numel // blocksize)


def packed_size(numel: int) -> int:
    """Bytes of packed codes for ``numel`` elements: ``ceil(numel / 2)``."""
    return (numel + 1) // 2


def block_absmax(weight: torch.Tensor, *, blocksize: int = 64, chunk_elements: int = _CHUNK_ELEMENTS) -> torch.Tensor:
    """The float32 absmax per block that :func:`quantize_4bit` stores, without coding anything.

    Cheap (one integer max per block): what a planner needs to compute double quantisation's offset.
    """
    _check(weight, blocksize)
    flat = weight.detach().reshape(-1)
    full_blocks, tail = divmod(flat.numel(), blocksize)
    absmax = torch.empty(block_count(flat.numel(), blocksize), dtype=torch.float32)
    step = max(1, chunk_elements // blocksize)
    for first in range(0, full_blocks, step):
        last = min(full_blocks, first + step)
        _block_absmax(flat[first * blocksize : last * blocksize].view(last - first, blocksize), out=absmax[first:last])
    if tail:
        absmax[-1] = flat[full_blocks * blocksize :].float().abs().max().clamp(min=_TINY)
    return absmax


def quantize_4bit(weight: torch.Tensor, book: Codebook, *, blocksize: int = 64,
                  chunk_elements: int = _CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``weight`` blockwise to 4-bit codes; computed in float32, ``weight`` is not modified.

    Args:
        weight: float32, float16 or bfloat16, any shape (flattened row-major).
        book: the code table, e.g. ``codebook("nf4")``.
        blocksize: elements per absmax block, a power of two in 32..4096.
        chunk_elements: elements processed at a time (bounds the temporaries; no effect on the result).

    Returns:
        ``(packed, absmax)``: uint8 ``(ceil(n/2), 1)`` and float32 ``(ceil(n/blocksize),)``. NaN or
        Inf in a block make its absmax non-finite; callers that must reject them check ``absmax``.
    """
    _check(weight, blocksize)
    flat = weight.detach().reshape(-1)
    numel = flat.numel()
    full_blocks, tail = divmod(numel, blocksize)
    packed = torch.empty(packed_size(numel), dtype=torch.uint8)
    absmax = torch.empty(block_count(numel, blocksize), dtype=torch.float32)
    step = max(1, chunk_elements // blocksize)  # blocks per chunk
    # Work buffers reused by every chunk: fresh multi-MB tensors would each cost page faults.
    room = min(step, full_blocks) * blocksize
    x_buf = torch.empty(room, dtype=torch.float32)
    key_buf = torch.empty(room, dtype=torch.int32)
    code_buf = torch.empty(room, dtype=torch.uint8)
    for first in range(0, full_blocks, step):
        last = min(full_blocks, first + step)
        size = (last - first) * blocksize
        blocks = flat[first * blocksize : last * blocksize].view(last - first, blocksize)  # (chunk blocks, blocksize)
        scale = _block_absmax(blocks, out=absmax[first:last])
        x = x_buf[:size]
        # float32 product (promotion from 16-bit is exact), one rounding: as bitsandbytes
        torch.mul(blocks, (1.0 / scale.clamp(min=_TINY)).unsqueeze(1), out=x.view(last - first, blocksize))
        codes = code_buf[:size]
        lookup_codes(x.view(-1), book.lookup, book.exact_codes, flag=AMBIGUOUS, key=key_buf[:size], out=codes)
        # blocksize is even, so every chunk starts on a byte boundary
        _pack(codes, packed[first * blocksize // 2 : last * blocksize // 2])
    if tail:
        rest = flat[full_blocks * blocksize :].float()
        scale = rest.abs().max().clamp(min=_TINY)
        absmax[-1] = scale
        codes = book.exact_codes(rest / scale)
        if tail % 2:
            codes = torch.cat([codes, torch.tensor([book.zero_code], dtype=torch.uint8)])
        _pack(codes, packed[full_blocks * blocksize // 2 :])
    return packed.unsqueeze(1), absmax


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, values: torch.Tensor, *, shape: tuple[int, ...],
                    blocksize: int = 64, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                    chunk_elements: int = _CHUNK_ELEMENTS) -> torch.Tensor:
    """Expand packed 4-bit codes: ``W'[i] = float32(values[code[i]] * absmax[i // blocksize])``, cast once to ``dtype``.

    Args:
        packed: uint8 codes, two per byte (any shape holding ``ceil(n/2)`` bytes).
        absmax: float32 ``(ceil(n/blocksize),)``.
        values: the 16 code values to use, i.e. the checkpoint's stored ``quant_map``.
        shape: the weight's shape (n = its element count).
        blocksize: elements per absmax block.
        dtype: output dtype.
        device: where the weight is expanded and returned; None for ``packed``'s device.
        chunk_elements: elements expanded at a time on the CPU (no effect on the result).

    Returns:
        A new tensor of ``shape`` and ``dtype``.
    """
    numel = 1
    for dim in shape:
        numel *= dim
    codes = packed.reshape(-1)
    if codes.dtype != torch.uint8 or codes.numel() != packed_size(numel):
        raise ValueError(f"packed codes must be {packed_size(numel)} uint8 for shape {list(shape)}, got {codes.numel()} {codes.dtype}")
    if absmax.numel() != block_count(numel, blocksize):
        raise ValueError(f"absmax must hold {block_count(numel, blocksize)} values for shape {list(shape)}, got {absmax.numel()}")
    if values.numel() != 16:
        raise ValueError(f"a 4-bit code table has 16 values, got {values.numel()}")
    device = packed.device if device is None else torch.device(device)
    codes = codes.to(device)
    pairs = _pair_table(values.to(device))
    absmax = absmax.reshape(-1).to(device=device, dtype=torch.float32)
    out = torch.empty(numel, dtype=dtype, device=device)
    full_blocks, tail = divmod(numel, blocksize)
    # Cache-sized slices pay off on the CPU; on an accelerator a slice only adds kernel launches.
    step = max(1, chunk_elements // blocksize if device.type == "cpu" else full_blocks)
    for first in range(0, full_blocks, step):
        last = min(full_blocks, first + step)
        chunk = codes[first * blocksize // 2 : last * blocksize // 2]
        expanded = torch.index_select(pairs, 0, chunk.to(torch.int32)).view(torch.float32).view(last - first, blocksize)
        _scale(expanded, absmax[first:last].unsqueeze(1), out=out[first * blocksize : last * blocksize].view(last - first, blocksize))
    if tail:
        chunk = codes[full_blocks * blocksize // 2 :]
        expanded = torch.index_select(pairs, 0, chunk.to(torch.int32)).view(torch.float32)[:tail]
        _scale(expanded, absmax[-1], out=out[full_blocks * blocksize :])
    return out.view(shape)


def _check(weight: torch.Tensor, blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if weight.dtype not in _MAGNITUDE_BITS:
        raise ValueError(f"4-bit quantisation takes float32/float16/bfloat16, got {weight.dtype}")


def _block_absmax(blocks: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    # max |x| per row into float32 ``out``. Clearing the sign bit and taking the integer max is
    # exact, and several times faster than abs().amax() on 16-bit floats; NaN bit patterns exceed
    # Inf's, so a NaN still wins, as it does in abs().amax().
    int_dtype, mask = _MAGNITUDE_BITS[blocks.dtype]
    bits = (blocks.view(int_dtype) & mask).amax(dim=1)
    return out.copy_(bits.view(blocks.dtype))


def _pack(codes: torch.Tensor, out: torch.Tensor) -> None:
    # out[k] = codes[2k] << 4 | codes[2k+1]; codes < 16, so nothing carries
    if sys.byteorder == "little":
        # one int16 holds codes[2k] in its low byte and codes[2k+1] in its high byte: two shifts and
        # an or make the byte, about twice as fast as strided uint8 arithmetic
        pairs = codes.view(torch.int16)
        merged = pairs << 4
        merged |= pairs >> 8
        out.copy_(merged)  # keeps the low byte
    else:
        torch.add(codes[1::2], codes[0::2], alpha=16, out=out)


def _scale(expanded: torch.Tensor, absmax: torch.Tensor, *, out: torch.Tensor) -> None:
    # float32 products rounded once to out's dtype; a float32 out takes them directly (one pass fewer)
    if out.dtype == torch.float32:
        torch.mul(expanded, absmax, out=out)
    else:
        out.copy_(expanded.mul_(absmax))


def _pair_table(values: torch.Tensor) -> torch.Tensor:
    """(256,) int64 holding the two float32 code values a packed byte stands for, high nibble first.

    Gathering one 8-byte entry per byte is ~3x faster than gathering rows of a (256, 2) table.
    """
    byte = torch.arange(256, device=values.device)
    values = values.reshape(-1).to(torch.float32)
    return torch.stack([values[byte >> 4], values[byte & 15]], dim=1).contiguous().view(torch.int64).view(-1)

"""GGUF LoRA adapter files for llama.cpp, written with the gguf package (llama.cpp's own Python writer).

The file holds what llama.cpp's convert_lora_to_gguf.py writes, in its order: general.architecture,
general.type = "adapter", adapter.type = "lora", the general.* facts gguf's Metadata reads from the
adapter folder (its name, and the base models and tags of its model card), adapter.lora.alpha
(float32) and general.quantization_version; then each module's ``.lora_a`` and ``.lora_b``.
llama.cpp's loader requires general.type, general.architecture (equal to the model's), adapter.type
and the tensor pairs; alpha 0 or absent means scale 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["write_gguf_lora"]


def write_gguf_lora(path: Path, tensors: Sequence[tuple[str, torch.Tensor]], *, architecture: str, alpha: float,
                    card_folder: Path, name: str | None = None) -> int:
    """Write a LoRA adapter GGUF to ``path``; returns its size in bytes.

    Args:
        tensors: (GGUF name, float32/float16/bfloat16 tensor), each ``.lora_a`` just before its ``.lora_b``
            (gguf counts a LoRA's parameters from such pairs).
        architecture: llama.cpp's name for the base's architecture (llama, qwen2...).
        alpha: adapter.lora.alpha.
        card_folder: the adapter's folder, whose README.md model card gives the general.* facts.
        name: general.name; None: derived from ``card_folder``'s name, as llama.cpp's converter does.
    """
    import gguf  # imported here: only --to gguf needs it

    writer = gguf.GGUFWriter(None, architecture)
    for key, tensor in tensors:
        array, raw_dtype = _ggml_array(tensor, gguf)
        writer.add_tensor(key, array, raw_dtype=raw_dtype)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    # A LoRA's parameter count is negative (gguf marks it as not exact); Metadata uses it for size labels.
    total_params = writer.get_total_parameter_count()[0]
    gguf.Metadata.load(None, card_folder, name, total_params).set_gguf_meta_model(writer)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.stat().st_size


def _ggml_array(tensor: torch.Tensor, gguf: Any) -> tuple[Any, Any]:
    """(array, raw_dtype) for GGUFWriter.add_tensor: numpy has no bfloat16, so a bfloat16 tensor goes
    as its raw bytes with the BF16 type, as the converter writes it."""
    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy().view("uint8"), gguf.GGMLQuantizationType.BF16
    assert tensor.dtype in (torch.float32, torch.float16), tensor.dtype  # the caller casts to a GGUF float type
    return tensor.contiguous().numpy(), None

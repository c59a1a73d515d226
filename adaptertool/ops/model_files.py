"""Side files of an output model: carried over, with config.json changed only where it must be."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptertool.io import copy_side_files, dtype_name, read_json

if TYPE_CHECKING:
    import torch

__all__ = ["edit_config", "set_config_dtype", "write_config", "write_model_files"]

CONFIG = "config.json"


def set_config_dtype(config: dict[str, Any], dtype: torch.dtype) -> None:
    """Name ``dtype`` as the model's stored dtype, as transformers 5 writes it: ``dtype``, and
    ``torch_dtype`` too where the config has it (the older name, which transformers still reads)."""
    config["dtype"] = dtype_name(dtype)
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name(dtype)


def edit_config(config: dict[str, Any], *, dtype: torch.dtype | None = None, untie: bool = False,
                drop_quantization: bool = False) -> dict[str, Any]:
    """A copy of a transformers config dict with the given changes."""
    config = dict(config)
    if dtype is not None:
        set_config_dtype(config, dtype)
    if untie:
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"] = {**config["text_config"], "tie_word_embeddings": False}
    if drop_quantization:
        config.pop("quantization_config", None)
    return config


def write_model_files(source: Path | None, dest: Path, *, dtype: torch.dtype | None = None, untie: bool = False,
                      drop_quantization: bool = False) -> list[str]:
    """Copy ``source``'s side files into ``dest``, rewriting config.json only if something changed."""
    copied = copy_side_files(source, dest, skip=(CONFIG,))
    config_path = source / CONFIG if source is not None else None
    if config_path is None or not config_path.is_file():
        return copied
    config = read_json(config_path)
    edited = edit_config(config, dtype=dtype, untie=untie, drop_quantization=drop_quantization)
    if edited == config:
        shutil.copyfile(config_path, dest / CONFIG)
    else:
        write_config(dest, edited)
    return sorted([*copied, CONFIG])


def write_config(folder: Path, config: dict[str, Any]) -> None:
    """Write ``folder/config.json`` as transformers' ``to_json_file`` does: indent 2, sorted keys, a final newline."""
    (folder / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

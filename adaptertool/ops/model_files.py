"""Side files of an output model: carried over, with config.json changed only where it must be."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptertool.io import copy_side_files, read_json

if TYPE_CHECKING:
    import torch

__all__ = ["edit_config", "write_model_files"]


def edit_config(config: dict[str, Any], *, dtype: torch.dtype | None = None, untie: bool = False,
                drop_quantization: bool = False) -> dict[str, Any]:
    """A copy of a transformers config dict with the given changes."""
    config = dict(config)
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        config["torch_dtype"] = name
        if "dtype" in config:  # transformers 5 writes "dtype"; older versions "torch_dtype"
            config["dtype"] = name
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
    copied = copy_side_files(source, dest, skip=("config.json",))
    config_path = source / "config.json" if source is not None else None
    if config_path is None or not config_path.is_file():
        return copied
    config = read_json(config_path)
    edited = edit_config(config, dtype=dtype, untie=untie, drop_quantization=drop_quantization)
    if edited == config:
        shutil.copyfile(config_path, dest / "config.json")
    else:
        (dest / "config.json").write_text(json.dumps(edited, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return sorted([*copied, "config.json"])

"""A PEFT adapter on disk: adapter_config.json beside adapter_model.safetensors."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptertool.errors import InputError
from adaptertool.io.format import TensorSpec
from adaptertool.io.reader import Checkpoint, open_checkpoint
from adaptertool.io.sidefiles import read_json
from adaptertool.io.writer import CheckpointWriter

if TYPE_CHECKING:
    import torch

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "is_adapter", "open_adapter", "write_adapter"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_adapter(path: Path) -> bool:
    """Whether ``path`` is a PEFT adapter folder (or a file inside one): it has adapter_config.json."""
    folder = path if path.is_dir() else path.parent
    return path.exists() and (folder / ADAPTER_CONFIG).is_file()


def open_adapter(path: Path) -> tuple[dict[str, Any], Checkpoint, Path]:
    """Open a PEFT adapter folder (or its adapter_model.safetensors).

    Returns:
        (the parsed adapter_config.json, the opened weights, the config's path).
    """
    folder = path if path.is_dir() else path.parent
    config_path = folder / ADAPTER_CONFIG
    if not path.exists():
        raise InputError(f"{path} does not exist; check the adapter path")
    if not config_path.is_file():
        raise InputError(f"{folder} has no {ADAPTER_CONFIG}; is it a PEFT adapter folder?")
    weights = folder / ADAPTER_WEIGHTS
    return read_json(config_path), open_checkpoint(weights if weights.is_file() else folder), config_path


def write_adapter(folder: Path, config: dict[str, Any], specs: Iterable[TensorSpec],
                  fetch: Callable[[str], torch.Tensor]) -> CheckpointWriter:
    """Write a PEFT adapter into ``folder`` (normally a staged output): adapter_config.json and one
    adapter_model.safetensors, as PEFT's save_pretrained does; ``fetch(name)`` supplies each tensor
    when the writer reaches it, so only one is held at a time.

    Returns:
        The finished writer (its ``files`` and ``total_bytes`` describe what was written).
    """
    with CheckpointWriter(folder, specs, max_shard_bytes=None, stem="adapter_model") as writer:
        for spec in writer.order:
            writer.write(spec.name, fetch(spec.name))
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return writer

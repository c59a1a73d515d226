"""Locating a PEFT adapter on disk: adapter_config.json beside adapter_model.safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adaptertool.errors import AdapterToolError
from adaptertool.io.reader import Checkpoint, open_checkpoint
from adaptertool.io.sidefiles import read_json

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "open_adapter"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def open_adapter(path: Path) -> tuple[dict[str, Any], Checkpoint, Path]:
    """Open a PEFT adapter folder (or its adapter_model.safetensors).

    Returns:
        (the parsed adapter_config.json, the opened weights, the config's path).
    """
    folder = path if path.is_dir() else path.parent
    config_path = folder / ADAPTER_CONFIG
    if not path.exists():
        raise AdapterToolError(f"{path} does not exist; check the adapter path")
    if not config_path.is_file():
        raise AdapterToolError(f"{folder} has no {ADAPTER_CONFIG}; is it a PEFT adapter folder?")
    weights = folder / ADAPTER_WEIGHTS
    return read_json(config_path), open_checkpoint(weights if weights.is_file() else folder), config_path

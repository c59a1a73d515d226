"""Opened PEFT adapters: the one place that opens an adapter folder, groups its keys into modules
and reads its tensors checked, for every pipeline that takes adapters as input (merge, combine, convert).

An adapter's keys are of two kinds: adapter-owned parts of a module (``lora_A``, ``hada_w1_a``...),
grouped per module and planned into one :class:`~adaptertool.adapters.modules.ModuleUpdate` each
from headers alone, and whole tensors (modules_to_save copies, saved embedding layers), which stand
for a model tensor as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adaptertool.adapters.modules import ModuleUpdate, plan_module
from adaptertool.adapters.peft_config import AdapterSettings
from adaptertool.adapters.peft_keys import split_adapter_key
from adaptertool.errors import AdapterToolError
from adaptertool.io import FLOAT_CODES, Checkpoint, open_adapter


__all__ = ["AdapterModule", "LoadedAdapter", "check_finite", "load_adapter", "plan_adapter", "read_checked"]

# Elements per isfinite() call: bounds the temporary bool mask on a large whole-tensor copy.
_NAN_CHUNK = 1 << 24


@dataclass
class LoadedAdapter:
    """An opened adapter and the weight it is applied with; :meth:`close` releases its file."""

    path: Path
    weight: float
    settings: AdapterSettings
    weights: Checkpoint
    config: dict[str, Any] = field(default_factory=dict)  # adapter_config.json as read

    def close(self) -> None:
        self.weights.close()


@dataclass(frozen=True)
class AdapterModule:
    """One adapted module: its planned update and the stored shapes of its parts."""

    name: str
    update: ModuleUpdate
    shape: tuple[int, ...] | None  # the base weight shape the update implies; None for IA3 (a vector)
    shapes: dict[str, tuple[int, ...]]  # part (lora_A, lora_B.bias...) -> stored shape


def load_adapter(path: Path, weight: float) -> LoadedAdapter:
    """Open a PEFT adapter folder and read its config.

    Raises:
        AdapterToolError: no adapter there, or a config this tool cannot read.
    """
    config, weights, config_path = open_adapter(path)
    try:
        settings = AdapterSettings.from_config(config, source=str(config_path))
    except AdapterToolError:
        weights.close()
        raise
    return LoadedAdapter(path, weight, settings, weights, config)


def plan_adapter(adapter: LoadedAdapter) -> tuple[list[str], dict[str, AdapterModule]]:
    """The adapter's whole-tensor keys in key order, and its modules in first-seen order, from headers.

    Raises:
        AdapterToolError: a module whose parts or shapes do not make an update, naming the adapter.
    """
    whole: list[str] = []
    groups: dict[str, dict[str, str]] = {}
    for key in adapter.weights:
        split = split_adapter_key(key)
        if split is None:
            whole.append(key)
        else:
            groups.setdefault(split[0], {})[split[1]] = key
    modules: dict[str, AdapterModule] = {}
    for name, keys in groups.items():
        shapes = {part: adapter.weights[key].shape for part, key in keys.items()}
        try:
            update, shape = plan_module(name, keys, shapes, adapter.settings)
        except AdapterToolError as err:
            raise AdapterToolError(f"{adapter.path}: {err}") from None
        modules[name] = AdapterModule(name, update, shape, shapes)
    return whole, modules


def read_checked(adapter: LoadedAdapter, key: str) -> torch.Tensor:
    """Read one adapter tensor, refusing NaN/Inf (a diverged training run), which would spread to every output.

    Raises:
        AdapterToolError: the tensor holds NaN or Inf.
    """
    tensor = adapter.weights.read(key)
    if tensor.is_floating_point():
        flat = tensor.reshape(-1)
        for start in range(0, flat.numel(), _NAN_CHUNK):
            if not torch.isfinite(flat[start : start + _NAN_CHUNK]).all():
                raise AdapterToolError(f"{adapter.path}: tensor {key} holds NaN or Inf values; the adapter is broken")
    return tensor


def check_finite(adapter: LoadedAdapter) -> None:
    """Scan every float tensor of ``adapter`` for NaN/Inf before anything is written.

    Raises:
        AdapterToolError: the first tensor, in key order, that holds NaN or Inf.
    """
    for key in adapter.weights:
        if adapter.weights[key].dtype in FLOAT_CODES:
            read_checked(adapter, key)

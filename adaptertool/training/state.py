"""Training checkpoints: everything a run needs to continue bit for bit, written atomically.

A checkpoint is a folder ``step-NNNNNN`` (staged, then renamed into place) holding:

- ``adapter_config.json`` + ``adapter_model.safetensors``: the adapter so far (a usable PEFT adapter);
- ``trainer_state.safetensors``: the optimizer's tensors and the RNG states (``rng/cpu``, ``rng/cuda.N``);
- ``trainer_state.json``: step, data position, token count, the run's fingerprint, the optimizer's
  non-tensor leaves (tensors appear as ``{"tensor": name}``), and the JSONL log up to this step.

No pickle anywhere: nothing is executed when a checkpoint is loaded. The learning-rate schedule is a
pure function of the step, so it needs no state; the optimizer's param_groups (hyperparameters) are
rebuilt from the run's options, and the fingerprint check refuses a resume whose options differ.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptertool.errors import InputError
from adaptertool.io import (
    CheckpointWriter,
    TensorSpec,
    dtype_code,
    open_adapter,
    open_checkpoint,
    read_json,
    staged_output,
    write_adapter,
)

if TYPE_CHECKING:
    import torch

__all__ = ["TrainState", "latest_checkpoint", "load_state", "save_state"]

_STATE_JSON = "trainer_state.json"
_STATE_TENSORS = "trainer_state.safetensors"


@dataclass(kw_only=True)
class TrainState:
    step: int  # optimizer steps done
    micro: int  # micro-batches consumed since the start (the data position: epoch = micro // batches)
    tokens: int  # real tokens trained on
    fingerprint: dict[str, Any]  # the options that shape the trajectory; must match on resume
    adapter: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)  # the optimizer state_dict()["state"]
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)  # JSONL log lines up to this step


def save_state(folder: Path, state: TrainState, adapter_config: dict[str, Any], *, keep: int = 2) -> Path:
    """Write ``state`` as ``folder/step-NNNNNN`` atomically and delete all but the newest ``keep``.

    Returns:
        The checkpoint's folder.
    """
    out = folder / f"step-{state.step:06d}"
    tensors: dict[str, torch.Tensor] = {f"rng/{k}": v for k, v in state.rng.items()}
    skeleton = _flatten(state.optimizer, "optimizer", tensors)
    meta = {"step": state.step, "micro": state.micro, "tokens": state.tokens, "fingerprint": state.fingerprint,
            "optimizer": skeleton, "log": state.log}
    with staged_output(out, force=True) as tmp:
        adapter = {k: v.detach() for k, v in state.adapter.items()}
        write_adapter(tmp, adapter_config, [_spec(k, v) for k, v in adapter.items()], adapter.__getitem__)
        with CheckpointWriter(tmp, [_spec(k, v) for k, v in tensors.items()], max_shard_bytes=None,
                              stem=_STATE_TENSORS.removesuffix(".safetensors")) as writer:
            for spec in writer.order:
                writer.write(spec.name, tensors[spec.name])
        (tmp / _STATE_JSON).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    for old in sorted(folder.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return out


def latest_checkpoint(path: Path) -> Path | None:
    """``path`` itself when it is a checkpoint, else its newest ``step-*`` checkpoint, else None."""
    if (path / _STATE_JSON).is_file():
        return path
    found = sorted(p for p in path.glob("step-*") if (p / _STATE_JSON).is_file()) if path.is_dir() else []
    return found[-1] if found else None


def load_state(path: Path) -> TrainState:
    """Read a checkpoint written by :func:`save_state` (``path`` or its newest ``step-*``).

    Raises:
        AdapterToolError: no checkpoint there, or a damaged one.
    """
    folder = latest_checkpoint(path)
    if folder is None:
        raise InputError(f"{path} holds no training checkpoint (step-*/{_STATE_JSON}); check --resume")
    meta = read_json(folder / _STATE_JSON)
    _, adapter_ckpt, _ = open_adapter(folder)
    with adapter_ckpt, open_checkpoint(folder / _STATE_TENSORS) as ckpt:
        adapter = {name: adapter_ckpt.read(name) for name in adapter_ckpt}
        tensors = {name: ckpt.read(name) for name in ckpt}
    try:
        return TrainState(step=int(meta["step"]), micro=int(meta["micro"]), tokens=int(meta["tokens"]),
                          fingerprint=meta["fingerprint"], adapter=adapter,
                          optimizer=_unflatten(meta["optimizer"], tensors),
                          rng={k.removeprefix("rng/"): v for k, v in tensors.items() if k.startswith("rng/")},
                          log=list(meta.get("log", [])))
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"{folder / _STATE_JSON}: damaged training state ({err!r}); resume from another checkpoint") from err


def _spec(name: str, tensor: torch.Tensor) -> TensorSpec:
    return TensorSpec(name, dtype_code(tensor.dtype), tuple(tensor.shape))


def _flatten(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able skeleton of ``value``; tensors move to ``tensors`` under slash-joined key paths."""
    import torch

    if isinstance(value, torch.Tensor):
        tensors[name] = value.detach()
        return {"tensor": name}
    if isinstance(value, dict):
        # Keys are strs or, for the optimizer's per-parameter state, ints: record which.
        return {"dict": [[k, isinstance(k, int), _flatten(v, f"{name}/{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"list": [_flatten(v, f"{name}/{i}", tensors) for i, v in enumerate(value)], "tuple": isinstance(value, tuple)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"optimizer state holds a {type(value).__name__} at {name}, which a checkpoint cannot store")


def _unflatten(node: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "dict" in node:
        return {int(k) if is_int else k: _unflatten(v, tensors) for k, is_int, v in node["dict"]}
    if "list" in node:
        items = [_unflatten(v, tensors) for v in node["list"]]
        return tuple(items) if node["tuple"] else items
    return node["value"]

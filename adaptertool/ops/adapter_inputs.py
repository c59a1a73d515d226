"""Opened PEFT adapters: the one place that opens an adapter folder, groups its keys into modules
and reads its tensors checked, for every pipeline that takes adapters as input (merge, combine, convert).

An adapter's keys are of two kinds: adapter-owned parts of a module (``lora_A``, ``hada_w1_a``...),
grouped per module and planned into one :class:`~adaptertool.adapters.modules.ModuleUpdate` each
from headers alone, and whole tensors (modules_to_save copies, saved embedding layers), which stand
for a model tensor as they are.

A PEFT ``target_parameters`` adapter (LoRA on the fused 3-D expert parameters of a mixture-of-experts
model) adds a third kind: LoRAs whose keys name the experts module (``mlp.experts[.base_layer]``)
but not the parameter. Only the base's expert layout tells which parameter each adapts for sure, so
:func:`plan_merge_adapter` plans them against it, for merge and subtract; combine, which has no base,
plans them on the layout their own shapes imply (:func:`plan_adapter_alone`); :func:`plan_adapter`,
which convert uses, refuses such adapters.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adaptertool.adapters.expert_lora import ParamLora, implied_layer, plan_param_loras
from adaptertool.adapters.experts import ExpertLayout, MoeLayer
from adaptertool.adapters.modules import ModuleUpdate, plan_module
from adaptertool.adapters.peft_config import AdapterSettings
from adaptertool.adapters.peft_keys import split_adapter_key
from adaptertool.errors import AdapterToolError, InputError
from adaptertool.io import FLOAT_CODES, Checkpoint, open_adapter


__all__ = ["AdapterModule", "LoadedAdapter", "ParamModule", "PlannedAdapter", "check_finite", "load_adapter",
           "plan_adapter", "plan_adapter_alone", "plan_merge_adapter", "read_checked"]

# Elements per isfinite() call: bounds the temporary bool mask on a large whole-tensor copy.
_NAN_CHUNK = 1 << 24
# Tensors LoadedAdapter.read_recent keeps: a layer's target_parameters factors (A and B of gate_up_proj
# and down_proj) with room to spare, whichever order the writer streams the layer's experts in.
_RECENT = 8


@dataclass
class LoadedAdapter:
    """An opened adapter and the weight it is applied with; :meth:`close` releases its file."""

    path: Path
    weight: float
    settings: AdapterSettings
    weights: Checkpoint
    config: dict[str, Any] = field(default_factory=dict)  # adapter_config.json as read
    _recent: OrderedDict[tuple[str, str], torch.Tensor] = field(default_factory=OrderedDict, repr=False, compare=False)

    @property
    def target_parameters(self) -> tuple[str, ...]:
        """adapter_config.json's target_parameters (PEFT >= 0.17), empty for most adapters."""
        targets = self.config.get("target_parameters") or ()
        return (targets,) if isinstance(targets, str) else tuple(str(t) for t in targets)

    def read_recent(self, key: str, *, device: torch.device | None = None) -> torch.Tensor:
        """Tensor ``key`` (on ``device``), kept among the last few read this way.

        A target_parameters LoRA's stacked factors serve every expert of its layer: on a per-expert
        base that is one output tensor per expert and projection, and reading the factors again
        for each would cost more than the merge.
        """
        slot = (key, str(device))
        tensor = self._recent.get(slot)
        if tensor is None:
            tensor = self.weights.read(key)
            tensor = tensor if device is None else tensor.to(device)
            self._recent[slot] = tensor
            if len(self._recent) > _RECENT:
                self._recent.popitem(last=False)
        else:
            self._recent.move_to_end(slot)
        return tensor

    def close(self) -> None:
        self._recent.clear()
        self.weights.close()


@dataclass(frozen=True)
class AdapterModule:
    """One adapted module: its planned update and the stored shapes of its parts."""

    name: str
    update: ModuleUpdate
    shape: tuple[int, ...] | None  # the base weight shape the update implies; None for IA3 (a vector)
    shapes: dict[str, tuple[int, ...]]  # part (lora_A, lora_B.bias...) -> stored shape


@dataclass(frozen=True)
class ParamModule:
    """The target_parameters LoRAs on one experts module, planned against the base's layer."""

    name: str  # the experts module as the adapter names it, without .base_layer: model.layers.0.mlp.experts
    layer: MoeLayer  # the base's layer those experts are in
    loras: tuple[ParamLora, ...]  # one per adapted parameter, gate_up_proj before down_proj


@dataclass(frozen=True)
class PlannedAdapter:
    """:func:`plan_merge_adapter`'s answer: the adapter's whole tensors, modules and expert parameters."""

    whole: list[str]  # whole-tensor keys, in key order
    modules: dict[str, AdapterModule]  # module path -> its update, in first-seen order
    params: dict[str, ParamModule]  # experts module -> its target_parameters LoRAs, in first-seen order


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
        AdapterToolError: a module whose parts or shapes do not make an update, naming the adapter;
            or a target_parameters adapter, which needs the base's expert layout
            (:func:`plan_merge_adapter`).
    """
    if adapter.target_parameters:
        raise InputError(
            f"{adapter.path}: adapter_config.json has target_parameters {list(adapter.target_parameters)}, LoRAs on "
            "fused mixture-of-experts parameters; only merge, subtract and combine (linear, cat) support such adapters yet"
        )
    whole, groups = _group_keys(adapter)
    return whole, {name: _plan_module(adapter, name, keys) for name, keys in groups.items()}


def plan_merge_adapter(adapter: LoadedAdapter, experts: Callable[[], ExpertLayout | None]) -> PlannedAdapter:
    """:func:`plan_adapter` for a pipeline with a base: also target_parameters LoRAs on its experts.

    A module is planned as target_parameters LoRAs when its keys nest in ``.base_layer``, when it is
    one of the base's experts modules, or when it is the module part of a target_parameters entry.
    ``experts`` describes the base's layout (None: no experts); it is called only for an adapter
    that may hold such LoRAs, so an ordinary adapter merges into any base.

    Raises:
        AdapterToolError: naming the adapter: a module whose parts or shapes do not make an update,
            target_parameters LoRAs on a module the base has no experts for, or ones that
            :func:`~adaptertool.adapters.expert_lora.plan_param_loras` refuses (no or unmatched
            target_parameters, another expert count, A/B roles transposed by PEFT 0.17-0.19.0).
    """
    whole, groups = _group_keys(adapter)
    targets = adapter.target_parameters
    maybe = targets or any(_stripped(name) != name or _stripped(name).endswith(".experts") for name in groups)
    layout = experts() if maybe else None
    modules: dict[str, AdapterModule] = {}
    param_keys: dict[str, dict[str, tuple[int, ...]]] = {}  # experts module -> {key: shape} at every nesting depth
    for name, keys in groups.items():
        module = _stripped(name)
        if module != name or _experts_layer(layout, module) is not None or _names_parameter_of(module, targets):
            param_keys.setdefault(module, {}).update({key: tuple(adapter.weights[key].shape) for key in keys.values()})
        else:
            modules[name] = _plan_module(adapter, name, keys)
    params: dict[str, ParamModule] = {}
    for module, shapes in param_keys.items():
        layer = _experts_layer(layout, module)
        if layer is None:
            where = (f"the base's experts are {', '.join(_example_modules(layout))}" if layout is not None
                     else "the base has no mixture-of-experts layers (by its config.json and tensor names)")
            raise InputError(
                f"{adapter.path}: {next(iter(shapes))} is a LoRA on the parameters of {module}, but {where}; "
                "adaptertool applies target_parameters LoRAs to fused expert parameters (mlp.experts.gate_up_proj, "
                "down_proj) of the base; is it the right base?"
            )
        try:
            loras = plan_param_loras(module, shapes, layer=layer, settings=adapter.settings, target_parameters=targets,
                                     peft_version=adapter.config.get("peft_version"))
        except AdapterToolError as err:
            raise type(err)(f"{adapter.path}: {err}") from None
        params[module] = ParamModule(module, layer, loras)
    return PlannedAdapter(whole, modules, params)


def plan_adapter_alone(adapter: LoadedAdapter) -> PlannedAdapter:
    """:func:`plan_merge_adapter` without a base: target_parameters LoRAs planned on the experts layers
    that their own shapes imply (:func:`~adaptertool.adapters.expert_lora.implied_layer`).

    Raises:
        AdapterToolError: as plan_merge_adapter, naming the adapter.
    """
    return plan_merge_adapter(adapter, lambda: _implied_layout(adapter))


def _implied_layout(adapter: LoadedAdapter) -> ExpertLayout:
    targets = adapter.target_parameters
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, keys in _group_keys(adapter)[1].items():
        module = _stripped(name)
        if module != name or module.endswith(".experts") or _names_parameter_of(module, targets):
            shapes.setdefault(module, {}).update({key: tuple(adapter.weights[key].shape) for key in keys.values()})
    try:
        layers = tuple(implied_layer(module, found, settings=adapter.settings, target_parameters=targets)
                       for module, found in shapes.items())
    except AdapterToolError as err:
        raise type(err)(f"{adapter.path}: {err}") from None
    return ExpertLayout("", "", layers, ())


def _group_keys(adapter: LoadedAdapter) -> tuple[list[str], dict[str, dict[str, str]]]:
    """Whole-tensor keys, and module path -> {part: key} for the rest, both in key order."""
    whole: list[str] = []
    groups: dict[str, dict[str, str]] = {}
    for key in adapter.weights:
        split = split_adapter_key(key)
        if split is None:
            whole.append(key)
        else:
            groups.setdefault(split[0], {})[split[1]] = key
    return whole, groups


def _plan_module(adapter: LoadedAdapter, name: str, keys: dict[str, str]) -> AdapterModule:
    shapes = {part: adapter.weights[key].shape for part, key in keys.items()}
    try:
        update, shape = plan_module(name, keys, shapes, adapter.settings)
    except AdapterToolError as err:
        raise type(err)(f"{adapter.path}: {err}") from None
    return AdapterModule(name, update, shape, shapes)


def _stripped(module: str) -> str:
    """The module a ParamWrapper's keys belong to: PEFT nests a second targeted parameter's wrapper
    around the first, whose keys gain ``.base_layer``."""
    return ".".join(token for token in module.split(".") if token != "base_layer")


def _experts_layer(layout: ExpertLayout | None, module: str) -> MoeLayer | None:
    """The base's layer whose experts module is ``module``, allowing for a base saved without the
    leading ``model.`` of the adapter's names, or the reverse (as merge's tensor lookup does)."""
    if layout is None:
        return None
    for candidate in (module, module.partition(".")[2], f"model.{module}"):
        layer = layout.layer_of(candidate)
        if layer is not None:
            return layer
    return None


def _names_parameter_of(module: str, targets: tuple[str, ...]) -> bool:
    """Whether a target_parameters entry (``mlp.experts.down_proj``) names a parameter of ``module``."""
    owners = [target.rpartition(".")[0] for target in targets]
    return any(owner and (module == owner or module.endswith(f".{owner}")) for owner in owners)


def _example_modules(layout: ExpertLayout) -> list[str]:
    modules = [layer.module for layer in layout.layers]
    return modules if len(modules) <= 2 else [modules[0], "...", modules[-1]]


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
                raise InputError(f"{adapter.path}: tensor {key} holds NaN or Inf values; the adapter is broken")
    return tensor


def check_finite(adapter: LoadedAdapter) -> None:
    """Scan every float tensor of ``adapter`` for NaN/Inf before anything is written.

    Raises:
        AdapterToolError: the first tensor, in key order, that holds NaN or Inf.
    """
    for key in adapter.weights:
        if adapter.weights[key].dtype in FLOAT_CODES:
            read_checked(adapter, key)

"""The combine plan: every adapter's modules grouped by module, checked from headers alone.

Each adapter's keys give one :class:`~adaptertool.adapters.modules.ModuleUpdate` per module; the
output targets the union of the modules. Updates must be additive, and adapters adapting the same
module must agree on its shape and layout. PEFT target_parameters LoRAs on fused experts are
planned per parameter (:func:`~adaptertool.ops.adapter_inputs.plan_adapter_alone`); they combine only
by stacking their factors expert by expert (linear, cat), only with LoRAs on the same experts in the
same form, and only from PEFT >= 0.19.1, whose A/B roles do not depend on the base's layout. Whole tensors (modules_to_save copies, saved embedding
layers) are kept once; two adapters saving different values for one are refused, because a
replacement cannot be weighted without the base it replaces.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adaptertool.adapters.expert_lora import ParamLora, roles_depend_on_layout
from adaptertool.adapters.modules import ModuleUpdate
from adaptertool.adapters.peft_config import AdapterSettings
from adaptertool.adapters.peft_keys import full_tensor_name
from adaptertool.errors import InputError
from adaptertool.ops.adapter_inputs import AdapterModule, LoadedAdapter, ParamModule, plan_adapter_alone

__all__ = ["CombinePlan", "ModulePlan", "ParamPlan", "Part", "plan_combine"]


@dataclass
class Part:
    """One adapter's update of one module."""

    adapter: int
    update: ModuleUpdate
    rank: int


@dataclass
class ModulePlan:
    """One output module and the updates combined into it."""

    name: str
    shape: tuple[int, ...]  # the base weight's shape
    embedding: bool
    first: int  # the first adapter adapting it, for messages
    parts: list[Part] = field(default_factory=list)  # the adapters with a non-zero weight


@dataclass
class ParamPlan:
    """One fused expert parameter and the target_parameters LoRAs combined into it."""

    module: str  # the experts module: model.layers.0.mlp.experts
    param: str  # gate_up_proj or down_proj
    experts: int
    shape: tuple[int, int]  # one expert's (out, in)
    first: int  # the first adapter adapting it, for messages
    parts: list[tuple[int, ParamLora]] = field(default_factory=list)  # (adapter, its LoRA), non-zero weights only

    @property
    def path(self) -> str:
        return f"{self.module}.{self.param}"


@dataclass
class CombinePlan:
    modules: dict[str, ModulePlan] = field(default_factory=dict)
    params: dict[str, ParamPlan] = field(default_factory=dict)  # <experts module>.<param> -> its plan
    whole: dict[str, tuple[int, str]] = field(default_factory=dict)  # model tensor -> (adapter, key)
    fan_in_fan_out: bool | None = None  # the Linear modules' layout, once one is seen
    notes: list[str] = field(default_factory=list)


def plan_combine(inputs: list[LoadedAdapter], *, exact_method: str | None = None) -> CombinePlan:
    """Every module's contributing updates, checked from headers; whole tensors checked by value.

    Args:
        inputs: the opened adapters, in order; those with weight 0 are checked but contribute nothing.
        exact_method: "linear" or "cat" when the factors will be stacked (LoHa/LoKr have none).

    Raises:
        AdapterToolError: non-additive updates (DoRA, IA3), shapes that disagree between adapters,
            different whole-tensor copies of one tensor, or a tensor both replaced and adapted.
    """
    plan = CombinePlan()
    for index, item in enumerate(inputs):
        planned_adapter = plan_adapter_alone(item)
        for key in planned_adapter.whole:
            _add_whole(plan, inputs, index, key)
        for planned in planned_adapter.modules.values():
            _add_part(plan, inputs, index, planned, exact_method)
        for params in planned_adapter.params.values():
            _add_params(plan, inputs, index, params, exact_method)
    _refuse_both_forms(plan, inputs)
    for name, (index, key) in plan.whole.items():
        module = name.rpartition(".")[0]
        # PEFT saves an adapted embedding's own base weight (".base_layer.") beside its LoRA: that is
        # the base, not a replacement, and goes along unchanged.
        if module in plan.modules and plan.modules[module].parts and ".base_layer." not in key:
            raise InputError(f"{inputs[index].path}: saves {name} whole while another adapter adapts {module}; "
                             "the two cannot be combined into one adapter")
    bases = sorted({str(i.settings.base_model) for i in inputs if i.settings.base_model})  # naming none is no conflict
    if len(bases) > 1:
        plan.notes.append(f"the adapters name different base models ({', '.join(bases)}); their shapes agree, so they are "
                          "combined; check that they were trained on the same weights")
    idle = [str(i.path) for i in inputs if i.weight == 0.0]
    if idle:
        plan.notes.append(f"weight 0: {', '.join(idle)} contribute nothing")
    return plan


def _add_part(plan: CombinePlan, inputs: list[LoadedAdapter], index: int, planned: AdapterModule,
              exact_method: str | None) -> None:
    item = inputs[index]
    module, update, shape, shapes = planned.name, planned.update, planned.shape, planned.shapes
    if not update.additive:
        what = "DoRA" if update.dora else update.kind.upper()
        raise InputError(f"{item.path}: module {module} is a {what} update, which rescales weights instead of "
                         "adding a delta; combine needs additive adapters (LoRA, AdaLoRA, LoHa, LoKr)")
    if exact_method and update.kind in ("loha", "lokr"):
        raise InputError(f"{item.path}: module {module} is {update.kind.upper()}, which has no LoRA factors to "
                         f"stack for --method {exact_method}; use --method svd")
    assert shape is not None  # additive kinds always imply a shape
    embedding = update.kind == "lora_embedding"
    entry = plan.modules.setdefault(module, ModulePlan(module, shape, embedding, index))
    if entry.shape != shape:
        raise InputError(f"{item.path}: module {module} implies weight shape {list(shape)} but {inputs[entry.first].path} "
                         f"implies {list(entry.shape)}; the adapters were made for different base models")
    if entry.embedding != embedding:
        raise InputError(f"{item.path}: module {module} is an embedding LoRA here but not in {inputs[entry.first].path}")
    if not embedding:
        if plan.fan_in_fan_out is not None and plan.fan_in_fan_out != update.fan_in_fan_out:
            raise InputError(f"{item.path}: fan_in_fan_out is {update.fan_in_fan_out} here but not in the other "
                             "adapters; they were made for different model classes")
        plan.fan_in_fan_out = update.fan_in_fan_out
    if item.weight != 0.0:
        entry.parts.append(Part(index, update, _part_rank(update, shapes, item.settings)))


def _add_params(plan: CombinePlan, inputs: list[LoadedAdapter], index: int, params: ParamModule,
                exact_method: str | None) -> None:
    item = inputs[index]
    example = params.loras[0].a_key
    if exact_method is None:
        raise InputError(f"{item.path}: {example} is a target_parameters LoRA on fused experts, which combines "
                         "only by stacking its factors expert by expert: use --method linear or cat")
    version = item.config.get("peft_version")
    if roles_depend_on_layout(version):
        raise InputError(f"{item.path}: made by PEFT {version}, whose target_parameters LoRAs have A/B roles that "
                         "only the base's layout tells (PEFT < 0.19.1); merge it into its base instead of combining it")
    for lora in params.loras:
        shape = (lora.out_features, lora.in_features)
        entry = plan.params.setdefault(f"{params.name}.{lora.param}",
                                       ParamPlan(params.name, lora.param, lora.experts, shape, index))
        if (entry.experts, entry.shape) != (lora.experts, shape):
            raise InputError(f"{item.path}: {lora.a_key} is a LoRA on {lora.experts} experts of {list(shape)} "
                             f"(out, in) for {entry.path}, but {inputs[entry.first].path} has {entry.experts} experts "
                             f"of {list(entry.shape)}; the adapters were made for different base models")
        if item.weight != 0.0:
            entry.parts.append((index, lora))


def _refuse_both_forms(plan: CombinePlan, inputs: list[LoadedAdapter]) -> None:
    """A per-expert module and a target_parameters LoRA on the same experts: one output cannot hold both forms."""
    experts = {entry.module.replace(".block_sparse_moe.", ".mlp."): entry for entry in plan.params.values()}
    for name, module in plan.modules.items():
        owner = experts.get(name.replace(".block_sparse_moe.", ".mlp.").rpartition(".experts.")[0] + ".experts")
        if owner is not None and ".experts." in name:
            raise InputError(f"{inputs[module.first].path}: {name} is a per-expert LoRA on the experts that "
                             f"{inputs[owner.first].path} adapts as fused parameters (target_parameters); combine "
                             "cannot hold both forms in one adapter: merge them one after the other")


def _part_rank(update: ModuleUpdate, shapes: dict[str, tuple[int, ...]], settings: AdapterSettings) -> int:
    if update.kind in ("lora", "adalora"):
        return shapes["lora_A"][0]
    if update.kind == "lora_embedding":
        return shapes["lora_embedding_A"][0]
    return settings.module_rank(update.module)  # LoHa/LoKr: the configured r


def _add_whole(plan: CombinePlan, inputs: list[LoadedAdapter], index: int, key: str) -> None:
    item = inputs[index]
    name = full_tensor_name(key)
    if item.weight == 0.0:
        return
    if name not in plan.whole:
        plan.whole[name] = (index, key)
        return
    first, first_key = plan.whole[name]
    a, b = inputs[first].weights, item.weights
    if a[first_key].shape != b[key].shape:
        raise InputError(f"{item.path}: saved tensor {key} has shape {list(b[key].shape)} but "
                         f"{list(a[first_key].shape)} in {inputs[first].path}; the adapters were made for different base models")
    if a[first_key].dtype != b[key].dtype or not torch.equal(a.read(first_key), b.read(key)):
        raise InputError(f"{item.path}: saved tensor {key} differs from the one in {inputs[first].path}; a whole-tensor "
                         "copy (modules_to_save) cannot be weighted without its base: give one adapter weight 0, "
                         "or merge them into the base one after the other")



"""The merge plan: which base tensor each adapter tensor changes, checked from headers alone.

Mixture-of-experts bases add :class:`ExpertStep`: an update of one expert's weight, which an
:class:`~adaptertool.adapters.experts.ExpertWeight` places inside the target tensor. A per-expert
module (``mlp.experts.3.gate_proj``, Mixtral's ``experts.3.w1``) becomes an ordinary
:class:`UpdateStep` where the base stores that expert's Linear, and an ExpertStep on the expert's
rows where the base fuses its experts. A target_parameters LoRA becomes one ExpertStep per expert:
on the fused parameter's expert ``e``, or on the per-expert tensors its rows split into.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from adaptertool.adapters.expert_lora import PEFT_MOVED, PEFT_UNCONVERTED, ParamLora
from adaptertool.adapters.experts import FAMILIES, ExpertLayout, ExpertWeight, MoeLayer, describe_experts
from adaptertool.adapters.modules import ModuleUpdate, ia3_fits
from adaptertool.adapters.peft_keys import full_tensor_name
from adaptertool.errors import InputError
from adaptertool.io import FLOAT_CODES, TensorSource, read_json
from adaptertool.ops.adapter_inputs import AdapterModule, LoadedAdapter, ParamModule, check_finite, plan_merge_adapter

__all__ = ["ExpertStep", "MergePlan", "ReplaceStep", "Step", "Target", "UpdateStep", "fused_target", "plan_targets"]


@dataclass(frozen=True)
class UpdateStep:
    """An adapter's update of one module, applied to its weight or (``bias``) to its bias."""

    adapter: int  # index into the adapter list
    update: ModuleUpdate
    scale: float  # the adapter's weight; negated to subtract
    bias: bool = False


@dataclass(frozen=True)
class ReplaceStep:
    """A whole tensor saved in an adapter (modules_to_save) that replaces the base's."""

    adapter: int
    key: str  # the adapter tensor


@dataclass(frozen=True)
class ExpertStep:
    """An adapter's update of one expert's weight, which ``where`` places in the target tensor: the
    whole tensor (a per-expert base), or expert ``where.expert`` of a fused one.

    ``update`` is a per-expert module's (target_modules), or a target_parameters LoRA whose expert
    ``expert`` applies: all outputs of its parameter, or (``projection``) the gate, up or down rows
    that a per-expert base stores as their own tensor.
    """

    adapter: int
    where: ExpertWeight
    scale: float  # the adapter's weight; negated to subtract
    update: ModuleUpdate | ParamLora
    expert: int = 0  # ParamLora: whose factors
    projection: str | None = None  # ParamLora: "gate", "up" or "down" rows of its delta; None for all


Step = UpdateStep | ReplaceStep | ExpertStep


def fused_target(steps: list[Step]) -> bool:
    """Whether ``steps`` change experts inside a fused tensor (then all but a leading replacement do)."""
    return any(isinstance(step, ExpertStep) and step.where.expert is not None for step in steps)


@dataclass
class Target:
    """One output tensor the adapters change: the base tensor it starts from, and the changes in order."""

    source: str
    steps: list[Step] = field(default_factory=list)


@dataclass
class MergePlan:
    targets: dict[str, Target] = field(default_factory=dict)  # output name -> its changes
    extra: dict[str, str] = field(default_factory=dict)  # tensors the output gains -> base source
    notes: list[str] = field(default_factory=list)

    @property
    def replaced(self) -> int:
        """Targets replaced outright in the end (modules_to_save)."""
        return sum(isinstance(target.steps[-1], ReplaceStep) for target in self.targets.values())


def plan_targets(base: TensorSource, adapters: list[LoadedAdapter], *, subtract: bool) -> MergePlan:
    """Map every adapter tensor onto the output tensor it changes, in adapter order.

    Raises:
        AdapterToolError: an adapter without tensors, a module the base lacks, shapes that do not fit, NaN/Inf in an adapter,
            a weight on an update that is not additive, or (with ``subtract``) one that cannot be undone.
    """
    plan = MergePlan()
    tied = _tied_embedding(base)
    experts = _BaseExperts(base)
    for index, adapter in enumerate(adapters):
        check_finite(adapter)
        planned = plan_merge_adapter(adapter, experts)
        if not (planned.whole or planned.modules or planned.params):
            raise InputError(_empty(adapter))
        for key in planned.whole:
            _add_replacement(plan, base, tied, index, adapter, key, subtract)
        for module in planned.modules.values():
            _add_module(plan, base, tied, index, adapter, module, subtract, experts)
        for params in planned.params.values():
            _add_param_loras(plan, base, index, adapter, params, subtract)
        note = _peft_drops(adapter, list(planned.modules), experts)
        if note is not None:
            plan.notes.append(note)
    return plan


def _empty(adapter: LoadedAdapter) -> str:
    """Why an adapter without tensors is refused: merging it would write a copy of the base and say it merged."""
    targets = adapter.config.get("target_modules")
    matched = f"its target_modules {json.dumps(targets)[:80]} matched no module" if targets else "it targets no module"
    return (f"{adapter.path}: the adapter holds no tensors ({matched} when it was saved); there is nothing to merge: "
            "check that it is the trained adapter")


class _BaseExperts:
    """The base's expert layout, described from config.json and the headers when first asked for:
    most merges never need it, and a base whose experts adaptertool does not know still takes
    ordinary adapters."""

    def __init__(self, base: TensorSource) -> None:
        self.base = base
        self._layout: ExpertLayout | None = None
        self._described = False

    @property
    def config_path(self) -> Path | None:
        root = self.base.root
        return root / "config.json" if root is not None and (root / "config.json").is_file() else None

    @property
    def model_type(self) -> str:
        path = self.config_path
        return str(read_json(path).get("model_type", "")) if path is not None else ""

    def __call__(self) -> ExpertLayout | None:
        if not self._described:
            path = self.config_path
            if path is not None:
                shapes = {name: self.base[name].shape for name in self.base}
                self._layout = describe_experts(read_json(path), shapes, source=str(path))
            self._described = True
        return self._layout

    def locate(self, module: str) -> ExpertWeight | None:
        """Where the per-expert Linear ``module`` is stored, if the base has experts and it is one."""
        if self.model_type not in FAMILIES or ".experts." not in module:
            return None
        layout = self()
        if layout is None:
            return None
        for candidate in (module, module.partition(".")[2], f"model.{module}"):
            found = layout.locate(candidate)
            if found is not None:
                return found
        return None

    def beyond(self, module: str) -> str | None:
        """Why the per-expert Linear ``module`` is not in the base, if it names an expert past the
        base's count (an adapter made for a model with more experts)."""
        found = _EXPERT_MODULE.match(module)
        if found is None or self.model_type not in FAMILIES:
            return None
        layout = self()
        experts = found["experts"]
        for candidate in (experts, experts.partition(".")[2], f"model.{experts}") if layout is not None else ():
            layer = layout.layer_of(candidate)
            if layer is not None and int(found["expert"]) >= layer.experts:
                return f"{module} is expert {found['expert']}, but {layer.block} has {layer.experts} experts"
        return None


def _add_module(plan: MergePlan, base: TensorSource, tied: str | None, index: int, adapter: LoadedAdapter,
                planned: AdapterModule, subtract: bool, experts: _BaseExperts) -> None:
    module, update, shape, shapes = planned.name, planned.update, planned.shape, planned.shapes
    where = experts.locate(module) if _base_name(f"{module}.weight", base) is None else None
    if where is not None and where.expert is not None:
        _add_expert_module(plan, base, index, adapter, planned, where, subtract)
        return
    if where is None and _base_name(f"{module}.weight", base) is None and (beyond := experts.beyond(module)):
        raise InputError(f"{adapter.path}: {beyond}; the adapter is for another model")
    # A per-expert base stores the expert as its own Linear, perhaps under the other naming (Mixtral:
    # block_sparse_moe.experts.N.w1 on disk, mlp.experts.N.w1 in transformers 5).
    target = where.tensor if where is not None else _target(plan, base, tied, f"{module}.weight", adapter)
    base_shape = base[_source(plan, target)].shape
    fits = ia3_fits(shapes["ia3_l"], base_shape, fan_in_fan_out=update.fan_in_fan_out) if shape is None else shape == base_shape
    if not fits:
        implied = list(shape) if shape is not None else f"a vector {list(shapes['ia3_l'])}"
        raise InputError(
            f"{adapter.path}: module {module} implies shape {implied} for {target}, but the base has {list(base_shape)}; "
            "was the adapter made for another model?"
        )
    _check_weight(adapter, update, subtract)
    scale = -adapter.weight if subtract else adapter.weight
    _steps(plan, base, target).append(UpdateStep(index, update, scale))
    if update.changes_bias or (update.kind == "ia3" and tuple(shapes["ia3_l"])[1:] == (1,)):
        bias = _base_name(f"{module}.bias", base)
        if bias is None:
            if update.changes_bias:
                raise InputError(f"{adapter.path}: {module} has a lora_B.bias but the base has no {module}.bias")
            return  # IA3 on a bias-free layer rescales the weight only
        _steps(plan, base, bias).append(UpdateStep(index, update, scale, bias=True))


def _check_weight(adapter: LoadedAdapter, update: ModuleUpdate, subtract: bool) -> None:
    if not update.additive and (subtract or adapter.weight != 1.0):
        what = "DoRA" if update.dora else "IA3"
        if subtract:
            raise InputError(
                f"{adapter.path}: {what} rescales weights by norms or vectors of the original base, which a merged "
                f"model no longer holds; subtract cannot undo it: merge the adapter into the original base instead"
            )
        raise InputError(f"{adapter.path}: {what} updates are not additive; a weight other than 1 is not defined for them")


def _add_expert_module(plan: MergePlan, base: TensorSource, index: int, adapter: LoadedAdapter, planned: AdapterModule,
                       where: ExpertWeight, subtract: bool) -> None:
    """A per-expert module (target_modules) on its expert's rows of a fused tensor."""
    module, update, shape, shapes = planned.name, planned.update, planned.shape, planned.shapes
    fits = ia3_fits(shapes["ia3_l"], where.shape, fan_in_fan_out=update.fan_in_fan_out) if shape is None else shape == where.shape
    if not fits:
        implied = list(shape) if shape is not None else f"a vector {list(shapes['ia3_l'])}"
        raise InputError(
            f"{adapter.path}: module {module} implies shape {implied}, but it is expert {where.expert} of {where.tensor}, "
            f"whose experts are {list(where.shape)} (out, in); was the adapter made for another model?"
        )
    if update.changes_bias:
        raise InputError(f"{adapter.path}: {module} has a lora_B.bias but the base's experts in {where.tensor} have no bias")
    _check_weight(adapter, update, subtract)
    scale = -adapter.weight if subtract else adapter.weight
    _steps(plan, base, where.tensor).append(ExpertStep(index, where, scale, update))


def _add_param_loras(plan: MergePlan, base: TensorSource, index: int, adapter: LoadedAdapter, params: ParamModule,
                     subtract: bool) -> None:
    """A target_parameters LoRA, one step per expert: on the expert's part of the fused parameter,
    or on each per-expert tensor that its outputs split into."""
    layer = params.layer
    scale = -adapter.weight if subtract else adapter.weight
    for lora in params.loras:
        for expert in range(layer.experts):
            if layer.layout == "per-expert":
                for projection in lora.projections:
                    where = layer.weight(expert, projection)
                    _steps(plan, base, where.tensor).append(ExpertStep(index, where, scale, lora, expert, projection))
            else:
                where = _parameter_weight(layer, lora.param, expert)
                _steps(plan, base, where.tensor).append(ExpertStep(index, where, scale, lora, expert))


def _parameter_weight(layer: MoeLayer, param: str, expert: int) -> ExpertWeight:
    """Expert ``expert``'s whole ``(out, in)`` part of a fused parameter: down_proj's, or all 2I outputs
    of gate_up_proj in their stored order (gpt-oss's interleaved), as PEFT's delta has them."""
    if param == "down_proj":
        return layer.weight(expert, "down")
    gate = layer.weight(expert, "gate")
    return replace(gate, shape=(2 * layer.intermediate, layer.hidden), outputs=None)


_EXPERT_MODULE = re.compile(r"^(?P<experts>.+\.experts)\.(?P<expert>\d+)\.\w+$")


def _peft_drops(adapter: LoadedAdapter, modules: list[str], experts: _BaseExperts) -> str | None:
    """A note naming the modules that PEFT would drop, silently, from this adapter on this base."""
    model_type = experts.model_type
    names = PEFT_MOVED.get(FAMILIES.get(model_type, ""))
    if adapter.settings.peft_type != "LORA" or names is None:
        return None
    candidates = [m for m in modules if m.rpartition(".")[2] in names or ".experts." in m]
    if not candidates:
        return None
    located = {m: experts.locate(m) is not None for m in candidates}
    if model_type in PEFT_UNCONVERTED:
        dropped = [m for m in candidates if located[m]]
        why = (f"its per-expert LoRAs: PEFT converts per-expert names for the models that transformers maps to "
               f"{model_type}, but not for {model_type} itself")
    else:
        dropped = [m for m in candidates if not located[m] and m.rpartition(".")[2] in names]
        why = (f"Linears named {'/'.join(names)} outside the experts (dense MLPs, shared experts): PEFT moves those "
               "target_modules names to the experts' target_parameters")
    if not dropped:
        return None
    return (f"{adapter.path}: PEFT 0.21 with transformers 5 silently drops {len(dropped)} of this adapter's {len(modules)} "
            f"modules on a {model_type} model (e.g. {dropped[0]}), {why}; this output applies all {len(modules)}")


def _add_replacement(plan: MergePlan, base: TensorSource, tied: str | None, index: int, adapter: LoadedAdapter,
                     key: str, subtract: bool) -> None:
    name = full_tensor_name(key)
    target = _target(plan, base, tied, name, adapter)
    if subtract:
        raise InputError(
            f"{adapter.path}: {key} replaces {target} outright (modules_to_save); subtract cannot restore the original"
        )
    base_shape = base[_source(plan, target)].shape
    if adapter.weights[key].shape != base_shape:
        raise InputError(
            f"{adapter.path}: saved tensor {key} has shape {list(adapter.weights[key].shape)} but {target} in the base "
            f"has {list(base_shape)}; was the adapter made for another model?"
        )
    steps = _steps(plan, base, target)
    if steps:
        raise InputError(f"{adapter.path}: {key} would replace {target}, which an earlier adapter already changes")
    steps.append(ReplaceStep(index, key))


def _target(plan: MergePlan, base: TensorSource, tied: str | None, name: str, adapter: LoadedAdapter) -> str:
    target = _base_name(name, base)
    if target is not None:
        return target
    if tied is not None and name.rsplit(".", 2)[-2] == "lm_head":
        # A tied output head is not stored; the merged model gets its own, starting from the embedding.
        head = "lm_head.weight"
        if head not in plan.extra:
            plan.extra[head] = tied
            plan.notes.append(f"lm_head was tied to {tied}; the output has its own lm_head and tie_word_embeddings false")
        return head
    module = name.removesuffix(".weight")
    raise InputError(f"{adapter.path}: adapter targets {module} but the base has no {name}; is it the right base?")


def _source(plan: MergePlan, target: str) -> str:
    return plan.extra.get(target, target)


def _steps(plan: MergePlan, base: TensorSource, target: str) -> list[Step]:
    if target not in plan.targets:
        source = _source(plan, target)
        info = base[source]
        if info.dtype not in FLOAT_CODES:
            # Quantised codes (FP8, int8...) whose scales live in other tensors: adding a delta to the
            # codes would write garbage, so a format the base's view does not decode is refused.
            raise InputError(
                f"{info.file}: tensor {source} is stored as {info.dtype}, quantised in a way merge does not decode; "
                "dequantize the base with the tool that quantised it, then merge into that"
            )
        plan.targets[target] = Target(source)
    return plan.targets[target].steps


def _base_name(name: str, base: TensorSource) -> str | None:
    # PEFT keys carry the module path inside the task model (model.layers...); a checkpoint saved
    # from the bare backbone lacks the leading "model.", and the reverse also happens.
    rest = name.partition(".")[2]
    for candidate in (name, rest, f"model.{name}"):
        if candidate in base:
            return candidate
    return None


def _tied_embedding(base: TensorSource) -> str | None:
    """The input embedding a tied (unstored) lm_head shares, when config.json says they are tied."""
    if base.root is None or "lm_head.weight" in base or not (base.root / "config.json").is_file():
        return None
    config = read_json(base.root / "config.json")
    tied = config.get("tie_word_embeddings", (config.get("text_config") or {}).get("tie_word_embeddings", True))
    if not tied:
        return None
    return next((n for n in ("model.embed_tokens.weight", "embed_tokens.weight", "transformer.wte.weight") if n in base), None)


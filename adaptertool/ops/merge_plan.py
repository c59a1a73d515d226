"""The merge plan: which base tensor each adapter tensor changes, checked from headers alone."""

from __future__ import annotations

from dataclasses import dataclass, field

from adaptertool.adapters.modules import ModuleUpdate, ia3_fits
from adaptertool.adapters.peft_keys import full_tensor_name
from adaptertool.errors import AdapterToolError
from adaptertool.io import FLOAT_CODES, TensorSource, read_json
from adaptertool.ops.adapter_inputs import AdapterModule, LoadedAdapter, check_finite, plan_adapter

__all__ = ["MergePlan", "ReplaceStep", "Step", "Target", "UpdateStep", "plan_targets"]


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


Step = UpdateStep | ReplaceStep


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


def plan_targets(base: TensorSource, adapters: list[LoadedAdapter], *, subtract: bool) -> MergePlan:
    """Map every adapter tensor onto the output tensor it changes, in adapter order.

    Raises:
        AdapterToolError: a module the base lacks, shapes that do not fit, NaN/Inf in an adapter,
            a weight on an update that is not additive, or (with ``subtract``) one that cannot be undone.
    """
    plan = MergePlan()
    tied = _tied_embedding(base)
    for index, adapter in enumerate(adapters):
        check_finite(adapter)
        whole, modules = plan_adapter(adapter)
        for key in whole:
            _add_replacement(plan, base, tied, index, adapter, key, subtract)
        for module in modules.values():
            _add_module(plan, base, tied, index, adapter, module, subtract)
    return plan


def _add_module(plan: MergePlan, base: TensorSource, tied: str | None, index: int, adapter: LoadedAdapter,
                planned: AdapterModule, subtract: bool) -> None:
    module, update, shape, shapes = planned.name, planned.update, planned.shape, planned.shapes
    target = _target(plan, base, tied, f"{module}.weight", adapter)
    base_shape = base[_source(plan, target)].shape
    fits = ia3_fits(shapes["ia3_l"], base_shape, fan_in_fan_out=update.fan_in_fan_out) if shape is None else shape == base_shape
    if not fits:
        implied = list(shape) if shape is not None else f"a vector {list(shapes['ia3_l'])}"
        raise AdapterToolError(
            f"{adapter.path}: module {module} implies shape {implied} for {target}, but the base has {list(base_shape)}; "
            "was the adapter made for another model?"
        )
    if not update.additive and (subtract or adapter.weight != 1.0):
        what = "DoRA" if update.dora else "IA3"
        if subtract:
            raise AdapterToolError(
                f"{adapter.path}: {what} rescales weights by norms or vectors of the original base, which a merged "
                f"model no longer holds; subtract cannot undo it: merge the adapter into the original base instead"
            )
        raise AdapterToolError(f"{adapter.path}: {what} updates are not additive; a weight other than 1 is not defined for them")
    scale = -adapter.weight if subtract else adapter.weight
    _steps(plan, base, target).append(UpdateStep(index, update, scale))
    if update.changes_bias or (update.kind == "ia3" and tuple(shapes["ia3_l"])[1:] == (1,)):
        bias = _base_name(f"{module}.bias", base)
        if bias is None:
            if update.changes_bias:
                raise AdapterToolError(f"{adapter.path}: {module} has a lora_B.bias but the base has no {module}.bias")
            return  # IA3 on a bias-free layer rescales the weight only
        _steps(plan, base, bias).append(UpdateStep(index, update, scale, bias=True))


def _add_replacement(plan: MergePlan, base: TensorSource, tied: str | None, index: int, adapter: LoadedAdapter,
                     key: str, subtract: bool) -> None:
    name = full_tensor_name(key)
    target = _target(plan, base, tied, name, adapter)
    if subtract:
        raise AdapterToolError(
            f"{adapter.path}: {key} replaces {target} outright (modules_to_save); subtract cannot restore the original"
        )
    base_shape = base[_source(plan, target)].shape
    if adapter.weights[key].shape != base_shape:
        raise AdapterToolError(
            f"{adapter.path}: saved tensor {key} has shape {list(adapter.weights[key].shape)} but {target} in the base "
            f"has {list(base_shape)}; was the adapter made for another model?"
        )
    steps = _steps(plan, base, target)
    if steps:
        raise AdapterToolError(f"{adapter.path}: {key} would replace {target}, which an earlier adapter already changes")
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
    raise AdapterToolError(f"{adapter.path}: adapter targets {module} but the base has no {name}; is it the right base?")


def _source(plan: MergePlan, target: str) -> str:
    return plan.extra.get(target, target)


def _steps(plan: MergePlan, base: TensorSource, target: str) -> list[Step]:
    if target not in plan.targets:
        source = _source(plan, target)
        info = base[source]
        if info.dtype not in FLOAT_CODES:
            # Quantised codes (FP8, int8...) whose scales live in other tensors: adding a delta to the
            # codes would write garbage, so a format the base's view does not decode is refused.
            raise AdapterToolError(
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


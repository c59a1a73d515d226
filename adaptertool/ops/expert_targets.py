"""Which experts an adapter-writing command (init, extract) targets, and in which of PEFT's two forms.

- ``per-expert``: an ordinary LoRA on each expert's Linear, named as transformers 4 named it and as
  PEFT's target_modules adapters name it (``model.layers.1.mlp.experts.3.gate_proj``, Mixtral's
  ``model.layers.1.block_sparse_moe.experts.3.w1``), whatever the base's layout. The default where the
  base stores one Linear per expert.
- ``fused``: PEFT's target_parameters LoRA on the fused parameters of transformers 5
  (``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``): one ``lora_A (E*r, in)`` and
  ``lora_B (out, E*r)`` per parameter (:mod:`adaptertool.adapters.expert_lora`). The default where
  the base stores them fused (gpt-oss has no other form).

``--targets``: ``all-linear`` includes every expert; ``experts`` names all experts alone; any other
name matches, by PEFT's suffix rule, the expert Linear modules (per-expert form, as target_modules
would) or the fused parameters ``model.layers.1.mlp.experts.down_proj`` (fused form, as
target_parameters would). Routers named ``gate`` are Linears to PEFT (transformers 4's nn.Linear; PEFT
0.21 moves a ``gate`` target to the router's ``gate.weight`` on transformers 5), so ``all-linear``
includes them, except where PEFT 0.21 on transformers 5 cannot wrap them: qwen2_moe's (no such
conversion) and gpt-oss's ``router`` (no Linear in any version). Named, they are targeted still.
"""

from __future__ import annotations

from dataclasses import dataclass

from adaptertool.adapters.expert_lora import param_lora_keys, peft_moved_names
from adaptertool.adapters.experts import PROJECTIONS, ExpertLayout, ExpertWeight, MoeLayer, describe_experts
from adaptertool.errors import OptionError
from adaptertool.io import TensorSource, read_json
from adaptertool.ops.targets import targeted

__all__ = ["FORMS", "ExpertPlan", "ExpertUnit", "ParamUnit", "base_experts", "expert_targeted", "peft_drop_notes",
           "plan_experts", "target_parameters"]

FORMS = ("per-expert", "fused")



@dataclass(frozen=True)
class ExpertUnit:
    """One expert's projection, adapted as its own Linear module (the per-expert form)."""

    module: str  # transformers 4's name, as the adapter's keys name it
    where: ExpertWeight  # where the base stores its weight
    expert: int
    group: str  # the experts of one layer and projection, for reports: model.layers.0.mlp.experts.*.gate_proj


@dataclass(frozen=True)
class ParamUnit:
    """One fused parameter of one layer, adapted by a target_parameters LoRA (the fused form)."""

    layer: MoeLayer
    param: str  # gate_up_proj or down_proj
    a_key: str
    b_key: str

    @property
    def path(self) -> str:
        """``<experts module>.<param>``, which target_parameters and rank_pattern entries match."""
        return f"{self.layer.module}.{self.param}"

    @property
    def projections(self) -> tuple[str, ...]:
        return ("gate", "up") if self.param == "gate_up_proj" else ("down",)

    @property
    def shape(self) -> tuple[int, int]:
        """One expert's ``(out, in)``."""
        i, h = self.layer.intermediate, self.layer.hidden
        return (2 * i, h) if self.param == "gate_up_proj" else (h, i)


@dataclass(frozen=True)
class ExpertPlan:
    """The base's experts, the form adapters on them take, and the targeted ones."""

    layout: ExpertLayout
    form: str  # one of FORMS
    units: tuple[ExpertUnit, ...]  # per-expert form
    params: tuple[ParamUnit, ...]  # fused form
    stored: frozenset[str]  # the base's expert weight tensors: never ordinary Linear targets
    not_linear: frozenset[str]  # modules whose 2-D weight PEFT cannot wrap as a Linear (gpt-oss's router)

    @property
    def moved_names(self) -> tuple[str, ...]:
        return peft_moved_names(self.layout.model_type)


def base_experts(base: TensorSource) -> ExpertLayout | None:
    """The base's expert layout, from its config.json and headers; None without either."""
    if base.root is None or not (base.root / "config.json").is_file():
        return None
    path = base.root / "config.json"
    return describe_experts(read_json(path), {name: base[name].shape for name in base}, source=str(path))


def expert_targeted(name: str, targets: tuple[str, ...]) -> bool:
    """Whether ``--targets`` names an expert module or fused parameter path ``name``."""
    return "experts" in targets or targeted(name, targets)


def plan_experts(layout: ExpertLayout | None, form: str | None, targets: tuple[str, ...], *, source: str,
                 default: str | None = None) -> ExpertPlan | None:
    """The experts of ``layout`` that ``targets`` names, in ``form``; None: ``default`` where the family
    has per-expert Linears, else the form of the base's own layout.

    Raises:
        AdapterToolError: ``form`` given for a base without experts, or per-expert for gpt-oss.
    """
    if layout is None:
        if form is not None:
            raise OptionError(f"{source}: --experts {form} applies to mixture-of-experts bases, and this one has "
                              "no experts (by its config.json and tensor names)")
        return None
    first = layout.layers[0]
    if form is None and default is not None and first.has_linears:
        form = default
    elif form is None:
        form = "per-expert" if all(layer.layout == "per-expert" for layer in layout.layers) else "fused"
    elif form == "per-expert" and not first.has_linears:
        raise OptionError(f"{source}: {layout.model_type} experts exist only fused ({first.module}.gate_up_proj), "
                          "never as one Linear each; use --experts fused")
    units: list[ExpertUnit] = []
    params: list[ParamUnit] = []
    for layer in layout.layers:
        if form == "per-expert":
            for projection in PROJECTIONS:
                group = layer.linear_module(0, projection).replace(".experts.0.", ".experts.*.")
                units += [ExpertUnit(module, layer.weight(e, projection), e, group) for e in range(layer.experts)
                          if expert_targeted(module := layer.linear_module(e, projection), targets)]
        else:
            chosen = [p for p in layer.params if expert_targeted(f"{layer.module}.{p}", targets)]
            keys = param_lora_keys(layer.module, chosen)
            params += [ParamUnit(layer, p, *keys[p]) for p in chosen]
    # Routers PEFT 0.21 on transformers 5 cannot wrap: a gate it does not convert to its gate.weight (qwen2_moe),
    # gpt-oss's router (no Linear in any transformers).
    unwrapped = not peft_moved_names(layout.model_type)
    not_linear = frozenset(name.rpartition(".")[0] for layer in layout.layers for name in layer.router
                           if name.endswith(".weight") and (unwrapped or ".router." in name))
    weights = frozenset(name for name in layout.tensors if not name.endswith("_bias"))
    return ExpertPlan(layout, form, tuple(units), tuple(params), weights, not_linear)


def target_parameters(params: tuple[ParamUnit, ...] | list[ParamUnit], layout: ExpertLayout) -> list[str]:
    """adapter_config.json's target_parameters for LoRAs on ``params``: ``mlp.experts.<param>`` where
    every layer has it, else the full paths of the layers that do (PEFT matches either by suffix,
    and would report the LoRA of a layer it wraps but the adapter lacks as missing keys)."""
    names: list[str] = []
    for param in ("gate_up_proj", "down_proj"):
        have = [p for p in params if p.param == param]
        if len(have) == len(layout.layers):
            names.append(f"mlp.experts.{param}")
        else:
            names += [p.path for p in have]
    return names


def peft_drop_notes(plan: ExpertPlan, linears: list[str]) -> list[str]:
    """What PEFT 0.21 on transformers 5 would drop or refuse, silently or not, of an adapter with
    this plan's experts and LoRAs on the Linear modules ``linears`` (outside the experts)."""
    moved = [m for m in linears if m.rpartition(".")[2] in plan.moved_names]
    names = "/".join(plan.moved_names)
    if plan.form == "fused":
        return [f"PEFT 0.21 on transformers 5 cannot load this adapter: it moves target_modules named {names} (here "
                f"{len(moved)} Linears outside the experts, e.g. {moved[0]}) onto the fused experts; adaptertool merge "
                "applies it, and --targets can leave them out"] if moved else []
    if plan.layout.model_type == "qwen2_moe" and plan.units:
        return ["PEFT 0.21 on transformers 5 ignores every per-expert LoRA on a qwen2_moe model (it converts them for the "
                "models mapped to qwen2_moe, not for qwen2_moe itself); --experts fused is the form it loads"]
    return [f"PEFT 0.21 on transformers 5 drops, silently, the LoRAs of {len(moved)} Linears named {names} outside the "
            f"experts (e.g. {moved[0]}) when it loads this adapter; transformers 4 and adaptertool merge apply them"] if moved else []

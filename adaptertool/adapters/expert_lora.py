"""LoRA on fused expert parameters: PEFT's ``target_parameters`` adapters (``lora.ParamWrapper``).

One such LoRA adapts a whole ``(E, d1, d2)`` parameter with ``lora_A: (E*r, in)`` and
``lora_B: (out, E*r)``, where ``r`` is the rank of each expert. A's rows are expert-major (expert
e owns rows ``e*r .. e*r+r-1``) but B's columns rank-major (expert e owns columns ``e, E+e, 2E+e...``),
so expert e's update is ``scaling * B[:, e::E] @ A[e*r:(e+1)*r]``, an ``(out, in)`` matrix; gpt-oss
stores its params ``(E, in, out)`` and adds the transpose. Computed one expert at a time, this
equals PEFT's float32 merge bit for bit (its einsum over all experts forms the same dot products).

The saved keys do not name the parameter: two targeted params of one experts module nest, the
first registered (gate_up_proj) inside, so ``experts.base_layer.lora_A.weight`` is gate_up_proj's
and ``experts.lora_A.weight`` down_proj's. :func:`plan_param_loras` resolves this from the
config's target_parameters and checks it against the shapes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from adaptertool.adapters.experts import FAMILIES, MoeLayer
from adaptertool.adapters.peft_config import AdapterSettings
from adaptertool.adapters.peft_keys import PEFT_PREFIX, split_adapter_key
from adaptertool.errors import AdapterToolError, InputError

__all__ = ["PEFT_MOVED", "PEFT_UNCONVERTED", "ParamLora", "expert_delta", "expert_factors", "fuse_gate_up",
           "implied_layer", "param_lora_keys", "peft_moved_names", "plan_param_loras", "roles_depend_on_layout",
           "split_gate_up", "stack_experts"]

Shape = tuple[int, ...]
Factors = tuple[torch.Tensor, torch.Tensor]  # (A (r, in), B (out, r))

# PEFT 0.21 on transformers 5 loads a transformers-4 style (per-expert) LoRA by moving target_modules
# of these names (any module: dense MLPs and shared experts too) to target_parameters on the fused
# experts (peft/utils/transformers_weight_conversion.py), for every model_type transformers maps to
# these families; every other Linear of the same name loses its LoRA. qwen2_moe itself has no
# conversion entry, so its expert LoRAs are ignored instead (moe-fp8.md 5.1).
PEFT_MOVED = {"qwen2_moe": ("gate_proj", "up_proj", "down_proj"), "mixtral": ("w1", "w2", "w3")}
PEFT_UNCONVERTED = ("qwen2_moe",)


def peft_moved_names(model_type: str) -> tuple[str, ...]:
    """The target_modules names that PEFT 0.21 on transformers 5 moves to the experts of ``model_type``."""
    return () if model_type in PEFT_UNCONVERTED else PEFT_MOVED.get(FAMILIES.get(model_type, ""), ())

# PEFT 0.17.0-0.18.x gave every 3-D param (E, in, out) roles, 0.19.0 swapped them the wrong way round;
# 0.19.1 fixed both (PEFT commit e84dd8f4, "FIX How to swapped in/out features for transposed").
_FIXED_IN = (0, 19, 1)


def expert_factors(lora_a: torch.Tensor, lora_b: torch.Tensor, expert: int, *, experts: int) -> Factors:
    """Expert ``expert``'s own ``(A (r, in), B (out, r))``: views into the stacked tensors, no copy."""
    rank = lora_a.shape[0] // experts
    return lora_a[expert * rank:(expert + 1) * rank], lora_b[:, expert::experts]


def expert_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, expert: int, *, experts: int, scaling: float) -> torch.Tensor:
    """Expert ``expert``'s float32 update ``scaling * B_e @ A_e``, ``(out, in)``."""
    a, b = expert_factors(lora_a, lora_b, expert, experts=experts)
    return (b.float() @ a.float()).mul_(scaling)


def split_gate_up(t: torch.Tensor, *, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and up parts (views) of a gate_up tensor's first dimension, its ``2I`` outputs:
    halves, or for gpt-oss the even and odd rows."""
    if interleaved:
        return t[0::2], t[1::2]
    half = t.shape[0] // 2
    return t[:half], t[half:]


def stack_experts(factors: Sequence[Factors]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert ``(A_e (r, in), B_e (out, r))`` stacked into one parameter's ``lora_A (E*r, in)``
    and ``lora_B (out, E*r)``: the inverse of :func:`expert_factors`.

    Raises:
        AdapterToolError: the experts' ranks or shapes differ (one parameter has one rank).
    """
    shapes = {(tuple(a.shape), tuple(b.shape)) for a, b in factors}
    if len(shapes) != 1:
        raise InputError(f"experts have LoRA factors of different shapes {sorted(shapes)}; "
                         "a fused expert parameter takes one rank for all experts")
    lora_a = torch.cat([a for a, _ in factors])
    lora_b = torch.stack([b for _, b in factors], dim=2).flatten(1)  # (out, r, E): column k*E + e
    return lora_a, lora_b


def fuse_gate_up(gate: Factors, up: Factors, *, interleaved: bool) -> Factors:
    """One expert's gate and up LoRAs (same scaling) as one LoRA of rank ``r_gate + r_up`` on its
    gate_up outputs: A stacked, B block-diagonal (rows interleaved for gpt-oss). The product is the
    two deltas exactly, each output a sum of its own LoRA's terms plus exact zeros."""
    (a_gate, b_gate), (a_up, b_up) = gate, up
    rows, rank = b_gate.shape[0] + b_up.shape[0], b_gate.shape[1] + b_up.shape[1]
    lora_b = b_gate.new_zeros(rows, rank)
    gate_rows, up_rows = split_gate_up(lora_b, interleaved=interleaved)
    gate_rows[:, :b_gate.shape[1]] = b_gate
    up_rows[:, b_gate.shape[1]:] = b_up
    return torch.cat([a_gate, a_up.to(a_gate.dtype)]), lora_b


@dataclass(frozen=True)
class ParamLora:
    """A target_parameters LoRA on one fused expert parameter, planned from shapes."""

    module: str  # the experts module, e.g. model.layers.0.mlp.experts
    param: str  # gate_up_proj or down_proj
    a_key: str
    b_key: str
    experts: int
    rank: int  # per expert
    in_features: int
    out_features: int
    scaling: float
    interleaved: bool  # gpt-oss: gate/up outputs alternate

    @property
    def projections(self) -> tuple[str, ...]:
        return ("gate", "up") if self.param == "gate_up_proj" else ("down",)

    def delta(self, lora_a: torch.Tensor, lora_b: torch.Tensor, expert: int) -> torch.Tensor:
        """Expert ``expert``'s float32 ``(out, in)`` update of the whole parameter."""
        return expert_delta(lora_a, lora_b, expert, experts=self.experts, scaling=self.scaling)

    def projection_deltas(self, lora_a: torch.Tensor, lora_b: torch.Tensor, expert: int) -> dict[str, torch.Tensor]:
        """Expert ``expert``'s ``(out, in)`` update per projection ("gate" and "up", or "down"),
        to add to :meth:`MoeLayer.weight` views; gate and up are rows of one product, as PEFT computes it."""
        delta = self.delta(lora_a, lora_b, expert)
        return dict(zip(self.projections, split_gate_up(delta, interleaved=self.interleaved)
                        if self.param == "gate_up_proj" else (delta,)))

    def projection_factors(self, lora_a: torch.Tensor, lora_b: torch.Tensor, expert: int) -> dict[str, Factors]:
        """Expert ``expert``'s LoRA factors per projection, each ``(A (r, in), B (out, r))`` with
        :attr:`scaling`: gate and up share A and split B's rows. Exact, rank unchanged."""
        a, b = expert_factors(lora_a, lora_b, expert, experts=self.experts)
        if self.param != "gate_up_proj":
            return {"down": (a, b)}
        gate, up = split_gate_up(b, interleaved=self.interleaved)
        return {"gate": (a, gate), "up": (a, up)}


def plan_param_loras(module: str, shapes: Mapping[str, Shape], *, layer: MoeLayer, settings: AdapterSettings,
                     target_parameters: Sequence[str] | None, peft_version: str | None = None) -> tuple[ParamLora, ...]:
    """Which of an experts module's adapter tensors adapt which fused parameter, checked by shape.

    Args:
        module: the experts module the keys belong to, without ``.base_layer`` (``layer.module``).
        shapes: adapter key -> shape for every tensor of ``module``, at any ``.base_layer`` depth.
        layer: the base's layer (its params, expert count and gpt-oss orientation).
        settings: ranks and scalings; rank_pattern/alpha_pattern match ``<module>.<param>`` as in PEFT.
        target_parameters: adapter_config.json's list.
        peft_version: adapter_config.json's, which tells a transposed adapter apart where shapes cannot.

    Raises:
        AdapterToolError: unknown parts, no or non-matching target_parameters, nesting that the shapes
            contradict, an expert count or rank other than the base's and config's, or A/B roles
            transposed by PEFT 0.17-0.19.0.
    """
    if not shapes:
        return ()
    params = layer.params
    targets = tuple(target_parameters or ())
    targeted = [p for p in params if any(f"{module}.{p}" == t or f"{module}.{p}".endswith(f".{t}") for t in targets)]
    by_depth: dict[int, dict[str, str]] = {}
    for key in shapes:
        split = split_adapter_key(key)
        if split is None or split[1] not in ("lora_A", "lora_B"):
            raise InputError(f"{key}: only plain LoRA (lora_A, lora_B) applies to fused experts; "
                             "PEFT's target_parameters supports neither DoRA nor lora_bias")
        path, part = split
        if path.replace(".base_layer", "") != module:
            raise ValueError(f"{key} is not a tensor of {module}")
        depth = path.count(".base_layer")
        by_depth.setdefault(depth, {})[part] = key
    example = next(iter(shapes))
    if not targets:
        raise InputError(f"{example}: a LoRA on the fused experts {module}, but adapter_config.json has no "
                         f"target_parameters, so which of {', '.join(params)} it adapts is unknown; add "
                         f"target_parameters (e.g. {['mlp.experts.' + p for p in params]}) to adapter_config.json")
    if not targeted:
        raise InputError(f"{example}: target_parameters {list(targets)} names no parameter of {module}, "
                         f"which has {', '.join(params)}; the adapter is for another model")
    if set(by_depth) != set(range(len(targeted))):
        raise InputError(f"{module}: the adapter holds LoRAs at {len(by_depth)} nesting depths but target_parameters "
                         f"names {len(targeted)} of its parameters ({', '.join(targeted)}); the adapter is inconsistent")
    plans = []
    for depth, keys in sorted(by_depth.items()):
        if set(keys) != {"lora_A", "lora_B"}:
            raise InputError(f"{next(iter(keys.values()))}: lacks its {({'lora_A', 'lora_B'} - set(keys)).pop()}; "
                             "the adapter is incomplete")
        param = targeted[len(targeted) - 1 - depth]  # the first registered param is wrapped innermost
        plans.append(_plan_one(module, param, keys["lora_A"], keys["lora_B"], shapes, layer, settings, targeted,
                               peft_version))
    return tuple(sorted(plans, key=lambda plan: list(params).index(plan.param)))


def _plan_one(module: str, param: str, a_key: str, b_key: str, shapes: Mapping[str, Shape], layer: MoeLayer,
              settings: AdapterSettings, targeted: list[str], peft_version: str | None) -> ParamLora:
    experts = layer.experts
    a, b = tuple(shapes[a_key]), tuple(shapes[b_key])
    in_features, out_features = _features(layer, param)
    path = f"{module}.{param}"
    rank = settings.module_rank(path)
    if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
        raise InputError(f"{a_key} {list(a)} and {b_key} {list(b)} do not chain (A is (E*r, in), B (out, E*r))")
    if a[0] != experts * rank:
        made_for = f"{a[0] // rank} experts" if a[0] % rank == 0 else "no whole number of experts"
        raise InputError(f"{a_key} has {a[0]} rows, which at rank {rank} (adapter_config.json) is {made_for}, "
                         f"but {layer.block} has {experts} experts; the adapter is for another model")
    fits = {p: _features(layer, p) for p in targeted}
    if (a[1], b[0]) != (in_features, out_features):
        if (a[1], b[0]) == (out_features, in_features):
            raise _transposed(a_key, b_key, param, in_features, out_features,
                              "PEFT 0.19.0" if layer.interleaved else "PEFT 0.17-0.19.0")
        other = next((p for p, f in fits.items() if f == (a[1], b[0])), None)
        if other is not None:
            raise InputError(f"{a_key}: PEFT's nesting makes it the LoRA of {param}, but its shapes fit {other}; "
                             "cannot tell which parameter it adapts")
        raise InputError(f"{a_key} {list(a)} and {b_key} {list(b)} do not fit {path} (in {in_features}, "
                         f"out {out_features}); the adapter is for another model")
    if in_features == out_features and peft_version is not None and _swaps_roles(peft_version, layer.interleaved):
        raise _transposed(a_key, b_key, param, in_features, out_features, f"PEFT {peft_version}")
    return ParamLora(module, param, a_key, b_key, experts, rank, in_features, out_features,
                     settings.module_scaling(path, rank), layer.interleaved)


def _features(layer: MoeLayer, param: str) -> tuple[int, int]:
    """``(in, out)`` of one expert of ``param``: its stored ``(E, out, in)``, or gpt-oss's ``(E, in, out)``."""
    _, d1, d2 = layer.params[param]
    return (d1, d2) if layer.interleaved else (d2, d1)


def _swaps_roles(version: str, transposed_storage: bool) -> bool:
    found = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    if found is None:
        return False
    numbers = tuple(int(n) for n in found.groups())
    return ((0, 19, 0) if transposed_storage else (0, 17, 0)) <= numbers < _FIXED_IN


def _transposed(a_key: str, b_key: str, param: str, in_features: int, out_features: int, made_by: str) -> AdapterToolError:
    return InputError(
        f"{a_key} is (E*r, {out_features}) and {b_key} ({in_features}, E*r) for {param} (in {in_features}, out "
        f"{out_features}): A and B have the roles that {made_by} gave them by mistake on this layout (fixed in PEFT "
        "0.19.1), which current PEFT cannot load either; train the adapter again with PEFT >= 0.19.1")


def param_lora_keys(module: str, params: Sequence[str]) -> dict[str, tuple[str, str]]:
    """The ``(lora_A, lora_B)`` keys PEFT saves for target_parameters LoRAs on ``params`` of the experts
    ``module``: the inverse of :func:`plan_param_loras`' nesting rule. ``params`` must be in the module's
    registration order (:attr:`MoeLayer.params`), whose first is wrapped innermost."""
    keys = {}
    for i, param in enumerate(params):
        key = PEFT_PREFIX + module + ".base_layer" * (len(params) - 1 - i)
        keys[param] = (f"{key}.lora_A.weight", f"{key}.lora_B.weight")
    return keys


def roles_depend_on_layout(peft_version: str | None) -> bool:
    """Whether PEFT ``peft_version`` (0.17.0-0.19.0) gave target_parameters LoRAs A/B roles that are
    right or transposed depending on the base's layout, which only the base tells."""
    return peft_version is not None and _swaps_roles(peft_version, transposed_storage=False)


_EXPERTS_MODULE = re.compile(r"^(?P<layer>.+\.layers\.(?P<index>\d+))\.(?:mlp|block_sparse_moe)\.experts$")
_REGISTERED = ("gate_up_proj", "down_proj")  # every family's fused parameters, in registration order


def implied_layer(module: str, shapes: Mapping[str, Shape], *, settings: AdapterSettings,
                  target_parameters: Sequence[str] | None) -> MoeLayer:
    """The experts layer that a target_parameters adapter's own shapes imply, for a command without
    a base (combine), to plan its LoRAs with :func:`plan_param_loras`.

    The parameters nest in the registration order every known family has (gate_up_proj first); the
    expert count is A's rows over the configured rank; hidden and intermediate sizes come from the
    first parameter's shapes, which plan_param_loras then checks the second against. Whether gate
    and up interleave (gpt-oss) is not knowable, and not needed where a LoRA is handled whole.
    Where the keys cannot be resolved, the sizes stay 1 and plan_param_loras refuses with the reason.

    Raises:
        AdapterToolError: ``module`` is not named like a decoder layer's experts.
    """
    found = _EXPERTS_MODULE.match(module)
    if found is None:
        raise InputError(f"{next(iter(shapes))}: a target_parameters LoRA on {module}, which is not named like a "
                         "mixture-of-experts layer's experts (model.layers.N.mlp.experts)")
    targets = tuple(target_parameters or ())
    targeted = [p for p in _REGISTERED if any(f"{module}.{p}" == t or f"{module}.{p}".endswith(f".{t}") for t in targets)]
    experts = hidden = intermediate = 1
    depth0 = [key for key in shapes if split_adapter_key(key) == (module, "lora_A")]
    b_key = next((key for key in shapes if split_adapter_key(key) == (module, "lora_B")), None)
    if targeted and depth0 and b_key is not None and len(shapes[depth0[0]]) == 2 and len(shapes[b_key]) == 2:
        param = targeted[-1]  # the outermost wrapper's keys carry no .base_layer
        (rows, columns), out = shapes[depth0[0]], shapes[b_key][0]
        experts = max(rows // settings.module_rank(f"{module}.{param}"), 1)
        hidden, intermediate = (columns, out // 2) if param == "gate_up_proj" else (out, columns)
    return MoeLayer(int(found["index"]), "", "fused", module.removesuffix(".experts"), module, experts, hidden,
                    intermediate, (), ())

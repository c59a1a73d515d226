"""Mixture-of-experts layouts: where projection p of expert e in layer l lives in a checkpoint.

transformers 5 keeps every family's experts fused in memory (``mlp.experts.gate_up_proj``
``(E, 2I, H)`` and ``mlp.experts.down_proj`` ``(E, H, I)``), but checkpoints store them in one of
three ways, and a command must read and write whichever one the base has:

- ``per-expert``: one Linear weight per expert and projection, as ``save_pretrained()`` writes by
  default: ``mlp.experts.7.gate_proj.weight`` (Qwen-style families), or Mixtral's
  ``block_sparse_moe.experts.7.w1.weight`` (w1 gate, w3 up, w2 down).
- ``fused``: the in-memory 3-D tensors, as ``save_pretrained(save_original_format=False)`` writes;
  gate rows ``[0, I)`` and up rows ``[I, 2I)`` of ``gate_up_proj`` are concatenated.
- ``fused-transposed``: gpt-oss, fused on disk natively and stored ``(E, in, out)``, gate and up
  interleaved (gate the even, up the odd outputs), with per-expert biases.

:func:`describe_experts` reads the layout from config.json and the tensor shapes alone, checking
every expert tensor against the config, and :meth:`MoeLayer.weight` answers "where is it" as an
:class:`ExpertWeight` whose :meth:`~ExpertWeight.view` is the ``(out, in)`` weight in any layout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from adaptertool.errors import InputError

if TYPE_CHECKING:  # only views take tensors: describing a layout from headers must not import torch
    import torch

__all__ = ["FAMILIES", "LAYOUTS", "PROJECTIONS", "ExpertLayout", "ExpertWeight", "MoeLayer", "describe_experts"]

PROJECTIONS = ("gate", "up", "down")
LAYOUTS = ("per-expert", "fused", "fused-transposed")

# model_type -> family: the on-disk naming each follows (transformers' conversion_mapping groups them so).
FAMILIES: dict[str, str] = {
    "mixtral": "mixtral", "minimax": "mixtral", "minimax_m2": "mixtral",
    "gpt_oss": "gpt_oss",
    **dict.fromkeys((
        "qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_omni_moe", "qwen3_omni_moe_text", "olmoe", "flex_olmo",
        "deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe", "glm4_moe_lite", "glm4v_moe", "glm_moe_dsa",
        "dots1", "ernie4_5_moe", "hunyuan_v1_moe", "longcat_flash", "afmoe", "solar_open", "exaone_moe",
        "cohere2_moe", "sarvam_mla", "mellum", "beam",
    ), "qwen2_moe"),
}
# Per-expert Linear names of each family, by projection.
_NAMES = {
    "qwen2_moe": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    "mixtral": {"gate": "w1", "up": "w3", "down": "w2"},
}
# Config keys, first present wins: DeepSeek says n_routed_experts, Mixtral num_local_experts (and so
# does transformers 5's Qwen3-MoE config), the released Qwen/OLMoE configs num_experts.
_EXPERT_COUNT_KEYS = ("n_routed_experts", "num_local_experts", "num_experts")
_INTERMEDIATE_KEYS = ("moe_intermediate_size", "intermediate_size")

_LAYER = re.compile(r"^(?P<root>.+)\.layers\.(?P<layer>\d+)\.")
_BLOCK_TENSOR = re.compile(r"^(?P<block>(?P<root>.+)\.layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe))\.(?P<rest>.+)$")
_PER_EXPERT = re.compile(r"^(?P<expert>\d+)\.(?P<name>\w+)\.(?P<part>\w+)$")
_FUSED = ("gate_up_proj", "down_proj")
_MODULE = re.compile(r"^(?P<root>.+)\.layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe)\.experts(?P<rest>(?:\.\w+)*)$")

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ExpertWeight:
    """Where one projection of one expert is stored: a whole tensor, or a part of a fused one.

    Every part is a strided view, so :meth:`view` reads and writes the stored tensor in place and no
    layout needs a copy.
    """

    tensor: str
    shape: tuple[int, int]  # (out, in) of the projection
    expert: int | None = None  # index along dim 0 of a fused tensor; None for a per-expert tensor
    outputs: tuple[int, int, int] | None = None  # (start, stop, step) of the outputs; None for all
    transposed: bool = False  # stored (in, out), as gpt-oss
    bias: str | None = None  # gpt-oss's per-expert bias tensor, indexed like the outputs

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """The ``(out, in)`` weight of this projection inside the stored ``tensor``."""
        weight = tensor if self.expert is None else tensor[self.expert]
        return self._outputs(weight.T if self.transposed else weight)

    def bias_view(self, tensor: torch.Tensor) -> torch.Tensor:
        """The ``(out,)`` bias of this projection inside the stored bias ``tensor``."""
        return self._outputs(tensor[self.expert])

    def _outputs(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.outputs is None else t[self.outputs[0]:self.outputs[1]:self.outputs[2]]


@dataclass(frozen=True)
class MoeLayer:
    """One decoder layer's experts: their layout, sizes, router and shared experts."""

    index: int
    family: str
    layout: str  # one of LAYOUTS
    block: str  # the MoE block as stored: model.layers.3.mlp (Mixtral per-expert: ...block_sparse_moe)
    module: str  # the experts module as transformers 5 names it, which PEFT adapters name: model.layers.3.mlp.experts
    experts: int
    hidden: int
    intermediate: int
    router: tuple[str, ...]  # gate.weight, e_score_correction_bias, gpt-oss router.weight/bias...
    shared: tuple[str, ...]  # shared-expert tensors (plain Linears) and Qwen2's shared_expert_gate

    @property
    def interleaved(self) -> bool:
        """gpt-oss: params stored (E, in, out), gate and up outputs alternating."""
        return self.family == "gpt_oss"

    @property
    def params(self) -> dict[str, Shape]:
        """The fused parameters transformers 5 holds, in registration order (which PEFT's
        target_parameters wrappers nest by), with their shapes, whatever the stored layout."""
        e, h, i = self.experts, self.hidden, self.intermediate
        if self.interleaved:
            return {"gate_up_proj": (e, h, 2 * i), "down_proj": (e, i, h)}
        return {"gate_up_proj": (e, 2 * i, h), "down_proj": (e, h, i)}

    @property
    def tensors(self) -> tuple[str, ...]:
        """Every stored expert tensor of the layer (weights, and gpt-oss's biases)."""
        if self.layout == "per-expert":
            names = _NAMES[self.family]
            return tuple(f"{self.block}.experts.{e}.{names[p]}.weight" for e in range(self.experts) for p in PROJECTIONS)
        fused = tuple(f"{self.block}.experts.{p}" for p in _FUSED)
        return fused + tuple(f"{t}_bias" for t in fused) if self.interleaved else fused

    def weight(self, expert: int, projection: str) -> ExpertWeight:
        """Where ``projection`` ("gate", "up" or "down") of ``expert`` is stored."""
        if not 0 <= expert < self.experts or projection not in PROJECTIONS:
            raise ValueError(f"no {projection} projection of expert {expert} in {self.block} ({self.experts} experts)")
        i, h = self.intermediate, self.hidden
        shape = (h, i) if projection == "down" else (i, h)
        if self.layout == "per-expert":
            return ExpertWeight(f"{self.block}.experts.{expert}.{_NAMES[self.family][projection]}.weight", shape)
        name = f"{self.block}.experts.{'down_proj' if projection == 'down' else 'gate_up_proj'}"
        if projection == "down":
            outputs = None
        elif self.interleaved:
            outputs = (0 if projection == "gate" else 1, 2 * i, 2)
        else:
            outputs = (0, i, 1) if projection == "gate" else (i, 2 * i, 1)
        bias = f"{name}_bias" if self.interleaved else None
        return ExpertWeight(name, shape, expert, outputs, self.interleaved, bias)

    @property
    def has_linears(self) -> bool:
        """Whether the family ever stored its experts as one Linear each (gpt-oss never did)."""
        return self.family in _NAMES

    def linear_module(self, expert: int, projection: str) -> str:
        """The Linear module of ``projection`` of ``expert`` as transformers 4 named it, and so
        target_modules adapters and per-expert checkpoints do, whatever this checkpoint's layout:
        ``model.layers.1.mlp.experts.3.gate_proj``, Mixtral's ``model.layers.1.block_sparse_moe.experts.3.w1``."""
        if not self.has_linears:
            raise ValueError(f"{self.family} experts have no per-expert Linear modules")
        layer = self.module.removesuffix(".mlp.experts")
        block = f"{layer}.block_sparse_moe" if self.family == "mixtral" else f"{layer}.mlp"
        return f"{block}.experts.{expert}.{_NAMES[self.family][projection]}"


@dataclass(frozen=True)
class ExpertLayout:
    """A checkpoint's MoE layers, and its layers without experts."""

    model_type: str
    family: str
    layers: tuple[MoeLayer, ...]
    dense_layers: tuple[int, ...]  # layers whose MLP is an ordinary one (DeepSeek's first_k_dense_replace...)

    @property
    def tensors(self) -> frozenset[str]:
        """Every stored expert weight, and gpt-oss's expert biases (not routers or shared experts,
        which are ordinary tensors, nor a quantised weight's scales)."""
        return frozenset(name for layer in self.layers for name in layer.tensors)

    def layer(self, index: int) -> MoeLayer:
        """MoE layer ``index`` (of the decoder stack; a checkpoint has one)."""
        found = [layer for layer in self.layers if layer.index == index]
        if len(found) != 1:
            raise ValueError(f"layer {index} is not one MoE layer of this checkpoint")
        return found[0]

    def layer_of(self, module: str) -> MoeLayer | None:
        """The layer whose experts module is ``module``, in either naming (``mlp.experts`` or
        Mixtral's on-disk ``block_sparse_moe.experts``) and with PEFT's ``.base_layer`` wrappers."""
        found = _MODULE.match(module)
        if found is None or found["rest"].replace(".base_layer", ""):
            return None
        return self._layer(found["root"], int(found["layer"]))

    def locate(self, module: str) -> ExpertWeight | None:
        """Where the per-expert Linear ``module`` that a target_modules adapter names
        (``model.layers.1.mlp.experts.3.gate_proj``, Mixtral ``...block_sparse_moe.experts.3.w1``)
        is stored in this checkpoint; None if it is no expert projection of it."""
        found = _MODULE.match(module)
        parts = found["rest"].split(".")[1:] if found else []
        layer = self._layer(found["root"], int(found["layer"])) if found else None
        if layer is None or len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) >= layer.experts:
            return None
        projection = {name: p for p, name in _NAMES.get(self.family, {}).items()}.get(parts[1])
        return None if projection is None else layer.weight(int(parts[0]), projection)

    def _layer(self, root: str, index: int) -> MoeLayer | None:
        return self._by_root_and_index.get((root, index))

    @cached_property
    def _by_root_and_index(self) -> dict[tuple[str, int], MoeLayer]:
        return {(_root(layer), layer.index): layer for layer in self.layers}


def describe_experts(config: Mapping[str, Any], shapes: Mapping[str, Sequence[int]], *,
                     source: str = "config.json") -> ExpertLayout | None:
    """The MoE layout of a checkpoint, from its config.json and its tensor shapes.

    Args:
        config: config.json as read.
        shapes: every tensor name -> shape (the headers).
        source: names the config in errors.

    Returns:
        The layout, or None for a model without experts.

    Raises:
        AdapterToolError: a tensor whose shape, expert count or name disagrees with the config, an
            incomplete or mixed layout, or experts of a model_type whose layout is unknown.
    """
    model_type = str(config.get("model_type", ""))
    blocks: dict[str, dict[str, Shape]] = {}  # MoE block -> its tensors, named relative to the block
    layer_ids = set()
    for name, shape in shapes.items():
        found = _BLOCK_TENSOR.match(name)
        if found is not None:
            blocks.setdefault(found["block"], {})[found["rest"]] = tuple(shape)
        found = _LAYER.match(name)
        if found is not None:
            layer_ids.add((found["root"], int(found["layer"])))
    blocks = {block: tensors for block, tensors in blocks.items() if any(rest.startswith("experts.") for rest in tensors)}
    family = FAMILIES.get(model_type)
    if family is None:
        if blocks:
            raise InputError(
                f"{source}: model_type {model_type or '(missing)'} is not a known mixture-of-experts family, but "
                f"{next(iter(blocks))}.experts holds experts; adaptertool knows {', '.join(sorted(FAMILIES))}")
        return None
    if not blocks:
        raise InputError(f"{source}: model_type {model_type} has experts, but no tensor is named like them "
                         "(mlp.experts... / block_sparse_moe.experts...); is the config for these weights?")
    experts = _config_int(config, _EXPERT_COUNT_KEYS, source)
    hidden = _config_int(config, ("hidden_size",), source)
    intermediate = _config_int(config, _INTERMEDIATE_KEYS, source)
    sizes = f"{source} says {experts} experts, hidden_size {hidden}, expert intermediate size {intermediate}"
    layers = []
    for block, tensors in blocks.items():
        found = _BLOCK_TENSOR.match(f"{block}.x")
        assert found is not None
        experts_tensors = {rest[len("experts."):]: shape for rest, shape in tensors.items() if rest.startswith("experts.")}
        layout = _check_experts(family, block, experts_tensors, experts, hidden, intermediate, sizes)
        router = tuple(sorted(f"{block}.{rest}" for rest in tensors
                              if rest.startswith(("gate.", "router.")) or rest == "e_score_correction_bias"))
        # shared_expert. (Qwen2), shared_experts. (DeepSeek), shared_expert_gate. (Qwen2)
        shared = tuple(sorted(f"{block}.{rest}" for rest in tensors if rest.startswith("shared_expert")))
        for name in router:
            if name.endswith(".weight") and shapes[name][0] != experts:
                raise InputError(f"router {name} has {shapes[name][0]} rows, but {sizes}; "
                                 "the weights and config.json are of different models")
        layers.append(MoeLayer(int(found["layer"]), family, layout, block,
                               f"{found['root']}.layers.{found['layer']}.mlp.experts",
                               experts, hidden, intermediate, router, shared))
    layers.sort(key=lambda layer: (_root(layer), layer.index))
    moe = {(_root(layer), layer.index) for layer in layers}
    dense = sorted(index for root, index in layer_ids - moe if root in {r for r, _ in moe})
    return ExpertLayout(model_type, family, tuple(layers), tuple(dense))


def _root(layer: MoeLayer) -> str:
    return layer.block.rpartition(".layers.")[0]


def _config_int(config: Mapping[str, Any], keys: tuple[str, ...], source: str) -> int:
    for key in keys:
        value = config.get(key)
        if value is not None:
            if not isinstance(value, int) or value <= 0:
                raise InputError(f"{source}: {key} is {value!r}, expected a positive integer")
            return value
    raise InputError(f"{source}: lacks {' or '.join(keys)}, which the expert layout needs")


def _check_experts(family: str, block: str, tensors: Mapping[str, Shape], experts: int, hidden: int,
                   intermediate: int, sizes: str) -> str:
    """The layout of one block's expert tensors (names relative to ``block.experts``), checked."""
    i, h = intermediate, hidden
    fused = [rest for rest in tensors if not rest.split(".")[0].isdigit()]
    per_expert = [rest for rest in tensors if rest.split(".")[0].isdigit()]
    if fused and per_expert:
        raise InputError(f"{block}.experts holds both per-expert tensors ({block}.experts.{per_expert[0]}) and fused "
                         f"ones ({block}.experts.{fused[0]}); the checkpoint mixes two layouts")
    if per_expert:
        if family not in _NAMES:
            raise InputError(f"{block}.experts.{per_expert[0]}: {family} experts are fused on disk, never per expert")
        expected = {p: (h, i) if p == "down" else (i, h) for p in PROJECTIONS}
        by_name = {name: p for p, name in _NAMES[family].items()}
        seen: dict[str, set[int]] = {p: set() for p in PROJECTIONS}
        for rest, shape in tensors.items():
            name = f"{block}.experts.{rest}"
            found = _PER_EXPERT.match(rest)
            if found is None or found["name"] not in by_name:
                raise InputError(f"{name} is not a {family} expert weight (expected experts.N."
                                 f"{{{','.join(_NAMES[family].values())}}}.weight)")
            if found["part"] != "weight":
                continue  # a quantised weight's companion (weight_scale_inv...), which its format checks
            projection, expert = by_name[found["name"]], int(found["expert"])
            if expert >= experts:
                raise InputError(f"{name} is expert {expert}, but {sizes}; "
                                 "the weights and config.json are of different models")
            if shape != expected[projection]:
                raise InputError(f"{name} has shape {list(shape)}, expected {list(expected[projection])} ({sizes})")
            seen[projection].add(expert)
        for projection, have in seen.items():
            missing = sorted(set(range(experts)) - have)
            if missing:
                raise InputError(f"{block}.experts: experts {missing} have no {_NAMES[family][projection]}.weight, "
                                 f"but {sizes}; the checkpoint is incomplete")
        return "per-expert"
    transposed = family == "gpt_oss"
    expected = {"gate_up_proj": (experts, h, 2 * i) if transposed else (experts, 2 * i, h),
                "down_proj": (experts, i, h) if transposed else (experts, h, i)}
    if transposed:
        expected |= {"gate_up_proj_bias": (experts, 2 * i), "down_proj_bias": (experts, h)}
    for rest, shape in tensors.items():
        name = f"{block}.experts.{rest}"
        if rest.endswith(("_blocks", "_scales")):
            raise InputError(f"{name}: MXFP4-packed experts have no 16-bit layout here; dequantize the checkpoint first")
        if rest not in expected and rest.startswith(tuple(f"{p}_" for p in _FUSED)):
            continue  # a quantised weight's companion (gate_up_proj_scale_inv...), which its format checks
        if rest not in expected:
            raise InputError(f"{name} is not a {family} fused expert tensor (expected {', '.join(expected)})")
        if len(shape) == len(expected[rest]) and shape[0] != experts:
            raise InputError(f"{name} holds {shape[0]} experts, but {sizes}; "
                             "the weights and config.json are of different models")
        if shape != expected[rest]:
            layout = "(experts, in, out)" if transposed else "(experts, out, in)"
            raise InputError(f"{name} has shape {list(shape)}, expected {list(expected[rest])} {layout} ({sizes})")
    for rest in expected:
        if rest not in tensors:
            raise InputError(f"{block}.experts has no {rest}; the checkpoint is incomplete")
    return "fused-transposed" if transposed else "fused"

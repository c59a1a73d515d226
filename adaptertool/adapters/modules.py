"""One adapted module: which family it is, what base shape it needs, and how it changes a weight.

The merge pipeline groups an adapter's tensors by module (:func:`split_adapter_key`), turns each
group into a :class:`ModuleUpdate` from tensor shapes alone (so every mismatch is found before a
byte is written), then calls :meth:`ModuleUpdate.apply_` on each float32 base weight as it streams.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from adaptertool.adapters.ia3 import ia3_scale_
from adaptertool.adapters.lora import (
    adalora_delta,
    dora_rescale_,
    embedding_delta,
    linear_delta,
)
from adaptertool.adapters.lycoris import loha_delta, lokr_delta
from adaptertool.adapters.peft_config import AdapterSettings
from adaptertool.errors import InputError

__all__ = ["ADDITIVE_KINDS", "ModuleUpdate", "ia3_fits", "plan_module"]

Shape = tuple[int, ...]

# kind -> (required parts, optional parts); parts are split_adapter_key's names.
_KINDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "lora": (frozenset({"lora_A", "lora_B"}), frozenset({"lora_B.bias", "lora_magnitude_vector"})),
    "lora_embedding": (frozenset({"lora_embedding_A", "lora_embedding_B"}), frozenset({"lora_magnitude_vector"})),
    "adalora": (frozenset({"lora_A", "lora_B", "lora_E"}), frozenset()),
    "loha": (frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}), frozenset()),
    "lokr": (frozenset(), frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"})),
    "ia3": (frozenset({"ia3_l"}), frozenset()),
}
# Families whose update is a delta that can be weighted and subtracted (DoRA and IA3 rescale instead).
ADDITIVE_KINDS = frozenset({"lora", "lora_embedding", "adalora", "loha", "lokr"})


@dataclass(frozen=True)
class ModuleUpdate:
    """How one adapter changes one module."""

    module: str
    kind: str
    keys: Mapping[str, str]  # part -> adapter tensor key
    scaling: float
    fan_in_fan_out: bool = False
    dora: bool = False

    @property
    def blockwise(self) -> bool:
        """True for plain Linear LoRA, which :func:`~adaptertool.adapters.lora.merge_linear_into` merges
        in row blocks, without full-size temporaries."""
        return self.kind == "lora" and not self.dora and not self.fan_in_fan_out

    @property
    def additive(self) -> bool:
        """True when the update is ``W + delta``, so weights and subtraction are defined."""
        return self.kind in ADDITIVE_KINDS and not self.dora

    def apply_(self, weight: torch.Tensor, tensors: Mapping[str, torch.Tensor], *, scale: float = 1.0) -> torch.Tensor:
        """Update the float32 ``weight`` in place (and return it); ``tensors`` maps part -> tensor.

        ``scale`` weights an additive update (``W + scale * delta``); -1 undoes it.
        """
        if self.kind == "ia3":
            return ia3_scale_(weight, tensors["ia3_l"], fan_in_fan_out=self.fan_in_fan_out)
        weight.add_(self.delta(tensors), alpha=scale)  # alpha = +-1 adds exactly as PEFT's plain add
        if self.dora:
            dim = 0 if self.kind == "lora_embedding" or self.fan_in_fan_out else 1
            dora_rescale_(weight, tensors["lora_magnitude_vector"], dim=dim)
        return weight

    def apply_bias_(self, bias: torch.Tensor, tensors: Mapping[str, torch.Tensor], *, scale: float = 1.0) -> torch.Tensor:
        """Update the float32 base bias in place: LoRA's ``lora_B.bias * scaling``, or IA3's rescale."""
        if self.kind == "ia3":
            return bias.mul_(tensors["ia3_l"].float().reshape(-1))
        return bias.add_(tensors["lora_B.bias"].float() * self.scaling, alpha=scale)

    @property
    def changes_bias(self) -> bool:
        return "lora_B.bias" in self.keys

    def delta(self, t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The float32 additive update (scaling applied, in the base weight's layout); not for IA3,
        and for DoRA only the direction's part (the magnitude rescale comes after the add)."""
        if self.kind == "lora":
            return linear_delta(t["lora_A"], t["lora_B"], self.scaling, fan_in_fan_out=self.fan_in_fan_out)
        if self.kind == "lora_embedding":
            return embedding_delta(t["lora_embedding_A"], t["lora_embedding_B"], self.scaling)
        if self.kind == "adalora":
            return adalora_delta(t["lora_A"], t["lora_E"], t["lora_B"], self.scaling, fan_in_fan_out=self.fan_in_fan_out)
        if self.kind == "loha":
            delta = loha_delta(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], self.scaling)
            return delta.T if self.fan_in_fan_out else delta
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"].float() @ t["lokr_w1_b"].float()
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"].float() @ t["lokr_w2_b"].float()
        delta = lokr_delta(w1, w2, self.scaling)
        return delta.T if self.fan_in_fan_out else delta


def plan_module(module: str, keys: Mapping[str, str], shapes: Mapping[str, Shape], settings: AdapterSettings) -> tuple[ModuleUpdate, Shape | None]:
    """Classify one module's adapter tensors and derive the base weight shape they need.

    Args:
        module: the module path, e.g. ``model.layers.0.self_attn.q_proj``.
        keys: part -> adapter key for this module; shapes: part -> shape.

    Returns:
        The update, and the base weight shape it requires (None for IA3, whose vector fits either
        dimension: see :func:`ia3_fits`).

    Raises:
        AdapterToolError: unknown or missing parts, or ranks that disagree.
    """
    kind = _kind(settings.peft_type, set(keys), module)
    rank = _rank(kind, shapes, module)
    if kind in ("lora", "lora_embedding", "loha") and settings.module_rank(module) != rank:
        raise InputError(
            f"module {module} has rank {rank} in its tensors but the config says r={settings.module_rank(module)}; "
            "the adapter is inconsistent"
        )
    if kind not in ("adalora", "ia3"):  # PEFT scales by the configured rank; AdaLoRA by the loaded one
        rank = settings.module_rank(module)
    fifo = settings.fan_in_fan_out and kind != "lora_embedding"
    dora = "lora_magnitude_vector" in keys
    if settings.dora and not dora:
        raise InputError(f"module {module}: the config says use_dora but there is no lora_magnitude_vector; the adapter is incomplete")
    update = ModuleUpdate(module, kind, dict(keys), settings.module_scaling(module, rank), fifo, dora)
    shape = _target_shape(kind, shapes)
    if shape is not None and fifo:
        shape = shape[::-1]
    if dora:
        rows = shape[1] if kind == "lora_embedding" or fifo else shape[0]
        if tuple(shapes["lora_magnitude_vector"]) != (rows,):
            raise InputError(f"module {module}: lora_magnitude_vector has shape {list(shapes['lora_magnitude_vector'])}, expected [{rows}]")
    return update, shape


def ia3_fits(ia3_shape: Shape, base_shape: Shape, *, fan_in_fan_out: bool) -> bool:
    """Whether an ``ia3_l`` of ``ia3_shape`` broadcasts against a 2-D base weight."""
    out, inp = base_shape[::-1] if fan_in_fan_out else base_shape
    return tuple(ia3_shape) in ((out, 1), (1, inp))


def _kind(peft_type: str, parts: set[str], module: str) -> str:
    candidates = {
        "LORA": ("lora_embedding",) if "lora_embedding_A" in parts else ("lora",),
        "ADALORA": ("adalora",),
        "LOHA": ("loha",),
        "LOKR": ("lokr",),
        "IA3": ("ia3",),
    }[peft_type]
    kind = candidates[0]
    required, optional = _KINDS[kind]
    unknown = parts - required - optional
    if unknown:
        raise InputError(
            f"module {module}: {peft_type} tensors {sorted(unknown)} are not supported "
            "(convolution layers and mixed families cannot be merged yet)"
        )
    missing = required - parts
    if kind == "lokr":
        for side in ("lokr_w1", "lokr_w2"):
            if side not in parts and not {f"{side}_a", f"{side}_b"} <= parts:
                missing = missing | {side}
    if missing:
        raise InputError(f"module {module} lacks {sorted(missing)}; the adapter is incomplete")
    return kind


def _rank(kind: str, shapes: Mapping[str, Shape], module: str) -> int:
    if kind in ("lora", "adalora", "lora_embedding"):
        a_part, b_part = ("lora_embedding_A", "lora_embedding_B") if kind == "lora_embedding" else ("lora_A", "lora_B")
        a, b = shapes[a_part], shapes[b_part]
        if len(a) != 2 or len(b) != 2:
            raise InputError(f"module {module}: {a_part} has shape {list(a)}; LoRA on convolution layers is not supported")
        if a[0] != b[1]:
            raise InputError(f"module {module}: {a_part} {list(a)} and {b_part} {list(b)} do not chain (A is (r, in), B (out, r))")
        return a[0]
    if kind == "loha":
        if any(len(shape) != 2 for shape in shapes.values()):
            raise InputError(f"module {module}: LoHa on convolution layers is not supported")
        return shapes["hada_w1_b"][0]
    return 0  # LoKr's factors need not show r; IA3 has none


def _target_shape(kind: str, shapes: Mapping[str, Shape]) -> Shape | None:
    if kind in ("lora", "adalora"):
        return (shapes["lora_B"][0], shapes["lora_A"][1])
    if kind == "lora_embedding":
        return (shapes["lora_embedding_A"][1], shapes["lora_embedding_B"][0])
    if kind == "loha":
        one = (shapes["hada_w1_a"][0], shapes["hada_w1_b"][1])
        two = (shapes["hada_w2_a"][0], shapes["hada_w2_b"][1])
        if one != two:
            raise InputError(f"LoHa factors disagree: w1 gives {list(one)}, w2 gives {list(two)}")
        return one
    if kind == "lokr":
        w1 = shapes["lokr_w1"] if "lokr_w1" in shapes else (shapes["lokr_w1_a"][0], shapes["lokr_w1_b"][1])
        w2 = shapes["lokr_w2"] if "lokr_w2" in shapes else (shapes["lokr_w2_a"][0], shapes["lokr_w2_b"][1])
        return (w1[0] * w2[0], w1[1] * w2[1])
    return None

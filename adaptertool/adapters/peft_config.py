"""PEFT's adapter_config.json, read into the settings the merge maths needs."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from adaptertool.adapters.lora import lora_scaling
from adaptertool.errors import InputError

__all__ = ["FLOAT32_MAX", "SUPPORTED_PEFT_TYPES", "AdapterSettings", "match_pattern", "uniform_scaling"]

SUPPORTED_PEFT_TYPES = ("LORA", "LOHA", "LOKR", "ADALORA", "IA3")
# Scales multiply float32 tensors: past this they overflow to Inf (and torch refuses them as an add's alpha).
FLOAT32_MAX = 3.4028234663852886e38


def match_pattern(patterns: dict[str, Any], module: str) -> Any | None:
    """The value of the first key of ``patterns`` matching ``module``, as PEFT >= 0.15 matches
    rank_pattern/alpha_pattern: ``(.*\\.)?(key)$`` anchored at the start; None when none matches."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def uniform_scaling(ranks: Mapping[str, int], *, default_rank: int) -> dict[str, Any]:
    """The config keys that give every module scaling 1 at its own rank.

    ``r`` is the most common rank (the larger on a tie; ``default_rank`` when there is none) and
    ``lora_alpha == r``; modules of another rank get ``rank_pattern`` and ``alpha_pattern`` entries
    equal to their rank, keyed by the escaped full module name so each matches that module only.

    Args:
        ranks: module path -> rank, in the order the patterns should list them.
        default_rank: ``r`` when ``ranks`` is empty.

    Returns:
        ``{"r", "lora_alpha"}`` plus ``{"rank_pattern", "alpha_pattern"}`` when some rank differs.
    """
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k)) if counts else default_rank
    pattern = {re.escape(module): rank for module, rank in ranks.items() if rank != r}
    config: dict[str, Any] = {"r": r, "lora_alpha": r}
    if pattern:
        config["rank_pattern"] = pattern
        config["alpha_pattern"] = dict(pattern)
    return config


@dataclass(frozen=True, kw_only=True)
class AdapterSettings:
    """The parts of an adapter_config.json that decide how each module merges."""

    peft_type: str
    rank: int = 0  # 0 for IA3, which has none
    alpha: float = 0.0
    rslora: bool = False
    dora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: tuple[str, ...] = ()
    base_model: str | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any], *, source: str) -> AdapterSettings:
        """Read a PEFT config dict; ``source`` names the file in errors.

        Every number the merge maths uses is checked here, before anything is written: ranks are
        positive whole numbers, alphas finite, and pattern keys valid regular expressions.
        """
        peft_type = str(config.get("peft_type", "")).upper()
        if peft_type not in SUPPORTED_PEFT_TYPES:
            raise InputError(
                f"{source}: peft_type {peft_type or '(missing)'} is not supported; adaptertool merges "
                + ", ".join(SUPPORTED_PEFT_TYPES)
            )
        # LoHa/LoKr call their alpha "alpha"; LoRA and AdaLoRA "lora_alpha". PEFT's defaults apply when absent.
        alpha_key = "alpha" if peft_type in ("LOHA", "LOKR") else "lora_alpha"
        if peft_type != "IA3" and "r" not in config:
            raise InputError(f"{source}: {peft_type} config lacks 'r'; is the file complete?")
        rank = 0 if peft_type == "IA3" else _rank(config["r"], "r", source)
        base_model = config.get("base_model_name_or_path")
        return cls(
            peft_type=peft_type,
            rank=rank,
            alpha=_finite(config.get(alpha_key, 8), alpha_key, source),
            rslora=bool(config.get("use_rslora", False)),
            dora=bool(config.get("use_dora", False)),
            fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
            # AdaLoRA's rank_pattern holds masks; shapes tell its ranks.
            rank_pattern={k: _rank(v, f"rank_pattern[{k!r}]", source)
                          for k, v in _pattern(config, "rank_pattern", source).items()} if peft_type != "ADALORA" else {},
            alpha_pattern={k: _finite(v, f"alpha_pattern[{k!r}]", source)
                           for k, v in _pattern(config, "alpha_pattern", source).items()},
            modules_to_save=_names(config, "modules_to_save", source),
            base_model=base_model if isinstance(base_model, str) else None,
        )

    def module_rank(self, module: str) -> int:
        value = match_pattern(self.rank_pattern, module)
        return self.rank if value is None else value

    def module_alpha(self, module: str) -> float:
        value = match_pattern(self.alpha_pattern, module)
        return self.alpha if value is None else value

    def module_scaling(self, module: str, rank: int) -> float:
        """PEFT's scaling for ``module`` whose tensors have rank ``rank``."""
        if self.peft_type == "IA3":
            return 1.0
        if self.peft_type == "ADALORA":  # PEFT: lora_alpha if positive, else r
            return self.alpha if self.alpha > 0 else float(rank)
        return lora_scaling(self.module_alpha(module), rank, rslora=self.rslora and self.peft_type == "LORA")


def _rank(value: object, key: str, source: str) -> int:
    """A rank: a positive whole number (8.0 is 8; 4.7 is refused, not truncated)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InputError(f"{source}: {key} must be a positive whole number, got {_show(value)}")
    return value


def _finite(value: object, key: str, source: str) -> float:
    """An alpha: a finite number within float32's range. NaN or Inf would pass every tensor check
    and write a model of NaNs."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not abs(value) <= FLOAT32_MAX:
        raise InputError(f"{source}: {key} must be a finite number within float32's range, got {_show(value)}")
    return float(value)


def _pattern(config: dict[str, Any], key: str, source: str) -> dict[str, Any]:
    """rank_pattern or alpha_pattern: an object whose keys are regular expressions PEFT can match."""
    pattern = config.get(key) or {}
    if not isinstance(pattern, dict):
        raise InputError(f"{source}: {key} must be an object of module pattern -> value, got {_show(pattern)}")
    for name in pattern:
        try:
            re.compile(rf"(.*\.)?({name})$")
        except re.error as err:
            raise InputError(f"{source}: {key} key {name!r} is not a valid regular expression ({err})") from None
    return pattern


def _names(config: dict[str, Any], key: str, source: str) -> tuple[str, ...]:
    """A list of module names (PEFT also takes one name alone)."""
    names = config.get(key) or ()
    names = (names,) if isinstance(names, str) else names
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise InputError(f"{source}: {key} must be a list of module names, got {_show(names)}")
    return tuple(names)


def _show(value: object) -> str:
    """``value`` for a one-line message: containers by kind, a huge int by size (Python refuses to
    print one past 4300 digits), anything else by a repr cut to 40 characters."""
    if isinstance(value, list | dict):
        return f"a JSON {'array' if isinstance(value, list) else 'object'}"
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."

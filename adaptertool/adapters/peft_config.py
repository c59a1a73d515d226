"""PEFT's adapter_config.json, read into the settings the merge maths needs."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from adaptertool.adapters.lora import lora_scaling
from adaptertool.errors import AdapterToolError

__all__ = ["LoraSettings", "match_pattern"]


def match_pattern(patterns: dict[str, Any], module: str) -> Any | None:
    """The value of the first key of ``patterns`` matching ``module``, as PEFT >= 0.15 matches
    rank_pattern/alpha_pattern: ``(.*\\.)?(key)$`` anchored at the start; None when none matches."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


@dataclass(frozen=True, kw_only=True)
class LoraSettings:
    """The parts of a LoRA adapter_config.json that decide each module's scaling."""

    rank: int
    alpha: float
    rslora: bool = False
    dora: bool = False
    fan_in_fan_out: bool = False
    lora_bias: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: tuple[str, ...] = ()
    base_model: str | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any], *, source: str) -> LoraSettings:
        """Read a PEFT config dict; ``source`` names the file in errors."""
        peft_type = str(config.get("peft_type", "")).upper()
        if peft_type != "LORA":
            raise AdapterToolError(f"{source}: peft_type {peft_type or 'missing'} is not supported yet; only LORA adapters merge")
        try:
            settings = cls(
                rank=int(config["r"]),
                alpha=float(config.get("lora_alpha", 8)),
                rslora=bool(config.get("use_rslora", False)),
                dora=bool(config.get("use_dora", False)),
                fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
                lora_bias=bool(config.get("lora_bias", False)),
                rank_pattern={str(k): int(v) for k, v in (config.get("rank_pattern") or {}).items()},
                alpha_pattern={str(k): float(v) for k, v in (config.get("alpha_pattern") or {}).items()},
                modules_to_save=tuple(config.get("modules_to_save") or ()),
                base_model=config.get("base_model_name_or_path"),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise AdapterToolError(f"{source}: invalid LoRA config ({err!r}); is it a PEFT adapter_config.json?") from err
        if settings.rank <= 0:
            raise AdapterToolError(f"{source}: r must be positive, got {settings.rank}")
        return settings

    def module_rank(self, module: str) -> int:
        value = match_pattern(self.rank_pattern, module)
        return self.rank if value is None else value

    def module_scaling(self, module: str) -> float:
        """PEFT's scaling for ``module``: its alpha over its rank (or sqrt of it with rsLoRA)."""
        alpha = match_pattern(self.alpha_pattern, module)
        return lora_scaling(self.alpha if alpha is None else alpha, self.module_rank(module), rslora=self.rslora)

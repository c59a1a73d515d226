"""PEFT's adapter_config.json, read into the settings the merge maths needs."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from adaptertool.adapters.lora import lora_scaling
from adaptertool.errors import AdapterToolError

__all__ = ["SUPPORTED_PEFT_TYPES", "AdapterSettings", "match_pattern", "uniform_scaling"]

SUPPORTED_PEFT_TYPES = ("LORA", "LOHA", "LOKR", "ADALORA", "IA3")


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
        """Read a PEFT config dict; ``source`` names the file in errors."""
        peft_type = str(config.get("peft_type", "")).upper()
        if peft_type not in SUPPORTED_PEFT_TYPES:
            raise AdapterToolError(
                f"{source}: peft_type {peft_type or '(missing)'} is not supported; adaptertool merges "
                + ", ".join(SUPPORTED_PEFT_TYPES)
            )
        # LoHa/LoKr call their alpha "alpha"; LoRA and AdaLoRA "lora_alpha". PEFT's defaults apply when absent.
        alpha_key = "alpha" if peft_type in ("LOHA", "LOKR") else "lora_alpha"
        try:
            rank = 0 if peft_type == "IA3" else int(config["r"])
            settings = cls(
                peft_type=peft_type,
                rank=rank,
                alpha=float(config.get(alpha_key, 8)),
                rslora=bool(config.get("use_rslora", False)),
                dora=bool(config.get("use_dora", False)),
                fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
                rank_pattern={str(k): int(v) for k, v in (config.get("rank_pattern") or {}).items()}
                if peft_type != "ADALORA" else {},  # AdaLoRA's rank_pattern holds masks; shapes tell its ranks
                alpha_pattern={str(k): float(v) for k, v in (config.get("alpha_pattern") or {}).items()},
                modules_to_save=tuple(config.get("modules_to_save") or ()),
                base_model=config.get("base_model_name_or_path"),
            )
        except KeyError as err:
            raise AdapterToolError(f"{source}: {peft_type} config lacks {err.args[0]!r}; is the file complete?") from err
        except (TypeError, ValueError) as err:
            raise AdapterToolError(f"{source}: invalid {peft_type} config ({err}); is it a PEFT adapter_config.json?") from err
        if peft_type != "IA3" and settings.rank <= 0:
            raise AdapterToolError(f"{source}: r must be positive, got {settings.rank}")
        return settings

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

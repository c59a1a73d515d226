"""Learning-rate schedules: linear warmup, then cosine, linear or constant.

The learning rate of optimizer step ``k`` (0-based, the k-th update) is ``base_lr * factor(k)``::

    warmup (k < W):   factor = k / W
    cosine:           factor = 0.5 * (1 + cos(pi * p)),  p = (k - W) / (N - W)
    linear:           factor = max(0, (N - k) / (N - W))
    constant:         factor = 1

with W warmup steps and N total steps, the convention of transformers' ``get_*_schedule_with_warmup``
(so the first update has learning rate 0 when W > 0). A pure function of the step: resuming needs no
scheduler state.
"""

from __future__ import annotations

import math

from adaptertool.errors import OptionError

__all__ = ["SCHEDULES", "lr_factor", "warmup_steps"]

SCHEDULES = ("cosine", "linear", "constant")


def lr_factor(step: int, *, total_steps: int, warmup: int, schedule: str) -> float:
    """The multiplier of the base learning rate at optimizer step ``step`` (see the module docstring)."""
    if schedule not in SCHEDULES:
        raise OptionError(f"--schedule must be one of {', '.join(SCHEDULES)}, not {schedule!r}")
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup)
    if schedule == "linear":
        return max(0.0, (total_steps - step) / span)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / span)))


def warmup_steps(total_steps: int, *, steps: int | None, ratio: float | None) -> int:
    """Warmup length from ``--warmup-steps`` or ``--warmup-ratio`` (ceil of ratio x total, as transformers)."""
    if steps is not None and ratio is not None:
        raise OptionError("give --warmup-steps or --warmup-ratio, not both")
    if steps is not None:
        if steps < 0:
            raise OptionError(f"--warmup-steps must be >= 0, not {steps}")
        return steps
    if ratio is not None:
        if not 0.0 <= ratio < 1.0:
            raise OptionError(f"--warmup-ratio must be in [0, 1), not {ratio}")
        return math.ceil(total_steps * ratio)
    return 0

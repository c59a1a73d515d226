"""Learning-rate schedules against transformers' get_*_schedule_with_warmup (the oracle)."""

from __future__ import annotations

import math

import pytest
import torch

from adaptertool.errors import AdapterToolError
from adaptertool.training.schedule import lr_factor, warmup_steps


def _transformers_factors(schedule: str, total: int, warmup: int) -> list[float]:
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    if schedule == "cosine":
        sched = get_cosine_schedule_with_warmup(optimizer, warmup, total)
    elif schedule == "linear":
        sched = get_linear_schedule_with_warmup(optimizer, warmup, total)
    else:
        sched = get_constant_schedule_with_warmup(optimizer, warmup)
    factors = []
    for _ in range(total):
        factors.append(optimizer.param_groups[0]["lr"])  # the lr the next update uses
        optimizer.step()
        sched.step()
    return factors


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize(("total", "warmup"), [(1, 0), (10, 0), (10, 3), (37, 5), (5, 5)], ids=lambda v: str(v))
def test_factors_equal_transformers(schedule: str, total: int, warmup: int) -> None:
    ours = [lr_factor(k, total_steps=total, warmup=warmup, schedule=schedule) for k in range(total)]
    assert ours == pytest.approx(_transformers_factors(schedule, total, warmup), abs=1e-12)


def test_cosine_shape() -> None:
    # Warmup 0 .. 1 linearly, then a half cosine from 1 towards 0 (exact maths, not the oracle).
    assert lr_factor(0, total_steps=10, warmup=4, schedule="cosine") == 0.0
    assert lr_factor(2, total_steps=10, warmup=4, schedule="cosine") == 0.5
    assert lr_factor(4, total_steps=10, warmup=4, schedule="cosine") == 1.0
    assert lr_factor(7, total_steps=10, warmup=4, schedule="cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_factor(10, total_steps=10, warmup=4, schedule="cosine") == pytest.approx(0.0, abs=1e-15)


def test_warmup_steps_from_ratio_and_errors() -> None:
    assert warmup_steps(100, steps=None, ratio=0.03) == 3
    assert warmup_steps(10, steps=None, ratio=0.25) == 3  # ceil, as transformers
    assert warmup_steps(10, steps=4, ratio=None) == 4
    assert warmup_steps(10, steps=None, ratio=None) == 0
    with pytest.raises(AdapterToolError, match="not both"):
        warmup_steps(10, steps=1, ratio=0.1)
    with pytest.raises(AdapterToolError, match=r"--warmup-ratio must be in \[0, 1\)"):
        warmup_steps(10, steps=None, ratio=1.5)
    with pytest.raises(AdapterToolError, match="--schedule must be one of"):
        lr_factor(0, total_steps=1, warmup=0, schedule="step")

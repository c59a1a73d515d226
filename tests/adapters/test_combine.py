"""Adapter algebra maths against references written separately here, in float64 on small tensors.

The TIES reference walks every entry with Python scalars (trim by sorting, vote, disjoint mean) so
it shares no vectorised code path with the implementation.
"""

from __future__ import annotations

import math

import pytest
import torch

from adaptertool.adapters.combine import (
    LowRank,
    combine_task_vectors,
    dare_drop,
    magnitude_trim,
    stack_factors,
    ties_merge,
)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _parts(ranks: list[int], out: int = 9, inp: int = 7) -> list[LowRank]:
    return [LowRank(_randn(out, r, seed=10 + i), _randn(r, inp, seed=20 + i), coefficient=0.5 + i)
            for i, r in enumerate(ranks)]


@pytest.mark.parametrize("balanced", [False, True], ids=["cat", "linear"])
@pytest.mark.parametrize("ranks", [[1], [4, 1], [3, 2, 5]], ids=["one-rank1", "two", "three"])
def test_stacked_factors_are_the_exact_weighted_sum(ranks: list[int], balanced: bool) -> None:
    parts = _parts(ranks)
    weights = [0.7, -1.3, 0.25][: len(ranks)]
    b, a = stack_factors(parts, weights, balanced=balanced)
    assert b.dtype == a.dtype == torch.float32 and a.shape == (sum(ranks), 7) and b.shape == (9, sum(ranks))
    expected = sum(w * p.coefficient * (p.b.double() @ p.a.double()) for p, w in zip(parts, weights))
    got = b.double() @ a.double()
    # float32 factors: each entry's error is a few float32 roundings of the scaled factors.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_linear_splits_the_weight_evenly_with_its_sign_on_a() -> None:
    (part,) = _parts([3])
    b, a = stack_factors([part], [-2.0], balanced=True)
    root = math.sqrt(2.0 * part.coefficient)
    torch.testing.assert_close(a, -root * part.a, rtol=1e-6, atol=0)
    torch.testing.assert_close(b, root * part.b, rtol=1e-6, atol=0)


def _trim_reference(tau: torch.Tensor, density: float) -> torch.Tensor:
    values = tau.double().reshape(-1).tolist()
    k = max(1, min(len(values), math.floor(density * len(values) + 0.5)))
    keep = set(sorted(range(len(values)), key=lambda i: -abs(values[i]))[:k])
    return torch.tensor([v if i in keep else 0.0 for i, v in enumerate(values)], dtype=torch.float64).reshape(tau.shape)


@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 0.99, 1.0])
def test_magnitude_trim_keeps_the_largest(density: float) -> None:
    tau = _randn(6, 11, seed=3)
    got = magnitude_trim(tau, density)
    assert torch.equal(got.double(), _trim_reference(tau, density))
    assert int((got != 0).sum()) == max(1, math.floor(density * 66 + 0.5))


def test_magnitude_trim_keeps_ties_at_the_threshold() -> None:
    tau = torch.tensor([3.0, -2.0, 2.0, 1.0])
    assert torch.equal(magnitude_trim(tau, 0.5), torch.tensor([3.0, -2.0, 2.0, 0.0]))


def _ties_reference(taus: list[torch.Tensor], weights: list[float], density: float, sign: str) -> torch.Tensor:
    trimmed = [(_trim_reference(t, density) * w).reshape(-1).tolist() for t, w in zip(taus, weights)]
    out = []
    for column in zip(*trimmed):
        vote = sum(column) if sign == "total" else sum((v > 0) - (v < 0) for v in column)
        elected = 1 if vote >= 0 else -1
        agreeing = [v for v in column if v != 0 and (v > 0) == (elected > 0)]
        out.append(sum(agreeing) / len(agreeing) if agreeing else 0.0)
    return torch.tensor(out, dtype=torch.float64).reshape(taus[0].shape)


@pytest.mark.parametrize("sign", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.2, 0.6, 1.0])
def test_ties_matches_the_reference(sign: str, density: float) -> None:
    taus = [_randn(5, 8, seed=s) for s in (1, 2, 3)]
    weights = [1.0, 0.5, -0.8]  # a negative weight votes with the sign it contributes
    got = combine_task_vectors(taus, weights, operation="ties", density=density, majority_sign=sign)
    torch.testing.assert_close(got.double(), _ties_reference(taus, weights, density, sign), rtol=1e-6, atol=1e-7)


def test_total_and_frequency_elect_differently() -> None:
    # One large positive value against two small negative ones: "total" elects +, "frequency" -.
    terms = [torch.tensor([5.0]), torch.tensor([-1.0]), torch.tensor([-2.0])]
    assert ties_merge(terms, majority_sign="total").item() == 5.0
    assert ties_merge(terms, majority_sign="frequency").item() == -1.5


def test_magnitude_prune_is_the_weighted_sum_of_trimmed_deltas() -> None:
    taus = [_randn(7, 4, seed=s) for s in (4, 5)]
    got = combine_task_vectors(taus, [0.3, -2.0], operation="magnitude_prune", density=0.4)
    expected = 0.3 * _trim_reference(taus[0], 0.4) - 2.0 * _trim_reference(taus[1], 0.4)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-7)


def test_sum_is_task_arithmetic() -> None:
    taus = [_randn(3, 4, seed=s) for s in (6, 7)]
    got = combine_task_vectors(taus, [2.0, -0.5], operation="sum")
    torch.testing.assert_close(got.double(), 2.0 * taus[0].double() - 0.5 * taus[1].double(), rtol=1e-6, atol=1e-7)
    assert torch.equal(taus[0], _randn(3, 4, seed=6))  # inputs untouched


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_dare_drop_is_reproducible_and_unbiased() -> None:
    tau = _randn(40, 50, seed=8)
    first, again, other = (dare_drop(tau, 0.3, generator=_gen(s)) for s in (1, 1, 2))
    assert torch.equal(first, again) and not torch.equal(first, other)
    kept = first != 0
    assert torch.equal(first[kept], tau[kept] / 0.3)  # survivors rescaled by 1/density
    assert abs(kept.float().mean().item() - 0.3) < 0.03  # 2000 Bernoulli(0.3) draws: 3 sigma is 0.031
    # E[drop(tau)] = tau: the mean of 400 masks is within a few standard errors of tau everywhere.
    mean = sum(dare_drop(tau, 0.3, generator=_gen(100 + s)).double() for s in range(400)) / 400
    standard_error = tau.double().abs() * math.sqrt((1 - 0.3) / 0.3 / 400)
    assert ((mean - tau.double()).abs() <= 5 * standard_error + 1e-12).all()
    assert torch.equal(dare_drop(tau, 1.0, generator=_gen(3)), tau)


def test_dare_ties_uses_the_same_masks() -> None:
    taus = [_randn(6, 6, seed=s) for s in (9, 10)]
    weights = [1.0, 0.7]
    got = combine_task_vectors(taus, weights, operation="dare_ties", density=0.5, generators=[_gen(1), _gen(2)])
    # The reference draws the documented masks itself: uniform float32 per entry, kept below density.
    dropped = [torch.where(torch.rand(t.shape, generator=_gen(s)) < 0.5, t.double() / 0.5, 0.0) for t, s in zip(taus, (1, 2))]
    expected = _ties_reference(dropped, weights, 1.0, "total")
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_density_out_of_range(density: float) -> None:
    with pytest.raises(ValueError, match=r"density must lie in \(0, 1\]"):
        magnitude_trim(torch.ones(3), density)

"""Truncated SVD of weight deltas: randomized vs the exact optimum (float64 oracle), rank rules, caps."""

from __future__ import annotations

import math

import pytest
import torch

from adaptertool.adapters import svd
from adaptertool.adapters.svd import (
    RankPolicy,
    break_even_rank,
    choose_rank,
    exact_svd,
    factor_delta,
    noise_edge,
    noise_floor_energy,
    randomized_svd,
    rounding_noise_std,
)
from adaptertool.errors import AdapterToolError


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _flat_spectrum(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """Gaussian matrix with singular values decaying only 10x over the whole spectrum (a fine-tune's)."""
    g = _gen(seed)
    u = torch.linalg.qr(torch.randn(out_features, min(out_features, in_features), generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(in_features, min(out_features, in_features), generator=g, dtype=torch.float64)).Q
    s = torch.logspace(0, -1, min(out_features, in_features), dtype=torch.float64)
    return ((u * s) @ v.T).float()


def _optimal_error(delta: torch.Tensor, rank: int) -> float:
    """Oracle: Eckart-Young error of the best rank-r approximation, from a float64 full SVD."""
    s = torch.linalg.svdvals(delta.double())
    return math.sqrt(float(s[rank:].square().sum() / s.square().sum()))


def _planted(out_features: int, in_features: int, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(base bf16, tuned bf16, true delta fp32): a rank-``rank`` change of ~5 % of the weights' scale."""
    g = _gen(seed)
    base = (torch.randn(out_features, in_features, generator=g) * 0.02).bfloat16()
    true = torch.randn(out_features, rank, generator=g) @ torch.randn(rank, in_features, generator=g)
    true *= 0.001 / rank**0.5
    tuned = (base.float() + true).bfloat16()
    return base, tuned, true


SHAPES = {"square-64": (64, 64), "wide-48x130": (48, 130), "tall-131x40": (131, 40), "mlp-256x96": (256, 96)}


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("rank", [1, 4, 16])
def test_randomized_error_within_1pct_of_optimal(shape: tuple[int, int], rank: int) -> None:
    delta = _flat_spectrum(*shape)
    # randomized_svd itself: factor_delta takes the exact SVD for sketches as wide as most of these.
    u, s, vh = randomized_svd(delta, rank, generator=_gen(1))
    error = float((delta.double() - (u * s).double() @ vh.double()).norm() / delta.double().norm())
    optimal = _optimal_error(delta, rank)
    assert s.shape == (rank,)
    assert error <= optimal * 1.01
    assert error >= optimal * (1 - 1e-4)  # nothing beats Eckart-Young


@pytest.mark.parametrize("method", ["randomized", "exact"])
def test_reported_error_and_energy_equal_the_true_residual(method: str) -> None:
    delta = _flat_spectrum(80, 50)
    f = factor_delta(delta, RankPolicy(rank=8), method=method, generator=_gen(2))
    assert f.b.shape == (80, 8) and f.a.shape == (8, 50) and f.b.dtype == f.a.dtype == torch.float32
    residual = (delta.double() - f.b.double() @ f.a.double()).norm() / delta.double().norm()
    assert f.rel_error == pytest.approx(float(residual), rel=1e-4)
    assert f.retained == pytest.approx(1 - float(residual) ** 2, rel=1e-5)
    # PEFT's convention: A = Vh_r has orthonormal rows.
    torch.testing.assert_close(f.a @ f.a.T, torch.eye(8), atol=1e-5, rtol=0)


def test_exact_svd_is_the_optimum() -> None:
    delta = _flat_spectrum(40, 30)
    u, s, vh = exact_svd(delta, 5)
    error = ((delta.double() - (u * s).double() @ vh.double()).norm() / delta.double().norm()).item()
    assert error == pytest.approx(_optimal_error(delta, 5), rel=1e-5)


def test_randomized_is_seeded_and_deterministic() -> None:
    delta = _flat_spectrum(70, 90)
    one = randomized_svd(delta, 6, generator=_gen(7))
    two = randomized_svd(delta, 6, generator=_gen(7))
    for x, y in zip(one, two, strict=True):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="Generator"):
        factor_delta(delta, RankPolicy(rank=4))


def test_planted_rank8_recovered_at_noise_level_and_auto_picks_8() -> None:
    base, tuned, true = _planted(384, 1024, 8)
    delta = tuned.float() - base.float()
    noise = float((delta - true).norm() / true.norm())
    assert noise > 0.01  # bf16 rounding is visible
    fixed = factor_delta(delta, RankPolicy(rank=8), generator=_gen(3))
    error_vs_truth = float((fixed.b @ fixed.a - true).norm() / true.norm())
    # Projection on the signal subspace removes most of the isotropic noise: below the noise level.
    assert error_vs_truth <= noise
    assert fixed.rel_error == pytest.approx(noise, rel=0.2)  # what is left over is the noise
    auto = factor_delta(delta, RankPolicy(auto=True), generator=_gen(3), noise_std=rounding_noise_std(tuned))
    assert auto.rank == 8
    # An energy target over-picks: the noise carries energy too.
    energy = factor_delta(delta, RankPolicy(energy=0.9999), generator=_gen(3))
    assert energy.rank > 8


@pytest.mark.parametrize("method", ["randomized", "exact"])
def test_auto_rank_on_float32_storage_is_not_fooled_by_svd_precision(method: str) -> None:
    # float32 storage noise sits below a float32 SVD's own resolution: without a floor at that
    # resolution the rule kept every numerically-zero singular value (seen: rank 15 of a planted 4).
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(64, 96, generator=generator) * 0.02
    true = torch.randn(64, 4, generator=generator) @ torch.randn(4, 96, generator=generator) * 0.01
    tuned = base + true  # float32 storage
    delta = tuned - base
    auto = factor_delta(delta, RankPolicy(auto=True), method=method, generator=_gen(1), noise_std=rounding_noise_std(tuned))
    assert auto.rank == 4


def test_rounding_noise_std_matches_the_rounding() -> None:
    g = _gen(4)
    exact = torch.randn(300, 300, generator=g, dtype=torch.float64) * 0.02
    stored = exact.bfloat16()
    measured = float((stored.double() - exact).std())
    assert rounding_noise_std(stored) == pytest.approx(measured, rel=0.05)
    assert rounding_noise_std(exact.float()) < measured * 1e-4
    halves = exact.half()
    assert rounding_noise_std(halves) == pytest.approx(float((halves.double() - exact).std()), rel=0.05)
    # A stored zero was rounded from below the smallest normal number, not from +-2^-p.
    assert rounding_noise_std(torch.zeros(100, dtype=torch.bfloat16)) < 1e-38
    assert rounding_noise_std(torch.cat([stored.reshape(-1), torch.zeros(90_000, dtype=torch.bfloat16)])) == (
        pytest.approx(rounding_noise_std(stored) / 2**0.5, rel=1e-6))
    assert noise_edge(1.0, 100, 400) == pytest.approx(30.0)


def test_caps_break_even_and_max_rank() -> None:
    assert break_even_rank(64, 64) == 31  # 32 * 128 == 64 * 64: no saving at 32
    assert break_even_rank(10, 1000) == 9
    assert break_even_rank(1, 1) == 1
    # Bytes: float32 factors of a bf16 delta break even at half the rank; bf16 factors of a
    # float32 delta could go to full rank, and no further.
    assert break_even_rank(576, 576, factor_bytes=4, delta_bytes=2) == 143  # 144 * 1152 * 4 == 576 * 576 * 2
    assert break_even_rank(192, 576, factor_bytes=4, delta_bytes=2) == 71
    assert break_even_rank(64, 64, factor_bytes=2, delta_bytes=4) == 63
    assert break_even_rank(8, 1000, factor_bytes=1, delta_bytes=8) == 8
    delta = _flat_spectrum(16, 16)
    f = factor_delta(delta, RankPolicy(rank=12), generator=_gen(5))
    assert (f.rank, f.capped) == (7, True)
    g = factor_delta(delta, RankPolicy(energy=1.0, max_rank=3), method="exact")
    assert (g.rank, g.capped) == (3, True)
    h = factor_delta(delta, RankPolicy(rank=4, max_rank=2), generator=_gen(5))
    assert (h.rank, h.capped) == (2, True)


def test_size_cap_is_reported_and_wide_sketches_take_the_exact_svd(monkeypatch: pytest.MonkeyPatch) -> None:
    delta = _flat_spectrum(96, 160)
    calls: list[int] = []
    sketch = svd._randomized  # factor_delta's route to randomized_svd (which also keeps the oversampled values)
    monkeypatch.setattr(svd, "_randomized", lambda d, rank, **kw: calls.append(rank) or sketch(d, rank, **kw))
    f = factor_delta(delta, RankPolicy(rank=1000), generator=_gen(1), break_even=20)
    assert (f.rank, f.capped, f.size_capped) == (20, True, True)
    assert calls == []  # 20 + 16 columns span over 30 % of 96: the full SVD is cheaper, and optimal
    assert f.rel_error == pytest.approx(_optimal_error(delta, 20), rel=1e-4)
    g = factor_delta(delta, RankPolicy(rank=1000, max_rank=10), generator=_gen(1), break_even=20)
    assert (g.rank, g.capped, g.size_capped) == (10, True, False)  # --max-rank bound it, not the size
    factor_delta(delta, RankPolicy(rank=4), generator=_gen(1))
    assert calls == [10, 4]  # thinner sketches (26 and 20 columns) stay randomized


def test_noise_floor_is_the_rounding_noise_left_in_the_residual() -> None:
    base, tuned, true = _planted(384, 1024, 8)
    delta = tuned.float() - base.float()
    noise = rounding_noise_std(tuned)
    f = factor_delta(delta, RankPolicy(rank=8), generator=_gen(3), noise_std=noise)
    # The change is exactly rank 8: everything left over is rounding noise, and the estimate says so.
    assert f.noise_floor == pytest.approx(f.rel_error, rel=0.05)
    assert noise_floor_energy(noise, 384, 1024, 8) == pytest.approx(noise**2 * 376 * 1016)
    g = factor_delta(delta, RankPolicy(rank=2), generator=_gen(3), noise_std=noise)
    assert g.noise_floor < 0.3 * g.rel_error  # rank 2 leaves out signal, which dominates the residual
    assert factor_delta(delta, RankPolicy(rank=8), generator=_gen(3)).noise_floor == 0.0


def test_energy_rule_picks_the_smallest_rank_reaching_the_target() -> None:
    s = torch.tensor([3.0, 2.0, 1.0, 0.5])
    total = float(s.square().sum())  # 14.25
    policy = RankPolicy(energy=13.0 / 14.25)
    assert choose_rank(s, total, policy, cap=10) == (2, False)
    assert choose_rank(s, total, RankPolicy(energy=0.999), cap=3) == (3, True)
    assert choose_rank(s, total, RankPolicy(auto=True), cap=10, edge=1.5) == (2, False)
    # Everything under the noise edge still keeps one triplet: rank 0 is invalid in PEFT.
    assert choose_rank(s, total, RankPolicy(auto=True), cap=10, edge=10.0) == (1, False)


def test_zero_delta_is_refused() -> None:
    with pytest.raises(ValueError, match="all zero"):
        factor_delta(torch.zeros(4, 4), RankPolicy(rank=1), method="exact")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rank": 0}, "--rank must be a positive integer"),
    ({"rank": -3}, "--rank must be a positive integer"),
    ({"energy": 0.0}, r"--energy must lie in \(0, 1\]"),
    ({"energy": 1.5}, r"--energy must lie in \(0, 1\]"),
    ({"max_rank": 0}, "--max-rank must be a positive integer"),
    ({"energy": 0.9, "auto": True}, "choose one"),
], ids=["rank0", "rank-neg", "energy0", "energy>1", "max_rank0", "energy+auto"])
def test_policy_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(AdapterToolError, match=message):
        RankPolicy(**kwargs)

"""Initial LoRA factors against float64 oracles: SVD (PiSSA), column-space projection (OLoRA), the
uniform/normal laws PEFT draws from, and PEFT's own layers on the same weight."""

from __future__ import annotations

import math

import pytest
import torch

from adaptertool.adapters.init import (
    default_factors,
    dora_magnitude,
    embedding_factors,
    gaussian_factors,
    olora_factors,
    pissa_factors,
)
from adaptertool.errors import AdapterToolError

SHAPES = {"square": (48, 48), "wide": (24, 80), "tall": (96, 40)}


def _weight(shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(shape[0] * 1000 + shape[1])) * 0.02).to(dtype)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("rank", [1, 7], ids=["r1", "r7"])
@pytest.mark.parametrize("scaling", [1.0, 2.5], ids=["s1", "s2.5"])
def test_pissa_is_the_top_r_svd_split_evenly(shape: tuple[int, int], rank: int, scaling: float) -> None:
    w = _weight(shape)
    before = w.clone()
    f = pissa_factors(w, rank, scaling)
    assert torch.equal(w, before)  # input untouched
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]
    torch.testing.assert_close((scaling * f.b.double()) @ f.a.double(), best, atol=1e-6, rtol=0)
    assert f.residual is not None
    torch.testing.assert_close(f.residual.double(), w.double() - best, atol=1e-6, rtol=0)
    # Each factor carries sqrt(S / scaling): A A^T = B^T B = diag(S_r) / scaling.
    gram = torch.diag(s[:rank] / scaling)
    torch.testing.assert_close(f.a.double() @ f.a.double().T, gram, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(f.b.double().T @ f.b.double(), gram, atol=1e-6, rtol=1e-4)


def test_fast_pissa_matches_exact_on_a_decaying_spectrum() -> None:
    g = torch.Generator().manual_seed(3)
    u = torch.linalg.qr(torch.randn(64, 64, generator=g)).Q
    v = torch.linalg.qr(torch.randn(96, 64, generator=g)).Q
    w = (u * torch.logspace(0, -3, 64)) @ v.T  # singular values 1 ... 1e-3
    exact = pissa_factors(w, 8, 2.0)
    fast = pissa_factors(w, 8, 2.0, niter=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fast.b @ fast.a, exact.b @ exact.a, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="Generator"):
        pissa_factors(w, 8, 2.0, niter=4)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_olora_is_qr_projection_onto_the_first_columns(shape: tuple[int, int]) -> None:
    w = _weight(shape, torch.bfloat16)
    rank, scaling = 5, 0.5
    f = olora_factors(w, rank, scaling)
    # B: orthonormal columns spanning W's first r columns; A = B^T W (upper triangular in its first r columns).
    torch.testing.assert_close(f.b.double().T @ f.b.double(), torch.eye(rank, dtype=torch.float64), atol=1e-6, rtol=0)
    basis = torch.linalg.qr(w.double()[:, :rank]).Q
    projector = basis @ basis.T
    torch.testing.assert_close(f.b.double() @ f.a.double(), projector @ w.double(), atol=1e-6, rtol=0)
    assert torch.equal(f.a[:, :rank], torch.triu(f.a[:, :rank]))
    assert f.residual is not None
    torch.testing.assert_close(f.residual.double(), w.double() - scaling * projector @ w.double(), atol=1e-6, rtol=0)


def test_default_and_gaussian_laws() -> None:
    out_features, in_features, rank = 64, 400, 50
    g = torch.Generator().manual_seed(0)
    d = default_factors(out_features, in_features, rank, generator=g)
    bound = 1 / math.sqrt(in_features)  # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in))
    assert d.a.shape == (rank, in_features) and d.a.abs().max() <= bound and d.a.abs().max() > 0.99 * bound
    assert float(d.a.std()) == pytest.approx(bound / math.sqrt(3), rel=0.03)
    assert not d.b.any() and d.b.shape == (out_features, rank) and d.residual is None
    n = gaussian_factors(out_features, in_features, rank, generator=g)
    assert float(n.a.std()) == pytest.approx(1 / rank, rel=0.03) and not n.b.any()
    e = embedding_factors(100, 32, 4, generator=g)
    assert e.a.shape == (4, 100) and not e.a.any() and e.b.shape == (32, 4)
    assert float(e.b.std()) == pytest.approx(1.0, rel=0.15)


@pytest.mark.parametrize("init", [True, "gaussian"], ids=["default", "gaussian"])
def test_same_law_as_peft_linear(init: bool | str) -> None:
    """PEFT's Linear LoRA drawn with the global RNG: same support, same spread, B = 0 as ours."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=32, lora_alpha=32, init_lora_weights=init)
    torch.manual_seed(0)
    layer = peft.tuners.lora.Linear(torch.nn.Linear(300, 64, bias=False), "default", r=32, lora_alpha=32, config=config)
    theirs = layer.lora_A["default"].weight.detach()
    make = default_factors if init is True else gaussian_factors
    ours = make(64, 300, 32, generator=torch.Generator().manual_seed(1))
    assert ours.a.shape == theirs.shape and not layer.lora_B["default"].weight.any() and not ours.b.any()
    assert float(ours.a.std()) == pytest.approx(float(theirs.std()), rel=0.05)
    assert float(ours.a.abs().max()) == pytest.approx(float(theirs.abs().max()), rel=0.25)


def test_dora_magnitude_norms() -> None:
    w = _weight((12, 20), torch.bfloat16)
    delta = torch.randn(12, 20) * 0.01
    torch.testing.assert_close(dora_magnitude(w, delta, dim=1).double(),
                               (w.double() + delta.double()).norm(dim=1), atol=1e-6, rtol=1e-6)
    assert dora_magnitude(w, delta, dim=0).shape == (20,)


def test_rank_above_the_smaller_side_is_refused() -> None:
    with pytest.raises(AdapterToolError, match=r"rank 25 must lie in \[1, 24\]"):
        pissa_factors(_weight((24, 80)), 25, 1.0)
    with pytest.raises(AdapterToolError, match=r"rank 0 must lie"):
        olora_factors(_weight((24, 80)), 0, 1.0)

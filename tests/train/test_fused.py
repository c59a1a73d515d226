"""The hand-written forward/backward pairs against plain autograd on the same formulas."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from adaptertool.training.fused import head_cross_entropy, rms_norm, rope, swiglu


def _plain_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    wide = x.float()
    return weight * (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _plain_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _grads(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], grad: torch.Tensor, *rest: object) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves, *rest)
    out.backward(grad)
    return [out.detach(), *(leaf.grad for leaf in leaves)]


def _assert_close(ours: list[torch.Tensor], plain: list[torch.Tensor], tol: float) -> None:
    for a, b in zip(ours, plain, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_rms_norm_matches_autograd() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 48, generator=g) * 3
    weight = torch.rand(48, generator=g) + 0.5
    grad = torch.randn(3, 5, 48, generator=g)
    ours = _grads(lambda t: rms_norm(t, weight, 1e-6), [x], grad)
    _assert_close(ours, _grads(lambda t: _plain_rms_norm(t, weight, 1e-6), [x], grad), 2e-6)


def test_rms_norm_keeps_a_bfloat16_input_in_bfloat16() -> None:
    x = torch.randn(4, 32).to(torch.bfloat16).requires_grad_()
    weight = torch.ones(32, dtype=torch.bfloat16)
    out = rms_norm(x, weight, 1e-5)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and x.grad is not None and x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out, _plain_rms_norm(x.detach(), weight, 1e-5))


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_rope_matches_autograd_on_a_strided_input(dtype: torch.dtype, tol: float) -> None:
    g = torch.Generator().manual_seed(1)
    B, H, T, D = 2, 3, 7, 16
    x = torch.randn(B, T, H, D, generator=g, dtype=dtype).transpose(1, 2)  # as the projections lay q out
    angles = torch.randn(B, 1, T, D // 2, generator=g, dtype=dtype)
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    grad = torch.randn(B, H, T, D, generator=g, dtype=dtype)
    _assert_close(_grads(lambda t: rope(t, cos, sin), [x], grad), _grads(lambda t: _plain_rope(t, cos, sin), [x], grad), tol)


def test_swiglu_matches_autograd_and_leaves_the_incoming_gradient_alone() -> None:
    g = torch.Generator().manual_seed(2)
    gate, up = torch.randn(2, 5, 24, generator=g, dtype=torch.float64), torch.randn(2, 5, 24, generator=g, dtype=torch.float64)
    grad = torch.randn(2, 5, 24, generator=g, dtype=torch.float64)
    before = grad.clone()
    ours = _grads(swiglu, [gate, up], grad)
    _assert_close(ours, _grads(lambda a, b: F.silu(a) * b, [gate, up], grad), 1e-12)
    assert torch.equal(grad, before)


@pytest.mark.parametrize("chunk", [3, 64])
def test_head_cross_entropy_matches_autograd(chunk: int) -> None:
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(10, 8, generator=g)
    weight = torch.randn(30, 8, generator=g)
    targets = torch.randint(0, 30, (10,), generator=g)
    half = torch.tensor(0.5)  # the incoming gradient scales the saved one
    ours = _grads(lambda h: head_cross_entropy(h, weight, targets, chunk), [hidden], half)
    plain = _grads(lambda h: F.cross_entropy(h @ weight.T, targets, reduction="sum"), [hidden], half)
    _assert_close(ours, plain, 1e-5)

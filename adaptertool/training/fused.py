"""Hand-written forward/backward pairs for the decoder's non-matmul pieces: RMSNorm, RoPE, SwiGLU
(and Gemma's GeGLU) and the output layer's cross-entropy (optionally soft-capped, as Gemma 2's).

Plain autograd keeps every intermediate of these small formulas and writes each step of the
backward into a fresh tensor the size of the activations. Away from matmuls a CPU step is bound
by memory traffic, and a fresh MB-sized tensor costs ~3x a pass over one still in cache (its
lines come from DRAM before they are written), so these keep the inputs only and work in place
where nothing else holds the tensor. Same maths as the plain formulas; ``tests/train`` checks the
gradients against autograd's. Every weight here is frozen: none gets a gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx, once_differentiable

__all__ = ["geglu", "head_cross_entropy", "rms_norm", "rope", "swiglu"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, offset: bool = False) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dim, normalised in float32 and cast back
    before the scale, as transformers does. 2.2 ms instead of autograd's 5.9 for SmolLM2's
    (4, 256, 576) forward and backward (measured).

    ``offset``: Gemma's form, ``(1 + weight) * x / sqrt(...)``, all of it in float32 and cast once
    (transformers' Gemma RMSNorm; its weights are stored as offsets from 1)."""
    if offset:
        return _RMSNorm.apply(x, 1.0 + weight.float(), eps, True)
    return _RMSNorm.apply(x, weight, eps, False)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the half-split layout: ``x cos + rotate_half(x) sin``, with
    ``rotate_half(x1, x2) = (-x2, x1)``; x (B, H, T, D), cos and sin broadcast to it."""
    return _Rope.apply(x, cos, sin)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``; the backward takes over gate and up (see :class:`_SwiGLU`)."""
    return _SwiGLU.apply(gate, up)


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(gate) * up`` (Gemma's MLP, transformers' ``gelu_pytorch_tanh``), with
    ``gelu_tanh(g) = g/2 (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))``; as :func:`swiglu`, the backward takes over gate and up."""
    return _GeGLU.apply(gate, up)


def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, *,
                       softcap: float | None = None) -> torch.Tensor:
    """Summed cross-entropy of ``hidden W^T`` against ``targets``, ``chunk`` rows of logits at a time
    (see :class:`_HeadCrossEntropy`); hidden (N, C), W (V, C), targets (N,). ``softcap``: the logits
    are ``softcap * tanh(hidden W^T / softcap)`` (Gemma 2's final_logit_softcapping)."""
    return _HeadCrossEntropy.apply(hidden, weight, targets, chunk, softcap)


class _RMSNorm(torch.autograd.Function):
    """y = w * x s with s = (mean(x^2) + eps)^-1/2 per row; keeps x and s, (.., 1). ``wide_weight``: w is
    float32 and multiplies before the cast to x's dtype (Gemma), else after it.

    dy/dx: ``s (g - x s^2 mean(g x))`` with g = w * grad, in two fresh tensors (autograd: ~6).
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, weight: torch.Tensor, eps: float, wide_weight: bool) -> torch.Tensor:
        wide = x.float()
        scale = torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, scale)  # type: ignore[attr-defined]
        ctx.wide_weight = wide_weight  # type: ignore[attr-defined]
        if wide_weight:
            return (wide * scale).mul_(weight).to(x.dtype)
        return weight * (wide * scale).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        x, weight, scale = ctx.saved_tensors  # type: ignore[attr-defined]
        g = grad.float() * weight if ctx.wide_weight else (grad * weight).float()  # type: ignore[attr-defined]
        wide = x.float()
        coef = (g * wide).mean(-1, keepdim=True).mul_(scale.square())
        return g.addcmul_(wide, coef, value=-1).mul_(scale).to(x.dtype), None, None, None


class _Rope(torch.autograd.Function):
    """out = (x1 c1 - x2 s1, x2 c2 + x1 s2) for the halves (x1, x2) of the last dim; keeps cos and sin.

    Two fused multiply-adds into ``x * cos`` instead of a negated copy, a concatenation and three
    more products (autograd); the backward is the transposed rotation, built the same way.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)  # type: ignore[attr-defined]
        half = x.shape[-1] // 2
        out = x * cos
        out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
        out[..., half:].addcmul_(x[..., :half], sin[..., half:])
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors  # type: ignore[attr-defined]
        half = grad.shape[-1] // 2
        dx = grad * cos  # dx1 = g1 c1 + g2 s2, dx2 = g2 c2 - g1 s1
        dx[..., :half].addcmul_(grad[..., half:], sin[..., half:])
        dx[..., half:].addcmul_(grad[..., :half], sin[..., :half], value=-1)
        return dx, None, None


class _SwiGLU(torch.autograd.Function):
    """Keeps gate and up for the backward but not silu(gate), a third (.., I) tensor.

    The backward recomputes silu(gate) and uses torch's fused ``silu_backward`` (one pass for
    ``d/dg silu(g) = s (1 + g (1 - s))``, s = sigmoid(g)), and works in the saved gate and up
    themselves, which nothing else holds (the projections that made them keep their inputs, not
    their outputs): four passes over (.., I) and no fresh tensors.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)  # type: ignore[attr-defined]
        return F.silu(gate).mul_(up)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors  # type: ignore[attr-defined]
        grad_gate = torch.ops.aten.silu_backward.grad_input(up.mul_(grad), gate, grad_input=up)
        return grad_gate, F.silu(gate, inplace=True).mul_(grad)  # the second: grad * silu(gate)


class _GeGLU(torch.autograd.Function):
    """:class:`_SwiGLU` with the tanh-approximated GELU: keeps gate and up, and the backward works
    in them with torch's fused ``gelu_backward`` (no fresh (.., I) tensors)."""

    @staticmethod
    def forward(ctx: FunctionCtx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)  # type: ignore[attr-defined]
        return F.gelu(gate, approximate="tanh").mul_(up)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors  # type: ignore[attr-defined]
        grad_gate = torch.ops.aten.gelu_backward.grad_input(up.mul_(grad), gate, approximate="tanh", grad_input=up)
        return grad_gate, torch.ops.aten.gelu_(gate, approximate="tanh").mul_(grad)  # the second: grad * gelu(gate)


class _HeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``h W^T`` (h: (N, C) hidden states, W: (V, C) frozen output embedding).

    With W frozen, the gradient w.r.t. h is ``(softmax(h W^T) - onehot(target)) W``: computed chunk
    by chunk in the forward, it leaves an (N, C) tensor behind instead of (N, V) logits, their
    log-softmax and its gradient (for SmolLM2 at 4 x 256 tokens: 2 MB instead of ~600 MB). Every
    chunk's logits go through one reused buffer, worked on in place: a fresh (n, V) tensor per
    chunk would be mapped and faulted in anew each time (tens of MB, above malloc's mmap threshold).

    Soft-capped logits ``c tanh(z / c)`` (z = h W^T) have the slope ``1 - tanh(z / c)^2``, which
    multiplies ``softmax - onehot`` before the product with W; it takes a second (n, V) buffer.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, hidden: torch.Tensor, weight: torch.Tensor,
                targets: torch.Tensor, chunk: int, softcap: float | None) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None  # type: ignore[attr-defined]
        n_rows = min(chunk, hidden.shape[0])
        buffer = torch.empty(n_rows, weight.shape[0], dtype=hidden.dtype, device=hidden.device)
        slopes = None if softcap is None else torch.empty(n_rows, weight.shape[0], device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = torch.matmul(hidden[rows], weight.T, out=buffer[: hidden[rows].shape[0]])  # (n, V)
            wide = logits.float()  # the buffer itself for float32 models
            if slopes is not None:
                squashed = wide.div_(softcap).tanh_()
                slope = torch.mul(squashed, squashed, out=slopes[: wide.shape[0]]).neg_().add_(1)  # 1 - tanh^2
                wide = squashed.mul_(softcap)
            picked = targets[rows].unsqueeze(1)
            top = wide.amax(dim=-1, keepdim=True)  # (n, 1)
            chosen = wide.gather(1, picked)
            exps = wide.sub_(top).exp_()  # in place: exp(logit - max)
            sums = exps.sum(dim=-1, keepdim=True)
            total += (sums.log() + top - chosen).sum()  # logsumexp - chosen logit
            if grad is not None:
                probs = exps.div_(sums).scatter_add_(1, picked, torch.full_like(sums, -1.0))  # softmax - onehot
                if slopes is not None:
                    probs.mul_(slope)  # through the cap
                grad[rows] = probs.to(hidden.dtype) @ weight.to(hidden.dtype)  # (n, V) @ (V, C)
        ctx.save_for_backward(grad)  # type: ignore[attr-defined]
        return total

    @staticmethod
    def backward(ctx: FunctionCtx, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return (None if grad is None else grad * grad_total), None, None, None, None

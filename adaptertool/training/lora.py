"""LoRA layers for training: LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685), rsLoRA
(Kalajdzievski 2023, https://arxiv.org/abs/2312.03732), DoRA (Liu et al. 2024,
https://arxiv.org/abs/2402.09353) and QLoRA's frozen 4-bit base (Dettmers et al. 2023,
https://arxiv.org/abs/2305.14314).

A targeted Linear ``y = x W^T + b`` becomes

    y = x W^T + b + scaling * dropout(x) A^T B^T        A: (r, in), B: (out, r)

with ``scaling = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``); only A and B train. DoRA rescales each
output row of ``W + scaling * B A`` to a trained magnitude ``m`` (one value per output), treating
the row norms as constants (the paper's section 4.3; PEFT detaches them too). Initialisation is
PEFT's: A ~ kaiming_uniform(a=sqrt(5)), B = 0, so training starts from the base model exactly.

The frozen weight is either a plain tensor or quantised codes with their scales: for QLoRA,
bitsandbytes 4-bit codes with their absmax (:class:`~adaptertool.training.fourbit.FourBitWeight`), or
an FP8 base's codes (:class:`~adaptertool.training.fp8weight.Fp8Weight`), expanded on the fly in the
forward and again in the backward, so only the packed data stays resident.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adaptertool.adapters.lora import lora_scaling
from adaptertool.errors import OptionError
from adaptertool.training.fourbit import FourBitWeight
from adaptertool.training.fp8weight import Fp8Weight

__all__ = ["ALL_LINEAR", "EXPERT_FORMS", "FrozenLinear", "LoRALinear", "LoraSpec", "add_lora", "check_targets", "dropout_mask",
           "grouped_linear", "grouped_lora_linear", "lora_linear", "lora_modules"]

ALL_LINEAR = "all-linear"
EXPERT_FORMS = ("per-expert", "fused")  # how MoE expert LoRAs are trained and saved (see train/moe.py)
PackedWeight = FourBitWeight | Fp8Weight  # a frozen weight kept as codes: shape, device, dequantize(dtype)


@dataclass(frozen=True, kw_only=True)
class LoraSpec:
    """What to train: rank, scaling and which Linear modules.

    ``targets`` follows PEFT's list form of ``target_modules``: an entry matches a module whose
    name equals it or ends with ``"." + entry`` ("q_proj", "self_attn.q_proj"); ``"all-linear"``
    matches every Linear inside the transformer blocks (never the output embedding), as in PEFT.
    """

    rank: int = 16
    alpha: float = 16.0  # = the default rank, so scaling 1, as train defaults alpha to the rank
    dropout: float = 0.05
    targets: tuple[str, ...] = (ALL_LINEAR,)
    rslora: bool = False
    dora: bool = False
    experts: str = "per-expert"  # MoE expert LoRAs: per expert Linear, or "fused" (PEFT target_parameters)

    def __post_init__(self) -> None:
        if self.experts not in EXPERT_FORMS:
            raise OptionError(f"--experts must be one of {', '.join(EXPERT_FORMS)}, not {self.experts!r}")
        if self.rank < 1:
            raise OptionError(f"LoRA rank must be at least 1, not {self.rank}")
        if not self.alpha > 0:
            raise OptionError(f"LoRA alpha must be positive, not {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise OptionError(f"LoRA dropout must be in [0, 1), not {self.dropout}")
        if not self.targets or any(not t for t in self.targets):
            raise OptionError("LoRA targets must name at least one module (or 'all-linear')")

    @property
    def scaling(self) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return lora_scaling(self.alpha, self.rank, rslora=self.rslora)

    def matches(self, module: str) -> bool:
        """Whether Linear ``module`` (a block Linear's full name) is a target."""
        return any(t == ALL_LINEAR or module == t or module.endswith("." + t) for t in self.targets)


class _PackedMatmul(torch.autograd.Function):
    """``x W^T`` with W expanded from its codes (4-bit or FP8) in the forward and again in the backward.

    Saving the dense W for the backward (as ``F.linear`` would) keeps every layer's full weight
    alive until the backward reaches it, which is the memory QLoRA exists to save.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
        ctx.weight = weight  # type: ignore[attr-defined]
        ctx.x_dtype = x.dtype  # type: ignore[attr-defined]
        return F.linear(x, weight.dequantize(x.dtype))

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            return None, None
        dense = ctx.weight.dequantize(grad.dtype)  # type: ignore[attr-defined]
        return (grad @ dense).to(ctx.x_dtype), None  # type: ignore[attr-defined]  # (.., out) @ (out, in)


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Bool mask shaped like ``x``, True (kept) with probability ``1 - p`` (rounded to a multiple of 2**-16).

    torch's own Bernoulli draws cost ~8 ns an element on the CPU, a sixth of a LoRA training step
    at dropout 0.05. Instead one 31-bit seed is drawn from the default generator of ``x``'s device
    (so seeding, checkpoint replay and resume behave as with torch's draws) and the counters
    ``seed, seed + 1, ...`` are hashed (Wellons' lowbias32: two multiply-xorshift rounds, full
    avalanche) with vectorised int32 ops; each hash gives two 16-bit uniform draws.
    """
    seed = int(torch.randint(0, 1 << 31, (1,), device=x.device))
    count = x.numel()
    bits = torch.arange(seed, seed + (count + 1) // 2, dtype=torch.int32, device=x.device)  # wraps past 2**31
    shifted = torch.empty_like(bits)
    for shift, multiplier in _LOWBIAS32:
        torch.bitwise_right_shift(bits, shift, out=shifted)
        shifted &= (1 << (32 - shift)) - 1  # a logical shift: int32's >> copies the sign bit
        bits ^= shifted
        if multiplier:
            bits *= multiplier  # int32 products wrap modulo 2**32, as the hash wants
    threshold = round(p * 65536) - 32768  # an int16 draw is uniform on [-32768, 32767]
    return (bits.view(torch.int16)[:count] >= threshold).view(x.shape)


# (xorshift, multiplier as int32) rounds of lowbias32 (https://nullprogram.com/blog/2018/07/31/)
_LOWBIAS32 = ((16, 0x7FEB352D), (15, 0x846CA68B - (1 << 32)), (16, 0))


class _LoraLinear(torch.autograd.Function):
    """``base(x) + scaling * dropout(x) A^T B^T`` as one autograd node; x (.., in), A (r, in), B (out, r).

    nn.Dropout would keep for the backward a float mask and the dropped-out copy of x, both
    (.., in), in every LoRA layer. This keeps x itself, which q/k/v (and gate/up) share, a
    one-byte mask, and the (.., r) product; A's gradient re-applies the mask. The scalars
    (scaling, dropout's 1 / (1 - p)) multiply (.., r) products only. The update accumulates into
    the base output inside its matmul, and the input gradient of the base into the LoRA one:
    no (.., out) or (.., in) temporaries and no extra passes over them, forward or backward (with
    separate nodes, autograd would add two fresh (.., in) gradients). Same maths, same RNG draws
    under gradient checkpointing (which replays the generator state). A 4-bit or FP8 base is expanded
    in the forward and again in the backward, as in :class:`_PackedMatmul`.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, base: FrozenLinear,
                lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, p: float) -> torch.Tensor:
        dense = base.dense_weight(base.compute_dtype)
        result = F.linear(x.to(base.compute_dtype), dense, base.bias)
        xa = x.to(lora_a.dtype)  # the adapter's dtype (float32)
        keep = dropout_mask(xa, p) if p > 0 else None
        factor = scaling / (1.0 - p)
        hidden = F.linear(_drop(xa, keep), lora_a).mul_(factor)  # (.., r)
        result.view(-1, result.shape[-1]).addmm_(hidden.flatten(0, -2).to(result.dtype), lora_b.T.to(result.dtype))
        ctx.save_for_backward(xa, keep, lora_a, lora_b, hidden, None if base.quantized is not None else dense)  # type: ignore[attr-defined]
        ctx.base, ctx.factor, ctx.x_dtype = base, factor, x.dtype  # type: ignore[attr-defined]
        return result

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xa, keep, lora_a, lora_b, hidden, dense = ctx.saved_tensors  # type: ignore[attr-defined]
        flat = grad.flatten(0, -2)  # (N, out)
        # the backward runs outside autocast: the adapter's gradients in its dtype (float32)
        wide = flat.to(lora_b.dtype)
        # (r, N) @ (N, out), transposed: MKL runs it ~2x faster than (out, N) @ (N, r) on these shapes
        grad_b = (hidden.to(lora_b.dtype).flatten(0, -2).T @ wide).T
        grad_hidden = (wide @ lora_b).mul_(ctx.factor)  # type: ignore[attr-defined]  # the gradient of dropout(x) A^T
        kept = None if keep is None else _as_float(keep, xa.dtype).flatten(0, -2)  # converted once for both uses
        dropped = xa.flatten(0, -2) if kept is None else xa.flatten(0, -2) * kept
        grad_a = grad_hidden.T @ dropped  # (r, N) @ (N, in)
        grad_x = None
        if ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            if dense is None:
                dense = ctx.base.dense_weight(flat.dtype)  # type: ignore[attr-defined]
            if kept is None:
                grad_x = grad_hidden @ lora_a  # (N, in)
            else:  # into the dropped-out copy of x: done with, and still in cache (a fresh buffer is slower)
                grad_x = torch.mm(grad_hidden, lora_a, out=dropped).mul_(kept)
            # + grad W, accumulated in the same buffer (no casts in float32)
            grad_x = grad_x.to(dense.dtype).addmm_(flat.to(dense.dtype), dense).view(xa.shape).to(ctx.x_dtype)  # type: ignore[attr-defined]
        return grad_x, None, grad_a, grad_b, None, None


def lora_linear(x: torch.Tensor, base: FrozenLinear, lora_a: torch.Tensor, lora_b: torch.Tensor, *, scaling: float,
                dropout: float = 0.0) -> torch.Tensor:
    """``base(x) + scaling * dropout(x) A^T B^T`` as one autograd node (:class:`_LoraLinear`); A (r, in), B (out, r)."""
    return _LoraLinear.apply(x, base, lora_a, lora_b, scaling, dropout)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """``x_e W_e^T`` for consecutive row groups ``x_e`` of x (``sizes``), W (E, out, in) frozen: MoE experts
    without LoRA, one (.., out) output (:class:`_GroupedLinear`)."""
    return _GroupedLinear.apply(x, weight, sizes)


def grouped_lora_linear(x: torch.Tensor, layers: list[LoRALinear], sizes: list[int]) -> torch.Tensor:
    """``layers[e](x_e)`` for consecutive row groups ``x_e`` of x (``sizes``): MoE experts' LoRA Linears
    (16/32-bit bases in the adapter's dtype, no bias, no DoRA, one scaling and dropout) as one
    autograd node (:class:`_GroupedLoraLinear`) instead of one each."""
    first = layers[0]
    weights = [layer.base.weight for layer in layers]
    return _GroupedLoraLinear.apply(x, weights, sizes, first.scaling, first.active_dropout,
                                    *[layer.lora_A for layer in layers], *[layer.lora_B for layer in layers])


class _GroupedLoraLinear(torch.autograd.Function):
    """:class:`_LoraLinear` for a row group per expert, all in one (.., out) output: 48 autograd nodes a
    layer of 16 experts become 3, and one dropout mask covers every routed row (the same law: each
    element kept with probability 1 - p). Arguments after ``p``: the experts' A, then their B."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weights: list[torch.Tensor], sizes: list[int],
                scaling: float, p: float, *factors: torch.Tensor) -> torch.Tensor:
        lora_a, lora_b = factors[: len(sizes)], factors[len(sizes):]
        keep = dropout_mask(x, p) if p > 0 else None
        dropped = _drop(x, keep)
        out = x.new_empty(x.shape[0], weights[0].shape[0])
        hidden = x.new_empty(x.shape[0], lora_a[0].shape[0])  # (.., r)
        groups = list(_bounds(sizes))
        for e, (start, stop) in enumerate(groups):
            torch.mm(x[start:stop], weights[e].T, out=out[start:stop])
            torch.mm(dropped[start:stop], lora_a[e].T, out=hidden[start:stop])
        factor = scaling / (1.0 - p)
        hidden.mul_(factor)
        for e, (start, stop) in enumerate(groups):
            out[start:stop].addmm_(hidden[start:stop], lora_b[e].T)
        ctx.save_for_backward(x, keep, hidden, *factors)  # type: ignore[attr-defined]
        ctx.weights, ctx.groups, ctx.factor = weights, groups, factor  # type: ignore[attr-defined]
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, keep, hidden, *factors = ctx.saved_tensors  # type: ignore[attr-defined]
        groups, weights = ctx.groups, ctx.weights  # type: ignore[attr-defined]
        lora_a, lora_b = factors[: len(groups)], factors[len(groups):]
        grad_hidden = grad.new_empty(hidden.shape)
        grads_b = []
        for e, (start, stop) in enumerate(groups):  # as _LoraLinear's, group by group
            grads_b.append((hidden[start:stop].T @ grad[start:stop]).T)
            torch.mm(grad[start:stop], lora_b[e], out=grad_hidden[start:stop])
        grad_hidden.mul_(ctx.factor)  # type: ignore[attr-defined]
        kept = None if keep is None else _as_float(keep, x.dtype)
        dropped = x if kept is None else x * kept
        grads_a = [grad_hidden[start:stop].T @ dropped[start:stop] for start, stop in groups]
        grad_x = None
        if ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            grad_x = torch.empty_like(x) if kept is None else dropped  # done with: written over
            for e, (start, stop) in enumerate(groups):
                torch.mm(grad_hidden[start:stop], lora_a[e], out=grad_x[start:stop])
            if kept is not None:
                grad_x.mul_(kept)
            for e, (start, stop) in enumerate(groups):
                grad_x[start:stop].addmm_(grad[start:stop], weights[e])
        return (grad_x, None, None, None, None, *grads_a, *grads_b)


class _GroupedLinear(torch.autograd.Function):
    """``x_e W_e^T`` for consecutive row groups ``x_e`` of x (sizes), W (E, out, in) frozen: one (.., out)
    output (and, backward, one (.., in) input gradient) whose slices the experts' products fill."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: torch.Tensor,
                sizes: list[int]) -> torch.Tensor:
        ctx.save_for_backward(weight)  # type: ignore[attr-defined]
        ctx.sizes = sizes  # type: ignore[attr-defined]
        x = x.to(weight.dtype)  # autocast may have widened it; out= takes no autocast
        out = x.new_empty(x.shape[0], weight.shape[1])
        for e, (start, stop) in enumerate(_bounds(sizes)):
            torch.mm(x[start:stop], weight[e].T, out=out[start:stop])
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (weight,) = ctx.saved_tensors  # type: ignore[attr-defined]
        grad = grad.to(weight.dtype)
        grad_x = grad.new_empty(grad.shape[0], weight.shape[2])
        for e, (start, stop) in enumerate(_bounds(ctx.sizes)):  # type: ignore[attr-defined]
            torch.mm(grad[start:stop], weight[e], out=grad_x[start:stop])
        return grad_x, None, None


def _bounds(sizes: list[int]) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive row groups of ``sizes`` rows."""
    start = 0
    for size in sizes:
        yield start, start + size
        start += size


def _drop(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """x with the dropped elements zeroed (not yet rescaled), ``keep`` a bool mask: one fresh tensor."""
    return x if keep is None else _as_float(keep, x.dtype).mul_(x)


def _as_float(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # through uint8: torch's bool -> float multiply and cast take slow, unvectorised paths
    return keep.view(torch.uint8).to(dtype)


class FrozenLinear(nn.Module):
    """``y = x W^T + b`` with a frozen W: a plain tensor, or a :data:`PackedWeight` expanded to ``compute_dtype``."""

    def __init__(self, weight: torch.Tensor | PackedWeight, bias: torch.Tensor | None = None, *,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        self.quantized = weight if isinstance(weight, PackedWeight) else None
        self.weight = None if isinstance(weight, PackedWeight) else _frozen(weight)
        self.bias = None if bias is None else _frozen(bias)

    @property
    def device(self) -> torch.device:
        return self.quantized.device if self.quantized is not None else self.weight.device  # type: ignore[union-attr]

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W as a dense ``(out, in)`` tensor of ``dtype`` (a fresh one for a packed weight)."""
        if self.quantized is not None:
            return self.quantized.dequantize(dtype)
        assert self.weight is not None
        return self.weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is None:
            return F.linear(x, self.weight, self.bias)
        y = _PackedMatmul.apply(x.to(self.compute_dtype), self.quantized)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update (module docstring has the formulas).

    The adapter tensors are float32 whatever the base's dtype (PEFT keeps them so too): the input
    is cast to them and the update cast back to the base output's dtype.
    """

    def __init__(self, base: FrozenLinear, spec: LoraSpec, *, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        self.rank = spec.rank
        self.scaling = spec.scaling
        device = base.device
        lora_a = torch.empty(spec.rank, base.in_features)
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5), generator=generator)  # on the CPU: same values on any device
        self.lora_A = nn.Parameter(lora_a.to(device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, spec.rank, device=device))  # (out, r)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.lora_magnitude_vector: nn.Parameter | None = None
        if spec.dora:  # m starts at ||W + scaling * B A|| = ||W|| per output row (B = 0)
            self.lora_magnitude_vector = nn.Parameter(self._weight_norm(base.dense_weight(torch.float32)))

    def _weight_norm(self, dense: torch.Tensor) -> torch.Tensor:
        """``||W + scaling * B A||`` over the inputs, one per output row; no gradient (DoRA, section 4.3)."""
        with torch.no_grad():
            delta = self.lora_B @ self.lora_A  # (out, r) @ (r, in)
            return torch.linalg.norm(dense + self.scaling * delta, dim=1)

    @property
    def active_dropout(self) -> float:
        """Dropout's p now: 0 in eval mode."""
        return self.dropout.p if isinstance(self.dropout, nn.Dropout) and self.training else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora_magnitude_vector is None:
            return lora_linear(x, self.base, self.lora_A, self.lora_B, scaling=self.scaling, dropout=self.active_dropout)
        return self._dora(x.to(self.lora_A.dtype), self.base(x))

    def _dora(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        # y = (m / ||W + sBA||) * (x W^T + s x A^T B^T) + b, the norm a constant. As PEFT, the
        # base output is reused unless dropout is active, when it is recomputed on dropout(x).
        assert self.lora_magnitude_vector is not None
        dense = self.base.dense_weight(x.dtype)
        factor = (self.lora_magnitude_vector / self._weight_norm(dense)).view(1, -1)  # (1, out)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base_out = result if self.base.bias is None else result - self.base.bias
        else:
            x = self.dropout(x)
            base_out = F.linear(x, dense)
        update = F.linear(F.linear(x, self.lora_A), self.lora_B)
        extra = (factor - 1) * base_out + factor * update * self.scaling
        return result + extra.to(result.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, dora={self.lora_magnitude_vector is not None}"


def check_targets(spec: LoraSpec, candidates: list[str]) -> None:
    """Refuse a LoRA target that matches none of ``candidates`` (the decoder's block Linear names).

    Raises:
        AdapterToolError: naming the target and the module names to choose from.
    """
    for target in spec.targets:
        if target != ALL_LINEAR and not any(LoraSpec(targets=(target,)).matches(name) for name in candidates):
            short = sorted({name.rsplit(".", 1)[-1] for name in candidates})
            raise OptionError(f"LoRA target {target!r} matches no Linear in the transformer blocks; choose from "
                              f"{', '.join(short)} or all-linear")


def add_lora(model: nn.Module, spec: LoraSpec, *, generator: torch.Generator, names: list[str]) -> list[str]:
    """Wrap the Linear modules of ``model`` at ``names`` that ``spec`` targets in :class:`LoRALinear`, in place.

    ``generator`` draws every A in the order of ``names``: a caller that adds the layers block by
    block with one generator gets the same adapter as one call over all names.

    Returns:
        The wrapped module names, in ``names`` order.
    """
    wrapped = []
    for name in names:
        if spec.matches(name):
            parent, _, leaf = name.rpartition(".")
            owner = model.get_submodule(parent)
            setattr(owner, leaf, LoRALinear(getattr(owner, leaf), spec, generator=generator))
            wrapped.append(name)
    return wrapped


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """``(name, module)`` of every :class:`LoRALinear` in ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)

"""Mixture-of-experts feed-forward blocks for the training decoder: Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE.

    probs = softmax(x W_router^T)                  (N, E), float32
    w, e = top_k(probs)                            (N, k); w / sum(w) where the family renormalises
    y = sum_j w_j expert_{e_j}(x)                  expert: down(silu(gate(x)) * up(x))
      (+ sigmoid(x W_sg^T) shared_expert(x): Qwen2-MoE)

Mixtral always renormalises the top-k weights, the others when config.json's ``norm_topk_prob``
says so (transformers' routers). Each expert runs on the tokens routed to it only: the (token,
slot) pairs are sorted by expert, gathered, run one expert after the other and scatter-added back
with their weights, one host sync per layer for the group sizes. Every expert runs, on no rows if
none is routed to it, so each LoRA parameter takes part in every backward (DDP needs that).
Frozen experts without LoRA (16/32-bit) are stacked per projection and run by
:func:`~adaptertool.training.lora.grouped_linear`, experts with plain LoRA on every Linear by
:func:`~adaptertool.training.lora.grouped_lora_linear`: one autograd node and one (N*k, out) tensor
per projection, which every expert's rows fill. Per-expert pieces change size with the routing
every step, and glibc's heap, kept between steps, grew ~55 MB fragmenting around them (the
benchmark's Qwen3-MoE); one node per expert Linear (48 a layer of 16 experts) cost Python time.

The load-balancing loss is Switch Transformer's (Fedus et al. 2021, https://arxiv.org/abs/2101.03961,
eqs. 4-6) as transformers computes it, over every MoE layer of one forward:

    aux = E * sum_e f_e P_e,  f_e = (top-k picks of e) / R,  P_e = (sum of probs of e) / R

the picks and probabilities summed over layers and real (unpadded) tokens, R = layers x real
tokens; only P carries a gradient. The training loss adds ``router_aux_loss_coef * aux`` per forward.

Experts are one frozen Linear each, named as per-expert checkpoints and PEFT ``target_modules``
adapters name them (:meth:`~adaptertool.adapters.experts.MoeLayer.linear_module`), so a per-expert
checkpoint loads by name; :class:`ExpertNames` shows a fused one under the same names. Expert LoRAs
are per expert Linear (``--experts per-expert``, plain :class:`~adaptertool.training.lora.LoRALinear`)
or PEFT's ``target_parameters`` form (``--experts fused``, :class:`ParamLora`): one LoRA per expert
on the fused ``gate_up_proj`` (gate and up share its A) and one on ``down_proj``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from adaptertool.adapters.expert_lora import expert_factors, param_lora_keys, peft_moved_names, split_gate_up
from adaptertool.adapters.experts import FAMILIES, MoeLayer, describe_experts
from adaptertool.errors import InputError, OptionError
from adaptertool.io import Checkpoint, TensorInfo, TensorSpec
from adaptertool.training.fused import swiglu
from adaptertool.training.lora import (
    ALL_LINEAR,
    FrozenLinear,
    LoRALinear,
    LoraSpec,
    grouped_linear,
    grouped_lora_linear,
    lora_linear,
)

if TYPE_CHECKING:
    from adaptertool.training.model import DecoderConfig

__all__ = ["MOE_ARCHITECTURES", "ExpertNames", "MoeSpec", "ParamLora", "RouterStats", "SparseMoe", "adapter_config_fields",
           "add_param_loras", "expert_checkpoint", "lora_names", "moe_fields", "param_lora_tensors", "router_like",
           "group_frozen_experts", "with_aux_coef"]

MOE_ARCHITECTURES = {"Qwen3MoeForCausalLM": "qwen3_moe", "Qwen2MoeForCausalLM": "qwen2_moe",
                     "MixtralForCausalLM": "mixtral", "OlmoeForCausalLM": "olmoe"}
_PROJECTIONS = ("gate", "up", "down")
# transformers' defaults where config.json leaves router_aux_loss_coef out
_EXPERT_COUNT = ("num_experts", "num_local_experts")  # Qwen/OLMoE, Mixtral (transformers 5 maps one to the other)
_AUX_COEF = {"qwen3_moe": 0.001, "qwen2_moe": 0.001, "mixtral": 0.001, "olmoe": 0.01}
# Routers and Qwen2's shared-expert gate decide, they do not transform: trained only when named
# (PEFT's all-linear skips them too on transformers 5, where routers are no Linear).
_GATES = ("gate", "shared_expert_gate")


@dataclass(frozen=True, kw_only=True)
class MoeSpec:
    """The expert settings of a MoE config.json."""

    model_type: str
    experts: int
    top_k: int
    intermediate: int  # of one expert
    normalize: bool  # renormalise the top-k weights to sum 1
    shared_intermediate: int  # Qwen2-MoE's shared expert; 0: none
    sparse_layers: tuple[int, ...]  # the others have a dense MLP (Qwen's mlp_only_layers, decoder_sparse_step)
    router_aux_loss_coef: float

    @property
    def block_name(self) -> str:
        """The MoE block's attribute in a decoder layer, as per-expert checkpoints name it."""
        return "block_sparse_moe" if FAMILIES[self.model_type] == "mixtral" else "mlp"


def moe_fields(config: Mapping[str, Any], architecture: str, *, source: str) -> dict[str, Any]:
    """The :class:`~adaptertool.training.model.DecoderConfig` fields a MoE architecture sets (attention and experts).

    Raises:
        AdapterToolError: settings train does not implement (OLMoE's clip_qkv, Mixtral's router jitter).
    """
    model_type = MOE_ARCHITECTURES[architecture]
    if config.get("clip_qkv") is not None:
        raise InputError(f"{source}: clip_qkv is not supported by train")
    if config.get("router_jitter_noise"):
        raise InputError(f"{source}: router_jitter_noise is not supported by train; set it to 0")
    layers = int(config["num_hidden_layers"])
    experts = int(config[next((k for k in _EXPERT_COUNT if config.get(k) is not None), _EXPERT_COUNT[0])])
    if model_type in ("qwen2_moe", "qwen3_moe"):
        dense = set(config.get("mlp_only_layers") or ())
        step = int(config.get("decoder_sparse_step", 1))
        sparse = tuple(i for i in range(layers) if i not in dense and experts > 0 and (i + 1) % step == 0)
        intermediate = int(config["moe_intermediate_size"])
    else:
        sparse, intermediate = tuple(range(layers)), int(config["intermediate_size"])
    bias = bool(config.get("attention_bias", False))
    window = config.get("sliding_window")
    if model_type == "mixtral" or (model_type == "qwen3_moe" and config.get("use_sliding_window")):
        sliding = tuple(range(layers)) if window else ()
    elif model_type == "qwen2_moe" and config.get("use_sliding_window"):
        types = config.get("layer_types") or [  # transformers' Qwen2MoeConfig default: every other layer
            "sliding_attention" if (i + 1) % 2 and i < int(config.get("max_window_layers", 28)) else "full_attention"
            for i in range(layers)]
        sliding = tuple(i for i, kind in enumerate(types) if kind == "sliding_attention") if window else ()
    else:
        sliding = ()
    shared = int(config.get("shared_expert_intermediate_size") or 0) if model_type == "qwen2_moe" else 0
    moe = MoeSpec(model_type=model_type, experts=experts, top_k=int(config["num_experts_per_tok"]),
                  intermediate=intermediate, shared_intermediate=shared, sparse_layers=sparse,
                  normalize=model_type == "mixtral" or bool(config.get("norm_topk_prob", False)),
                  router_aux_loss_coef=float(config.get("router_aux_loss_coef", _AUX_COEF[model_type])))
    return {
        "attention_bias": bool(config.get("qkv_bias", True)) if model_type == "qwen2_moe" else bias,
        "o_proj_bias": model_type in ("qwen3_moe", "olmoe") and bias,
        "qk_norm": model_type == "qwen3_moe", "qk_norm_whole": model_type == "olmoe",
        "sliding_window": int(window) if sliding else None, "sliding_layers": sliding, "moe": moe,
    }


class RouterStats:
    """The load-balancing loss's sums over one forward's MoE layers (module docstring).

    ``keep`` (N,) float32 is 1 for real tokens and 0 for padding, as transformers weights them with
    the attention mask; None: every token counts.
    """

    def __init__(self, keep: torch.Tensor | None, *, experts: int) -> None:
        self.keep, self.experts = keep, experts
        self.picks: torch.Tensor | float = 0.0  # (E,) top-k picks, no gradient
        self.probs: torch.Tensor | float = 0.0  # (E,) summed router probabilities
        self.rows: torch.Tensor | float = 0.0

    def add(self, probs: torch.Tensor, chosen: torch.Tensor) -> None:
        """One layer's router probabilities (N, E) float32 and top-k choices (N, k)."""
        keep = torch.ones(probs.shape[0], device=probs.device) if self.keep is None else self.keep
        picks = torch.zeros(self.experts, device=probs.device)
        self.picks = self.picks + picks.index_add_(0, chosen.flatten(), keep.repeat_interleave(chosen.shape[1]))
        self.probs = self.probs + (probs * keep.unsqueeze(1)).sum(0)
        self.rows = self.rows + keep.sum()

    def loss(self) -> torch.Tensor:
        """``E * sum_e f_e P_e`` (a float32 scalar)."""
        assert isinstance(self.probs, torch.Tensor), "no MoE layer ran"
        return self.experts * ((self.picks / self.rows) * (self.probs / self.rows)).sum()


class _SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with the family's Linear names (Mixtral: w1, w3, w2)."""

    def __init__(self, hidden: int, inner: int, names: Mapping[str, str]) -> None:
        super().__init__()
        self.names = tuple(names[p] for p in _PROJECTIONS)
        for projection, name in names.items():
            shape = (hidden, inner) if projection == "down" else (inner, hidden)
            self.add_module(name, FrozenLinear(torch.empty(shape)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, name) for name in self.names)
        return down(swiglu(gate(x), up(x)))


class ParamLora(nn.Module):
    """PEFT's ``target_parameters`` LoRA on one fused expert parameter: ``lora_A (E*r, in)``,
    ``lora_B (out, E*r)``, expert e's factors :func:`~adaptertool.adapters.expert_lora.expert_factors`.

    Initialised as PEFT does (A kaiming-uniform over ``in``, B zero). Like PEFT's ParamWrapper it has
    no dropout and no DoRA.
    """

    def __init__(self, experts: int, in_features: int, out_features: int, spec: LoraSpec, *,
                 generator: torch.Generator, device: torch.device) -> None:
        super().__init__()
        lora_a = torch.empty(experts * spec.rank, in_features)
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(lora_a.to(device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, experts * spec.rank, device=device))
        self.experts, self.scaling = experts, spec.scaling

    def factors(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        return expert_factors(self.lora_A, self.lora_B, expert, experts=self.experts)


class _Experts(nn.Module):
    """The experts ``0 .. E-1`` of one layer, and their ``target_parameters`` LoRAs when trained fused."""

    def __init__(self, spec: MoeSpec, hidden: int, names: Mapping[str, str]) -> None:
        super().__init__()
        for e in range(spec.experts):
            self.add_module(str(e), _SwiGLU(hidden, spec.intermediate, names))
        self.count = spec.experts
        self.gate_up_proj: ParamLora | None = None
        self.down_proj: ParamLora | None = None
        self.stacked = False  # see stack()

    def stack(self) -> None:
        """Frozen 16/32-bit experts without LoRA become one (E, out, in) buffer per projection,
        ``{gate,up,down}_weights``, for ``grouped_linear``; the expert modules, which named them for the
        loader and for LoRA, go. Other experts stay as they are."""
        experts = [getattr(self, str(e)) for e in range(self.count)]
        linears = [[getattr(expert, name) for expert in experts] for name in experts[0].names]
        plain = all(type(m) is FrozenLinear and m.weight is not None and m.bias is None for ms in linears for m in ms)
        if not plain or self.gate_up_proj is not None or self.down_proj is not None:
            return
        for projection, modules in zip(_PROJECTIONS, linears):
            self.register_buffer(f"{projection}_weights", torch.stack([m.weight for m in modules]), persistent=False)
        for e in range(self.count):
            delattr(self, str(e))
        self.stacked = True

    def forward(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum_j weights_j expert_{chosen_j}(x)`` per token; x (N, C), chosen and weights (N, k)."""
        order = chosen.flatten().argsort(stable=True)  # (N*k,) token-slots grouped by expert
        tokens = order // chosen.shape[1]
        sizes = torch.bincount(chosen.flatten(), minlength=self.count).tolist()  # the layer's host sync
        rows = x.index_select(0, tokens)  # (N*k, C); its backward adds with index_add_ (x[tokens]'s sorts first)
        if self.stacked:
            gate, up, down = (getattr(self, f"{p}_weights") for p in _PROJECTIONS)
            out = grouped_linear(swiglu(grouped_linear(rows, gate, sizes), grouped_linear(rows, up, sizes)), down, sizes)
        elif self._grouped_loras():
            gate, up, down = ([getattr(getattr(self, str(e)), name) for e in range(self.count)]
                              for name in getattr(self, "0").names)
            hidden = swiglu(grouped_lora_linear(rows, gate, sizes), grouped_lora_linear(rows, up, sizes))
            out = grouped_lora_linear(hidden, down, sizes)
        else:
            out = torch.cat([self._expert(e, group) for e, group in enumerate(rows.split(sizes))])  # (N*k, C)
        out = out * weights.flatten()[order].unsqueeze(1)
        return torch.zeros_like(x).index_add_(0, tokens, out.to(x.dtype))  # autocast may widen out

    def _grouped_loras(self) -> bool:
        """Whether every expert Linear is a LoRA :func:`~adaptertool.training.lora.grouped_lora_linear` runs."""
        if self.gate_up_proj is not None or self.down_proj is not None:
            return False
        experts = [getattr(self, str(e)) for e in range(self.count)]
        linears = [getattr(expert, name) for expert in experts for name in expert.names]
        return all(isinstance(m, LoRALinear) and m.lora_magnitude_vector is None and type(m.base) is FrozenLinear
                   and m.base.weight is not None and m.base.bias is None and m.base.weight.dtype == m.lora_A.dtype
                   and m.active_dropout == linears[0].active_dropout and m.scaling == linears[0].scaling for m in linears)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        expert = getattr(self, str(e))
        gate, up, down = (getattr(expert, name) for name in expert.names)
        if self.gate_up_proj is None:
            hidden = swiglu(gate(x), up(x))
        else:
            lora_a, lora_b = self.gate_up_proj.factors(e)
            b_gate, b_up = split_gate_up(lora_b, interleaved=False)
            scaling = self.gate_up_proj.scaling
            hidden = swiglu(lora_linear(x, gate, lora_a, b_gate, scaling=scaling),
                            lora_linear(x, up, lora_a, b_up, scaling=scaling))
        if self.down_proj is None:
            return down(hidden)
        lora_a, lora_b = self.down_proj.factors(e)
        return lora_linear(hidden, down, lora_a, lora_b, scaling=self.down_proj.scaling)


class SparseMoe(nn.Module):
    """One decoder layer's MoE block: router ``gate``, ``experts`` and Qwen2-MoE's shared expert."""

    def __init__(self, config: DecoderConfig, index: int) -> None:
        super().__init__()
        spec = config.moe
        assert spec is not None
        self.spec = spec
        self.layer = _layer(config, index)
        names = {p: self.layer.linear_module(0, p).rsplit(".", 1)[1] for p in _PROJECTIONS}
        hidden = config.hidden_size
        self.gate = FrozenLinear(torch.empty(spec.experts, hidden))
        self.experts = _Experts(spec, hidden, names)
        self.shared_expert = _SwiGLU(hidden, spec.shared_intermediate, names) if spec.shared_intermediate else None
        self.shared_expert_gate = FrozenLinear(torch.empty(1, hidden)) if spec.shared_intermediate else None

    def forward(self, x: torch.Tensor, routing: RouterStats | None) -> torch.Tensor:
        B, T, C = x.shape
        flat = x.reshape(B * T, C)
        probs = F.softmax(self.gate(flat).float(), dim=-1)  # (N, E)
        weights, chosen = probs.topk(self.spec.top_k, dim=-1)  # (N, k)
        if self.spec.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = self.experts(flat, chosen, weights.to(x.dtype))
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        if routing is not None:
            routing.add(probs, chosen)
        return out.view(B, T, C)


def _layer(config: DecoderConfig, index: int) -> MoeLayer:
    """adapters' description of layer ``index``'s experts, which names their modules and PEFT keys."""
    spec = config.moe
    assert spec is not None
    block = f"model.layers.{index}.{spec.block_name}"
    # router and shared tensors are left empty: nothing here reads them from this description
    return MoeLayer(index, FAMILIES[spec.model_type], "per-expert", block, f"model.layers.{index}.mlp.experts",
                    spec.experts, config.hidden_size, spec.intermediate, (), ())


def router_like(name: str) -> bool:
    """Whether Linear ``name`` is a router or Qwen2-MoE's shared-expert gate (not a transform: see _GATES)."""
    return name.rsplit(".", 1)[1] in _GATES


def lora_names(spec: LoraSpec, names: list[str], moe: MoeSpec | None) -> list[str]:
    """The Linears of ``names`` that :func:`~adaptertool.training.lora.add_lora` may wrap: routers and the
    shared-expert gate only where a target names them; experts only in the per-expert form.

    In the fused form, as ``init --experts fused``, Linears outside the experts with a name PEFT 0.21
    on transformers 5 moves onto the fused experts (Qwen3-MoE's dense layers' gate_proj...) are left
    out: PEFT could not load their LoRAs beside the experts'.

    Raises:
        AdapterToolError: such a Linear named by a target in the fused form.
    """
    if moe is None:
        return names
    named = [LoraSpec(targets=(t,)) for t in spec.targets if t != ALL_LINEAR]
    fused = spec.experts == "fused"
    moved = peft_moved_names(moe.model_type) if fused else ()
    kept = []
    for name in names:
        explicit = any(t.matches(name) for t in named)
        if (router_like(name) and not explicit) or (fused and ".experts." in name):
            continue
        if name.rsplit(".", 1)[1] in moved:
            if explicit:
                raise OptionError(f"--targets names {name}, but PEFT 0.21 on transformers 5 moves target_modules "
                                  f"named {'/'.join(moved)} onto the fused experts of a {moe.model_type} model, so "
                                  "it could not load that LoRA beside them; use --experts per-expert")
            continue
        kept.append(name)
    return kept


def add_param_loras(model: nn.Module, spec: LoraSpec, *, generator: torch.Generator) -> None:
    """Give the experts of the MoE blocks in ``model`` their ``target_parameters`` LoRAs (``spec.experts``
    "fused"): gate_up_proj where the gate or up Linear is targeted, down_proj where down is.

    Raises:
        AdapterToolError: DoRA or dropout, which PEFT's target_parameters LoRA does not have.
    """
    if spec.experts != "fused":
        return
    for block in model.modules():
        if not isinstance(block, SparseMoe):
            continue
        layer = block.layer
        targeted = {p for p in _PROJECTIONS if spec.matches(layer.linear_module(0, p))}
        if targeted and (spec.dora or spec.dropout):
            raise OptionError("--experts fused trains PEFT target_parameters LoRAs, which have no "
                              f"{'DoRA' if spec.dora else 'dropout'}; use --experts per-expert"
                              f"{'' if spec.dora else ' or --dropout 0'}")
        device = block.gate.device
        for param, parts in (("gate_up_proj", {"gate", "up"}), ("down_proj", {"down"})):
            if targeted & parts:
                _, out_features, in_features = layer.params[param]
                setattr(block.experts, param, ParamLora(layer.experts, in_features, out_features, spec,
                                                        generator=generator, device=device))


def group_frozen_experts(model: nn.Module) -> None:
    """Stack the frozen experts of every MoE block in ``model`` that have no LoRA (:meth:`_Experts.stack`)."""
    for block in model.modules():
        if isinstance(block, SparseMoe):
            block.experts.stack()


def param_lora_tensors(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(PEFT key, parameter)`` of every ``target_parameters`` LoRA tensor, keys as PEFT saves them."""
    for block in model.modules():
        if isinstance(block, SparseMoe):
            loras = {p: getattr(block.experts, p) for p in block.layer.params if getattr(block.experts, p) is not None}
            for param, (a_key, b_key) in param_lora_keys(block.layer.module, list(loras)).items():
                yield a_key, loras[param].lora_A
                yield b_key, loras[param].lora_B


def adapter_config_fields(model: nn.Module) -> dict[str, Any]:
    """adapter_config.json entries of a MoE decoder: ``target_modules`` the short names of the wrapped
    Linears (a name PEFT would move to the experts must not appear unless they are meant), and
    ``target_parameters`` for fused expert LoRAs."""
    wrapped = sorted({name.rsplit(".", 1)[1] for name, m in model.named_modules() if isinstance(m, LoRALinear)})
    params = sorted({f"mlp.experts.{p}" for block in model.modules() if isinstance(block, SparseMoe)
                     for p in block.layer.params if getattr(block.experts, p) is not None})
    return {"target_modules": wrapped, **({"target_parameters": params} if params else {})}


def with_aux_coef(config: DecoderConfig, coef: float | None) -> DecoderConfig:
    """``config`` with the router loss coefficient ``coef`` (None: config.json's)."""
    if coef is None or config.moe is None:
        return config
    return dataclasses.replace(config, moe=dataclasses.replace(config.moe, router_aux_loss_coef=coef))


class ExpertNames(Checkpoint):
    """A checkpoint shown under the decoder's names: fused experts as per-expert weights, and a
    Mixtral block stored as ``mlp`` as ``block_sparse_moe``. Only :meth:`read` reads renamed
    tensors; it keeps the last two fused tensors read (a layer's gate_up_proj and down_proj, which the
    loader asks for expert by expert), so each is read once."""

    def __init__(self, ckpt: Checkpoint, renames: dict[str, tuple[str, Any]]) -> None:
        stored = {source for source, _ in renames.values()}
        tensors = {name: info for name, info in ckpt.tensors.items() if name not in stored}
        for ours, (source, weight) in renames.items():
            info = ckpt.tensors[source]
            shape = tuple(weight.shape) if weight is not None else info.spec.shape
            tensors[ours] = TensorInfo(TensorSpec(ours, info.dtype, shape), info.file, info.offset)
        super().__init__(ckpt.path, ckpt.files, tensors, index=ckpt.index, metadata=ckpt.metadata)
        self._ckpt, self._renames = ckpt, renames
        self._recent: dict[str, torch.Tensor] = {}

    def read(self, name: str, *, buffer: torch.Tensor | None = None) -> torch.Tensor:
        if name not in self._renames:
            return self._ckpt.read(name, buffer=buffer)
        source, weight = self._renames[name]
        if source not in self._recent:
            if len(self._recent) == 2:
                del self._recent[next(iter(self._recent))]
            self._recent[source] = self._ckpt.read(source)
        whole = self._recent[source]
        return whole if weight is None else weight.view(whole).clone()  # a copy: not a view pinning all experts


def expert_checkpoint(ckpt: Checkpoint, raw: Mapping[str, Any], config: DecoderConfig) -> Checkpoint:
    """``ckpt`` as the MoE decoder of ``config`` names its tensors (itself when it already does).

    Raises:
        AdapterToolError: expert tensors that disagree with config.json (from describe_experts).
    """
    if config.moe is None:
        return ckpt
    layout = describe_experts(raw, {name: ckpt[name].spec.shape for name in ckpt}, source=str(ckpt.path))
    renames: dict[str, tuple[str, Any]] = {}
    for stored in layout.layers if layout is not None else ():
        ours = _layer(config, stored.index)
        for e in range(stored.experts):
            for p in _PROJECTIONS:
                where = stored.weight(e, p)
                name = f"{ours.linear_module(e, p)}.weight"
                if where.tensor != name:
                    renames[name] = (where.tensor, where if where.expert is not None else None)
        for name in (*stored.router, *stored.shared):
            if stored.block != ours.block:
                renames[ours.block + name[len(stored.block):]] = (name, None)
    return ExpertNames(ckpt, renames) if renames else ckpt

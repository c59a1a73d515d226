"""Build a :class:`~adaptertool.training.model.Decoder` straight from a safetensors checkpoint.

The model is first built on the meta device (no memory), then each module receives its tensor
as it is read, one at a time: resident memory is the finished model plus one tensor. Linear
weights of a bitsandbytes 4-bit checkpoint (ours or transformers') stay 4-bit, and those of an FP8
checkpoint (block FP8, or compressed-tensors per channel / per tensor) stay FP8 codes with their
scales; with ``qlora`` a 16-bit checkpoint's block Linears are quantised to NF4 as they are read
(double quantisation, blocksize 64, from the stored dtype: exactly what ``adaptertool quantize`` writes).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptertool.errors import InputError, OptionError
from adaptertool.io import Checkpoint, open_checkpoint, read_json, torch_dtype
from adaptertool.quant import (
    Codebook,
    FourBitState,
    Fp8Scheme,
    NestedCodebook,
    QuantizedKeys,
    codebook,
    find_fp8_weights,
    find_quantized_weights,
    nested_codebook,
    read_state,
    read_stored,
)
from adaptertool.training.fourbit import FourBitWeight
from adaptertool.training.fp8weight import Fp8Weight
from adaptertool.training.lora import FrozenLinear, LoraSpec, add_lora, check_targets
from adaptertool.training.model import Decoder, DecoderConfig
from adaptertool.training.moe import (
    add_param_loras,
    expert_checkpoint,
    group_frozen_experts,
    lora_names,
    router_like,
    with_aux_coef,
)

__all__ = ["load_decoder"]

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers older transformers saved; recomputed here
_FP8_METHODS = ("fp8", "compressed-tensors")  # quant_method values whose Linears load as FP8 codes


def load_decoder(path: Path, *, lora: LoraSpec, qlora: bool = False, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0, gradient_checkpointing: bool = False,
                 shard: Callable[[nn.Module], None] | None = None, router_aux_loss_coef: float | None = None) -> Decoder:
    """Load a decoder with fresh LoRA layers from a checkpoint folder (config.json beside the weights).

    Args:
        path: the model folder (or its index / single safetensors file inside it).
        lora: the LoRA layers to add (PEFT's initialisation, A drawn from ``seed``).
        qlora: quantise a 16-bit checkpoint's block Linears to NF4 at load (a 4-bit checkpoint stays 4-bit
            anyway; an FP8 one is refused, its codes are kept as they are).
        device: where the model lives.
        dtype: dtype of the frozen 16-bit weights and of the compute; LoRA tensors are float32.
        seed: seeds the LoRA initialisation.
        gradient_checkpointing: recompute each block in the backward instead of keeping its activations.
        shard: called on each block once it is loaded with its LoRA layers, then on the whole model
            (FSDP2 keeps this process's shard of each): resident memory is then the shards plus one
            block instead of the whole model.
        router_aux_loss_coef: a MoE decoder's load-balancing loss weight; None: config.json's.

    Raises:
        AdapterToolError: no config.json, an unsupported architecture, tensors missing, unexpected or
            of the wrong shape for the config, or ``qlora`` on an FP8 checkpoint.
    """
    device = torch.device(device)
    with open_checkpoint(path) as ckpt:
        config_path = ckpt.root / "config.json" if ckpt.root is not None else None
        if config_path is None or not config_path.is_file():
            raise InputError(f"{path}: no config.json beside the weights; train needs the model's folder")
        raw = read_json(config_path)
        config = with_aux_coef(DecoderConfig.from_dict(raw, source=str(config_path)), router_aux_loss_coef)
        fourbit = find_quantized_weights(ckpt, source=str(ckpt.path))
        states = {name: read_state(ckpt.read, keys, source=str(ckpt[keys.quant_state].file))
                  for name, keys in fourbit.items()}
        ckpt = expert_checkpoint(ckpt, raw, config)  # MoE experts under the decoder's per-expert names
        fp8 = _fp8_weights(ckpt, raw)
        if qlora and fp8:
            raise OptionError(f"{path} is an FP8 checkpoint: train keeps its FP8 codes as they are (no 16-bit "
                              "copy to quantise to NF4); drop --qlora")
        quantized: dict[str, QuantizedKeys | Fp8Scheme] = {**fourbit, **fp8}
        with torch.device("meta"):
            model = Decoder(config)
        _check_tensors(model, ckpt, quantized, states)
        candidates = model.linear_names()
        check_targets(lora, candidates)
        books = (codebook("nf4"), nested_codebook()) if qlora and not quantized else None
        generator = torch.Generator().manual_seed(seed)  # one for all blocks: A is drawn in candidates order
        for i, block in enumerate(model.model.layers):
            prefix = f"model.layers.{i}."
            _load(model, ckpt, prefix, quantized, books, device, dtype)
            block.requires_grad_(False)
            names = lora_names(lora, [n for n in candidates if n.startswith(prefix)], config.moe)
            add_lora(model, lora, generator=generator, names=names)
            add_param_loras(block, lora, generator=generator)
            if shard is not None:
                shard(block)
            else:  # FSDP2 shards each expert's own weight: no stack of them beside
                group_frozen_experts(block)
        _load(model, ckpt, "", quantized, books, device, dtype)  # embeddings and the final norm
        head = model.model.embed_tokens.weight if config.tie_word_embeddings else _read(ckpt, "lm_head.weight", device, dtype)
        model.lm_head = FrozenLinear(head, compute_dtype=dtype)
    model.model.embed_tokens.requires_grad_(False)
    model.model.norm.requires_grad_(False)
    model.lora = lora
    model.gradient_checkpointing = gradient_checkpointing
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()]), "a placeholder was left unloaded"
    if shard is not None:
        shard(model)
    return model


def _load(model: Decoder, ckpt: Checkpoint, prefix: str, quantized: dict[str, QuantizedKeys | Fp8Scheme],
          books: tuple[Codebook, NestedCodebook] | None, device: torch.device, dtype: torch.dtype) -> None:
    """Read the still unloaded Linears and parameters whose names start with ``prefix``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, FrozenLinear) and name != "lm_head" and name.startswith(prefix) and _is_meta(module):
            keep = router_like(name)  # routing decisions stay 16-bit under --qlora, as with transformers + bnb
            _set_module(model, name, _read_linear(ckpt, name, quantized, None if keep else books, device, dtype))
    for name, param in list(model.named_parameters()):
        if param.is_meta and name.startswith(prefix) and not name.startswith("lm_head."):
            _set_parameter(model, name, _read(ckpt, name, device, dtype))


def _is_meta(linear: FrozenLinear) -> bool:
    return linear.weight is not None and linear.weight.is_meta


def _check_tensors(model: Decoder, ckpt: Checkpoint, quantized: dict[str, QuantizedKeys | Fp8Scheme],
                   states: dict[str, FourBitState]) -> None:
    """Every tensor the config implies is present with its shape, and nothing else (before reading any data)."""
    needed = {name: tuple(p.shape) for name, p in model.named_parameters()}
    if model.config.tie_word_embeddings:
        needed.pop("lm_head.weight")
    companions = {key for layout in quantized.values() for key in _companions(layout)}
    stored = {name: states[name].shape if name in states else ckpt[name].shape
              for name in ckpt if name not in companions}
    where = f"{ckpt.path} ({model.config.architecture})"
    linears = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, FrozenLinear) and name != "lm_head"}
    stray = [name for name, layout in quantized.items() if isinstance(layout, Fp8Scheme) and name not in linears]
    if stray:  # an FP8 embedding or head would be read as if its codes were values
        raise InputError(f"{where}: FP8 tensor {stray[0]} is not a Linear weight in the transformer blocks; "
                         "train reads FP8 weights only there (dequantize the checkpoint first)")
    for name, shape in needed.items():
        if name not in stored:
            raise InputError(f"{where}: tensor {name} is missing; does config.json describe these weights?")
        if tuple(stored[name]) != shape:
            raise InputError(f"{where}: tensor {name} has shape {list(stored[name])} but config.json implies "
                             f"{list(shape)}; does config.json describe these weights?")
    tied_head = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    extra = [n for n in stored if n not in needed and n not in tied_head and not n.endswith(_IGNORED_SUFFIXES)]
    if extra:
        raise InputError(f"{where}: tensor {extra[0]} is not part of the decoder config.json describes; "
                         "train supports plain causal-LM checkpoints")
    for name in needed:
        if name not in quantized and torch_dtype(ckpt[name].dtype).is_floating_point is False:
            raise InputError(f"{where}: tensor {name} is {ckpt[name].dtype}, not a float; "
                             "train needs 16/32-bit, 4-bit or FP8 weights")


def _companions(layout: QuantizedKeys | Fp8Scheme) -> set[str]:
    """The stored tensors a quantised weight reads beside its codes."""
    if isinstance(layout, QuantizedKeys):
        return {key for key in layout.keys if key != layout.weight}
    # compressed-tensors' static activation scale quantises the layer's inputs at inference; training
    # runs on unquantised activations, as transformers' dequantising load does
    return {layout.scale, layout.weight.removesuffix("weight") + "input_scale"}


def _fp8_weights(ckpt: Checkpoint, raw: dict[str, Any]) -> dict[str, Fp8Scheme]:
    """The FP8 weights of a checkpoint whose config.json names an FP8 quant_method (from headers only)."""
    settings = raw.get("quantization_config")
    if not isinstance(settings, dict) or settings.get("quant_method") not in _FP8_METHODS:
        return {}
    headers = {name: (ckpt[name].dtype, tuple(ckpt[name].shape)) for name in ckpt}
    return find_fp8_weights(headers, settings, source=str(ckpt.path))


def _read_linear(ckpt: Checkpoint, name: str, quantized: dict[str, QuantizedKeys | Fp8Scheme],
                 books: tuple[Codebook, NestedCodebook] | None, device: torch.device, dtype: torch.dtype) -> FrozenLinear:
    weight_name = name + ".weight"
    bias = _read(ckpt, name + ".bias", device, dtype) if name + ".bias" in ckpt else None
    layout = quantized.get(weight_name)
    weight: torch.Tensor | FourBitWeight | Fp8Weight
    if isinstance(layout, QuantizedKeys):
        stored = read_stored(ckpt.read, layout, source=str(ckpt[weight_name].file))
        weight = FourBitWeight.from_stored(stored).to(device)
    elif isinstance(layout, Fp8Scheme):
        weight = Fp8Weight(ckpt.read(weight_name), ckpt.read(layout.scale), layout,
                           source=str(ckpt[weight_name].file)).to(device)
    elif books is not None:
        book, code_map = books
        weight = FourBitWeight.quantize(ckpt.read(weight_name), book, code_map=code_map, name=weight_name,
                                        source=str(ckpt[weight_name].file)).to(device)
    else:
        weight = _read(ckpt, weight_name, device, dtype)
    return FrozenLinear(weight, bias, compute_dtype=dtype)


def _read(ckpt: Checkpoint, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return ckpt.read(name).to(device=device, dtype=dtype)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, nn.Parameter(tensor, requires_grad=False))

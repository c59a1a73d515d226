"""quantize --format fp8-block | fp8-channel | mxfp4: the FP8 and MXFP4 layouts that releases ship.

- ``fp8-block``: DeepSeek-V3's and Qwen3-FP8's layout (quant_method ``fp8``): every Linear weight in
  the numbered blocks becomes F8_E4M3 codes ``P.weight`` plus F32 ``P.weight_scale_inv``, one scale
  per ``--block`` (128x128, the grid rounded up); routers stay in 16-bit, as in the releases.
- ``fp8-channel``: compressed-tensors' FP8_DYNAMIC scheme (llm-compressor): codes plus one scale per
  output row, ``P.weight_scale`` (out, 1) in the weight's own dtype; activations quantised per token
  at run time.
- ``mxfp4``: gpt-oss's layout: only the fused expert parameters (``mlp.experts.gate_up_proj``,
  ``down_proj``), each as ``P_blocks`` and ``P_scales``; attention, router, embeddings stay 16-bit.

Embeddings, the head, norms, biases and routers are never quantised; ``--skip`` keeps more modules
and names them in the config. Unlike bitsandbytes' layout every entry's size follows from the
weight's shape, so this is one pass: each weight is quantised once when the writer first asks for
its codes or its scales, and the other part waits in a spool (:mod:`adaptertool.quant.fp8`,
:mod:`adaptertool.quant.mxfp4` hold the maths).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch

from adaptertool.adapters.peft_keys import module_order
from adaptertool.errors import InputError
from adaptertool.io import DTYPES, Checkpoint, TensorSpec, TensorSpool, cast_specs, copy_side_files, dtype_code, staged_output
from adaptertool.ops.measure import Stopwatch, peak_rss_bytes
from adaptertool.ops.model_files import CONFIG, set_config_dtype, write_config
from adaptertool.ops.stream import SpooledGroups, stream_checkpoint
from adaptertool.quant import (
    Fp8Scheme,
    fp8_scale_key,
    matches_module,
    quantize_fp8,
    quantize_mxfp4,
    select_weights,
)

if TYPE_CHECKING:
    from adaptertool.ops.quantize import QuantConfig, QuantReport

__all__ = ["SCALED_FORMATS", "quantize_scaled"]

SCALED_FORMATS = ("fp8-block", "fp8-channel", "mxfp4")
# Routers and gates the releases keep in 16-bit (transformers 5 builds most as custom modules, not Linear).
_ROUTER = re.compile(r"\.(?:mlp|block_sparse_moe)\.(?:gate|router)$|\.shared_expert_gate$")
_EXPERTS = re.compile(r"\.mlp\.experts\.(?:gate_up_proj|down_proj)$")
_MXFP4_UNCONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def quantize_scaled(cfg: QuantConfig, source: Checkpoint, config: dict[str, Any], clock: Stopwatch, *,
                    progress: bool) -> QuantReport:
    """Write ``source`` in ``cfg.quant_type``'s layout into ``cfg.out``; see the module docstring."""
    from adaptertool.ops.quantize import QuantReport, quantized_dtypes

    weights, kept = _select(cfg, source, config)
    dtypes = quantized_dtypes(source, weights, cfg.dtype)
    config["quantization_config"] = _quantization_config(cfg, kept)
    if cfg.dtype is not None:
        set_config_dtype(config, cfg.dtype)
    schemes = {w: _scheme(cfg, w, dtypes[w]) for w in weights} if cfg.quant_type != "mxfp4" else {}
    specs: list[TensorSpec] = []
    groups: dict[str, str] = {}  # output tensor -> the weight it is made from
    for spec in cast_specs(source.specs(), dtype_code(cfg.dtype) if cfg.dtype is not None else None):
        if spec.name not in dtypes:
            specs.append(spec)
            continue
        for part in _parts(cfg, spec, schemes.get(spec.name)):
            specs.append(part)
            groups[part.name] = spec.name

    def make(weight: str) -> dict[str, torch.Tensor]:
        tensor = source.read(weight).to(dtypes[weight])
        where = str(source[weight].file)
        if cfg.quant_type == "mxfp4":
            name = weight.removesuffix(".weight")
            blocks, scales = quantize_mxfp4(tensor, transposed=True, name=name, source=where)
            return {f"{name}_blocks": blocks, f"{name}_scales": scales}
        scheme = schemes[weight]
        q, scale = quantize_fp8(tensor, scheme, source=where)
        return {scheme.weight: q, scheme.scale: scale}

    with staged_output(cfg.out, force=cfg.force, inputs=[cfg.source]) as tmp, TensorSpool(tmp) as spool:
        written = stream_checkpoint(source, tmp, specs, max_shard_bytes=cfg.max_shard_bytes, metadata={"format": "pt"},
                                    produce=SpooledGroups(spool, groups, make), desc=cfg.quant_type, progress=progress)
        side = copy_side_files(source.root, tmp, skip=(CONFIG,))
        write_config(tmp, config)
    return QuantReport(
        out=str(cfg.out), files=written.files, quant_type=cfg.quant_type, blocksize=0, double_quant=False,
        block=list(cfg.block) if cfg.quant_type == "fp8-block" else None, quantized=len(dtypes),
        kept=sorted(kept, key=module_order), copied=written.copied, cast=written.cast,
        bytes_in=sum(s.nbytes for s in source.specs()), bytes_written=written.bytes_written,
        side_files=sorted([*side, CONFIG]), seconds=clock.seconds, peak_rss_bytes=peak_rss_bytes(),
    )


def _select(cfg: QuantConfig, source: Checkpoint, config: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(weights to quantise, Linear-like modules kept in 16-bit that the config must name)."""
    if cfg.quant_type == "mxfp4":
        weights = [n for n in source if _EXPERTS.search(n) and len(source[n].shape) == 3
                   and not (cfg.skip and matches_module(n, cfg.skip))]
        if not weights:
            raise InputError(f"{cfg.source}: mxfp4 quantises fused expert parameters (mlp.experts.gate_up_proj, "
                             "down_proj) as gpt-oss stores them, and this checkpoint has none")
        return weights, []
    headers = {s.name: (DTYPES[s.dtype][1], s.shape) for s in source.specs()}
    selection = select_weights(headers, config, skip=cfg.skip, source=str(cfg.source))
    routers = [w.removesuffix(".weight") for w in selection.quantize if _ROUTER.search(w.removesuffix(".weight"))]
    weights = [w for w in selection.quantize if w.removesuffix(".weight") not in routers]
    # transformers converts every Linear but the output embedding: the rest kept must be named
    kept = sorted({*routers, *(selection.skip_modules or ())} - {"lm_head"})
    return weights, kept


def _scheme(cfg: QuantConfig, weight: str, dtype: torch.dtype) -> Fp8Scheme:
    if cfg.quant_type == "fp8-block":
        return Fp8Scheme(weight=weight, scale=fp8_scale_key(weight, "fp8"), convention="fp8", strategy="block",
                         block=cfg.block)
    return Fp8Scheme(weight=weight, scale=fp8_scale_key(weight, "compressed-tensors"), convention="compressed-tensors",
                     strategy="channel", block=None, scale_dtype=dtype_code(dtype))


def _parts(cfg: QuantConfig, spec: TensorSpec, scheme: Fp8Scheme | None) -> list[TensorSpec]:
    """The tensors that stand for weight ``spec``, in its place."""
    if scheme is None:  # mxfp4: (E, in, out) -> blocks (E, out, in/32, 16) and scales (E, out, in/32)
        experts, inputs, outputs = spec.shape
        if inputs % 32:
            raise InputError(f"{cfg.source}: tensor {spec.name} has {inputs} inputs; MXFP4 needs a multiple of 32")
        name = spec.name.removesuffix(".weight")
        return [TensorSpec(f"{name}_blocks", "U8", (experts, outputs, inputs // 32, 16)),
                TensorSpec(f"{name}_scales", "U8", (experts, outputs, inputs // 32))]
    return [TensorSpec(spec.name, "F8_E4M3", spec.shape),
            TensorSpec(scheme.scale, scheme.scale_dtype, scheme.scale_shapes(spec.shape)[0])]


def _quantization_config(cfg: QuantConfig, kept: list[str]) -> dict[str, Any]:
    if cfg.quant_type == "mxfp4":
        return {"quant_method": "mxfp4", "modules_to_not_convert": _MXFP4_UNCONVERTED}
    if cfg.quant_type == "fp8-block":
        settings: dict[str, Any] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                    "weight_block_size": list(cfg.block)}
        if kept:
            settings["modules_to_not_convert"] = kept
        return settings
    # compressed-tensors' FP8_DYNAMIC preset, as its QuantizationConfig serialises it
    fp8 = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None}
    return {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {**fp8, "strategy": "channel", "dynamic": False},
                                      "input_activations": {**fp8, "strategy": "token", "dynamic": True},
                                      "output_activations": None, "format": "float-quantized"}},
        "ignore": ["lm_head", *kept], "kv_cache_scheme": None, "global_compression_ratio": None,
        "moe_sparsity_config": None,
    }


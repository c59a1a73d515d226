"""Shared by the MoE init, extract and merge tests: a fixture model in transformers, and PEFT's load of an
adapter onto it with the LoRA keys it found missing and the keys it found unexpected."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch


def moe_model(folder: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """transformers' model of a fixture folder in float32, eval mode, its weights in fresh memory, and its
    loading info."""
    import transformers

    # The fixtures give every family head_dim 8, which DeepSeek-V3 takes as its rotary size: its forward
    # needs qk_rope_head_dim (4) there. No weight depends on it.
    extra = {"head_dim": 4} if json.loads((folder / "config.json").read_text())["model_type"] == "deepseek_v3" else {}
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True,
                                                                     **extra)
    # Into fresh (64-byte aligned) memory: weights loaded from a file sit where its header puts them
    # (8-byte alignment), and MKL's float32 products round differently by the operands' alignment on
    # some CPUs (AMD EPYC Zen 4: last-bit logit differences between bit-identical weights from two files).
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.data = tensor.data.clone()
    return model.eval(), info


def peft_load(model: torch.nn.Module, adapter: Path,
              monkeypatch: pytest.MonkeyPatch) -> tuple[torch.nn.Module, list[str], list[str], list[str]]:
    """PeftModel.from_pretrained; the LoRA keys its state-dict load found missing, the unexpected ones,
    and the warnings it gave."""
    import peft

    results = []
    original = peft.peft_model.set_peft_model_state_dict

    def spy(*args: Any, **kwargs: Any) -> Any:
        results.append(original(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(peft.peft_model, "set_peft_model_state_dict", spy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(model, adapter)
    (result,) = results
    return (loaded, [k for k in result.missing_keys if "lora_" in k], list(result.unexpected_keys),
            [str(w.message) for w in caught])

"""Opened adapters: keys grouped into planned modules, whole tensors apart, NaN/Inf refused with one message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adaptertool import AdapterToolError
from adaptertool.ops.adapter_inputs import check_finite, load_adapter, plan_adapter, read_checked

P = "base_model.model."


def _adapter(folder: Path, tensors: dict[str, torch.Tensor], **config: object) -> Path:
    folder.mkdir()
    save_file(tensors, folder / "adapter_model.safetensors")
    settings = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, **config}
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    return folder


def _mixed(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    return _adapter(tmp_path / "mixed", {
        f"{P}model.layers.1.q_proj.lora_A.weight": torch.randn(2, 8, generator=g),
        f"{P}model.layers.1.q_proj.lora_B.weight": torch.randn(6, 2, generator=g),
        f"{P}lm_head.weight": torch.randn(10, 8, generator=g),  # modules_to_save copy
        f"{P}model.embed_tokens.lora_embedding_A": torch.randn(2, 10, generator=g),
        f"{P}model.embed_tokens.lora_embedding_B": torch.randn(8, 2, generator=g),
        f"{P}model.layers.0.v_proj.lora_A.weight": torch.randn(2, 8, generator=g),
        f"{P}model.layers.0.v_proj.lora_B.weight": torch.randn(4, 2, generator=g),
        f"{P}model.layers.0.v_proj.lora_B.bias": torch.randn(4, generator=g),
        f"{P}steps": torch.tensor([3], dtype=torch.int64),
    }, lora_bias=True)


def test_plan_adapter_splits_whole_tensors_from_modules_in_key_order(tmp_path: Path) -> None:
    adapter = load_adapter(_mixed(tmp_path), 0.5)
    try:
        whole, modules = plan_adapter(adapter)
        order = list(adapter.weights)  # storage order
    finally:
        adapter.close()
    assert whole == [k for k in order if k in (f"{P}lm_head.weight", f"{P}steps")]
    # Modules come in the order their first key is stored, whatever the parts.
    first_seen = list(dict.fromkeys(k.removeprefix(P).rsplit(".lora_", 1)[0] for k in order if ".lora_" in k))
    assert list(modules) == first_seen
    q, emb, v = modules["model.layers.1.q_proj"], modules["model.embed_tokens"], modules["model.layers.0.v_proj"]
    assert (q.update.kind, q.shape, q.update.scaling) == ("lora", (6, 8), 2.0)
    assert (emb.update.kind, emb.shape) == ("lora_embedding", (10, 8))  # the base embedding is (vocab, dim)
    assert v.update.changes_bias and v.shapes == {"lora_A": (2, 8), "lora_B": (4, 2), "lora_B.bias": (4,)}
    assert dict(v.update.keys) == {part: f"{P}model.layers.0.v_proj.{part}" + ("" if part.endswith("bias") else ".weight")
                                   for part in ("lora_A", "lora_B", "lora_B.bias")}


def test_plan_adapter_names_the_adapter_in_a_module_error(tmp_path: Path) -> None:
    folder = _adapter(tmp_path / "half", {f"{P}model.layers.0.q_proj.lora_A.weight": torch.zeros(2, 8)})
    adapter = load_adapter(folder, 1.0)
    try:
        with pytest.raises(AdapterToolError, match=rf"^{folder}: .*q_proj") as caught:
            plan_adapter(adapter)
    finally:
        adapter.close()
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_load_adapter_refuses_an_unreadable_config(tmp_path: Path) -> None:
    folder = _adapter(tmp_path / "bad", {f"{P}x.lora_A.weight": torch.zeros(2, 8)}, peft_type="PROMPT_TUNING")
    with pytest.raises(AdapterToolError, match="peft_type PROMPT_TUNING is not supported"):
        load_adapter(folder, 1.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_nan_and_inf_are_refused_with_one_message(tmp_path: Path, bad: float, dtype: torch.dtype) -> None:
    a = torch.zeros(2, 8, dtype=dtype)
    a[1, 5] = bad
    key = f"{P}model.layers.0.q_proj.lora_A.weight"
    folder = _adapter(tmp_path / "broken", {key: a, f"{P}model.layers.0.q_proj.lora_B.weight": torch.zeros(4, 2, dtype=dtype),
                                            f"{P}count": torch.tensor([7], dtype=torch.int32)})
    adapter = load_adapter(folder, 1.0)
    try:
        message = rf"^{folder}: tensor {key} holds NaN or Inf values; the adapter is broken$"
        with pytest.raises(AdapterToolError, match=message):
            read_checked(adapter, key)
        with pytest.raises(AdapterToolError, match=message):
            check_finite(adapter)
        assert torch.equal(read_checked(adapter, f"{P}count"), torch.tensor([7], dtype=torch.int32))
    finally:
        adapter.close()


def test_finite_adapter_reads_back_unchanged(tmp_path: Path) -> None:
    adapter = load_adapter(_mixed(tmp_path), 1.0)
    try:
        check_finite(adapter)
        for key in adapter.weights:
            assert torch.equal(read_checked(adapter, key), adapter.weights.read(key))
    finally:
        adapter.close()

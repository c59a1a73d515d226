"""merge (plain LoRA so far) against PEFT's merge_and_unload on a tiny transformers Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adaptertool import AdapterToolError
from adaptertool.io import open_checkpoint
from adaptertool.ops.examples import TINY
from adaptertool.ops.merge import MergeConfig, merge

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _peft_case(root: Path, dtype: torch.dtype, **lora: object) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """Save a tiny base and a PEFT adapter with non-zero B; return them and PEFT's merged state dict."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{k: v for k, v in TINY.config(dtype).items() if k not in ("architectures", "torch_dtype")})
    model = transformers.LlamaForCausalLM(config).to(dtype)
    base, adapter = root / "base", root / "adapter"
    model.save_pretrained(base)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**lora))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.copy_(torch.randn_like(param) * 0.1)
    peft_model.save_pretrained(adapter)
    merged = peft_model.merge_and_unload().state_dict()
    return base, adapter, merged


CASES = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["k_proj", "o_proj"]),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], rank_pattern={"up_proj": 2},
                     alpha_pattern={"layers.1.self_attn.q_proj": 3}),
    "embedding": dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "gate_proj"]),
    "modules_to_save": dict(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_merge_matches_peft(tmp_path: Path, case: str, dtype: torch.dtype) -> None:
    base, adapter, expected = _peft_case(tmp_path, dtype, **CASES[case])
    report = merge(MergeConfig(base=base, adapter=adapter, out=tmp_path / "out"))
    assert report.merged > 0
    with open_checkpoint(tmp_path / "out") as out:
        assert set(out) == set(expected) - {"lm_head.weight"} | ({"lm_head.weight"} if "lm_head.weight" in out else set())
        for name in out:
            got, want = out.read(name), expected[name]
            if dtype == torch.float32:
                assert torch.equal(got, want), name  # same float32 ops as PEFT: bit-identical
            else:
                # PEFT rounds the delta to bf16 before adding; we add in float32 and round once:
                # at most one bf16 ulp apart.
                ulp = torch.finfo(torch.bfloat16).eps * want.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
                assert ((got.float() - want.float()).abs() <= ulp * 1.0001).all(), name


def test_merge_then_unmerge_round_trip_fp32(tmp_path: Path) -> None:
    base, adapter, _ = _peft_case(tmp_path, torch.float32, **CASES["lora"])
    merge(MergeConfig(base=base, adapter=adapter, out=tmp_path / "merged"))
    merge(MergeConfig(base=tmp_path / "merged", adapter=adapter, out=tmp_path / "back", scale=-1.0))
    with open_checkpoint(base) as a, open_checkpoint(tmp_path / "back") as b:
        worst = max((a.read(n) - b.read(n)).abs().max().item() for n in a)
    assert worst < 1e-6


def test_adapter_for_another_model_is_refused_before_writing(tmp_path: Path, tiny_adapter: Path) -> None:
    base, _, _ = _peft_case(tmp_path, torch.float32, **CASES["lora"])
    bigger = tmp_path / "bigger"
    bigger.mkdir()
    config = json.loads((tiny_adapter / "adapter_config.json").read_text())
    (bigger / "adapter_config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file
    tensors = {k: torch.cat([v, v], dim=-1) if "lora_A" in k else v for k, v in load_file(tiny_adapter / "adapter_model.safetensors").items()}
    save_file(tensors, bigger / "adapter_model.safetensors")
    with pytest.raises(AdapterToolError, match=r"implies shape \[32, 64\] for model\.layers\.\d\.self_attn\.[qv]_proj\.weight, but the base has \[\d+, 32\]"):
        merge(MergeConfig(base=base, adapter=bigger, out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_adapter_targeting_missing_module(tmp_path: Path, tiny_adapter: Path) -> None:
    from safetensors.torch import save_file
    save_file({"w": torch.ones(2)}, tmp_path / "model.safetensors")
    with pytest.raises(AdapterToolError, match=r"adapter targets model\.layers\.0\.self_attn\.q_proj but the base has no"):
        merge(MergeConfig(base=tmp_path / "model.safetensors", adapter=tiny_adapter, out=tmp_path / "out"))

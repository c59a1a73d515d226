"""merge/subtract on the real SmolLM2-135M checkpoint (bf16, 3 shards, tied embeddings), against PEFT.

PEFT builds an all-linear LoRA (and a DoRA) on the float32-loaded model with non-zero B; our merge
(--dtype fp32) must equal PEFT's merge_and_unload bit for bit, the merged model must compute the
adapted model's logits (both in float64), and subtract must give the base back.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from adaptertool.io import open_checkpoint
from adaptertool.ops.merge import MergeConfig, merge, subtract

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

ADAPTERS = {
    "lora": dict(r=16, lora_alpha=32, target_modules="all-linear"),
    "dora": dict(r=8, lora_alpha=16, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
}


@pytest.fixture(scope="module", params=list(ADAPTERS))
def case(request: pytest.FixtureRequest, smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp(request.param)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**ADAPTERS[request.param]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
            elif "magnitude" in name:
                param.mul_(1 + torch.randn(param.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(root / "adapter")
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314]])
    with torch.no_grad():  # the adapted (unmerged) model's logits, computed in float64: see below
        logits = copy.deepcopy(peft_model).double()(ids).logits
    merged = peft_model.merge_and_unload().state_dict()
    return {"root": root, "adapter": root / "adapter", "logits": logits, "ids": ids, "merged": merged, "kind": request.param}


def test_fp32_merge_equals_peft_and_its_logits(case: dict, smollm2: Path) -> None:
    out = case["root"] / "merged"
    report = merge(MergeConfig(base=smollm2, adapters=((case["adapter"], 1.0),), out=out, dtype=torch.float32,
                               max_shard_bytes=200_000_000))
    assert report.merged == (210 if case["kind"] == "lora" else 90)  # 30 layers x 7 (all-linear) or x 3
    with open_checkpoint(out) as ckpt:
        assert set(ckpt) == set(case["merged"]) - {"lm_head.weight"}  # tied: not stored, as in the base
        for name in ckpt:
            assert torch.equal(ckpt.read(name), case["merged"][name]), name
    # The merged float32 weights, run in float64 against the unmerged model in float64. In float32 the
    # two forwards round differently through 30 layers, by amounts that depend on MKL's kernels and
    # the thread count (measured on an AVX-512 CPU: up to 4.4e-5 against 1e-4 + 1e-4 |logit| allowed,
    # a 2x margin). In float64 that noise is ~1e-12; what is left is the float32 rounding of the
    # merged weights (the bits PEFT's own merge gives, checked above): measured 1.2e-5 for LoRA and
    # DoRA, logits up to 31. 1e-4 keeps an 8x margin on any CPU.
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(case["ids"]).logits, case["logits"], rtol=0, atol=1e-4)
    assert (out / "tokenizer.json").read_bytes() == (smollm2 / "tokenizer.json").read_bytes()


def test_bf16_merge_then_subtract_returns_base(case: dict, smollm2: Path) -> None:
    if case["kind"] == "dora":
        pytest.skip("DoRA cannot be subtracted (tested on tiny models)")
    merged, back = case["root"] / "merged-bf16", case["root"] / "back"
    merge(MergeConfig(base=smollm2, adapters=((case["adapter"], 1.0),), out=merged))
    subtract(MergeConfig(base=merged, adapters=((case["adapter"], 1.0),), out=back))
    with open_checkpoint(smollm2) as a, open_checkpoint(merged) as m, open_checkpoint(back) as b:
        for name in a:
            original, middle, restored = a.read(name).float(), m.read(name).float(), b.read(name).float()
            # Two bf16 roundings, each at most half an ulp of its result: <= eps * max(|W|, |W + delta|).
            bound = torch.finfo(torch.bfloat16).eps * torch.maximum(original.abs(), middle.abs())
            assert ((restored - original).abs() <= bound).all(), name

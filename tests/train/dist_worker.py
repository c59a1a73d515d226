"""One optimizer step per case on each process of a torchrun job, for tests/train/test_distributed.py.

Run as ``torchrun --standalone --nproc-per-node 2 tests/train/dist_worker.py BASE OUT``: for every
case of :data:`CASES` the first process saves the step's LoRA gradient (the adapter's change after
one SGD step at learning rate 1, no clipping) and, for FSDP2, each process's local bytes of the
4-bit codes. The test runs :func:`one_step` in its own process as the single-process reference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from adaptertool.training.data import Batch, Example, build_dataset
from adaptertool.training.distributed import SINGLE, Group, environment_group, parallelize, shard_block, start, stop
from adaptertool.training.fourbit import FourBitWeight
from adaptertool.training.loop import LoopConfig, train_loop
from adaptertool.training.lora import LoraSpec
from adaptertool.training.weights import load_decoder

# (parallel, base dtype, 4-bit base, gradient checkpointing), each at --grad-accum 2
CASES = [(parallel, dtype, qlora, checkpointing)
         for parallel in ("ddp", "fsdp")
         for dtype, qlora, checkpointing in (("float32", False, False), ("bfloat16", False, True), ("float32", True, True))]
GRAD_ACCUM = 2


def batches(vocab: int) -> list[Batch]:
    """Rows of different lengths with masked prompts: the processes see different target counts."""
    g = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(16):
        length = int(torch.randint(4, 13, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        masked = int(torch.randint(1, 4, (1,), generator=g))
        examples.append(Example(ids, [-100] * masked + ids[masked:]))
    return build_dataset(examples, seq_len=16, batch_size=2, packing=False, pad_id=0, seed=0).batches


def one_step(base: Path, case: tuple[str, str, bool, bool], *, group: Group = SINGLE,
             device: torch.device = torch.device("cpu")) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The LoRA gradient of one step of ``2 x GRAD_ACCUM`` micro-batches (split over the processes),
    and the local and whole bytes of the 4-bit codes."""
    parallel, dtype, qlora, checkpointing = case
    shard = shard_block(group, device, replicate_nodes=False) if parallel == "fsdp" and group.world > 1 else None
    model = load_decoder(base, lora=LoraSpec(rank=4, alpha=8.0, dropout=0.0), qlora=qlora, dtype=getattr(torch, dtype),
                         device="cpu", seed=0, gradient_checkpointing=checkpointing, shard=shard)
    # B = 0 (PEFT's start) would leave every A gradient zero: start from a random B
    g = torch.Generator().manual_seed(1)
    start_state = {k: torch.randn(v.shape, generator=g) * 0.1 if "lora_B" in k else v
                   for k, v in model.adapter_state_dict().items()}
    model.load_adapter_state_dict(start_state)
    replicas = parallelize(model, parallel if group.world > 1 else None, device)
    cfg = LoopConfig(max_steps=1, grad_accum=GRAD_ACCUM * 2 // group.world, lr=1.0, optim="sgd", max_grad_norm=0.0,
                     schedule="constant", seed=0)
    train_loop(model, batches(int(model.config.vocab_size)), cfg=cfg, device=device, adapter_config={}, fingerprint={},
               replicas=replicas, group=group)
    after = model.adapter_state_dict()
    codes = [m.packed for m in model.modules() if isinstance(m, FourBitWeight)]
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in codes)
    return {k: start_state[k] - after[k] for k in after}, {"local": local, "whole": sum(p.numel() for p in codes)}


def main(base: Path, out: Path) -> None:
    group = environment_group()
    device = start(group, "cpu", timeout_s=120)
    try:
        for i, case in enumerate(CASES):
            grads, codes = one_step(base, case, group=group, device=device)
            if group.main:
                save_file(grads, out / f"case{i}.safetensors")
            (out / f"codes{i}.rank{group.rank}.json").write_text(json.dumps(codes))
        group.barrier()
    finally:
        stop()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

"""train: a LoRA/QLoRA adapter from JSONL data, with the native loop (``adaptertool.ops.train``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from adaptertool.api.arguments import OutPath, Source, progress_on
from adaptertool.errors import OptionError
from adaptertool.ops.sources import local_source

if TYPE_CHECKING:
    from adaptertool.ops.train import TrainReport

__all__ = ["train"]


def train(base: Source, data: OutPath, out: OutPath, *, eval: OutPath | None = None, rank: int = 16,
          alpha: float | None = None, dropout: float = 0.05, targets: Sequence[str] = ("all-linear",),
          rslora: bool = False, dora: bool = False, experts: str = "per-expert", router_aux_loss_coef: float | None = None,
          qlora: bool = False, gradient_checkpointing: bool = False,
          epochs: int | None = None, max_steps: int | None = None, batch_size: int = 4, grad_accum: int = 1,
          lr: float = 2e-4, seq_len: int = 512, packing: bool = True, warmup_steps: int | None = None,
          warmup_ratio: float | None = None, schedule: str = "cosine", weight_decay: float = 0.0,
          max_grad_norm: float = 1.0, optim: str = "adamw", eval_every: int = 0, save_every: int = 0,
          checkpoint_dir: OutPath | None = None, resume: OutPath | None = None, seed: int = 0, device: str = "auto",
          bf16: bool = True, devices: int | None = None, parallel: str = "auto", replicate_nodes: bool = False,
          dist_timeout: float = 1800.0, report_to: Sequence[str] = (), force: bool = False,
          progress: bool | None = None) -> TrainReport:
    """Train a LoRA (or QLoRA) adapter on BASE with the JSONL examples in DATA (``adaptertool train``).

    The keyword arguments are the command's options (``eval`` is ``--eval``, held-out JSONL). This
    process trains alone, or as one process of a job torchrun started (then ``devices``, if given,
    must match the processes it started on this node); to start several processes, use the CLI's
    ``--devices N`` or torchrun.

    Raises:
        InputError, OptionError, OutputError, HubError: see docs/api.md; ProcessError (and its
        CollectiveError) for a failure of one process of a multi-process job.
    """
    from adaptertool.ops.train import TrainConfig, train as run

    _check_devices(devices)
    shown = progress_on(progress)
    cfg = TrainConfig(
        base=local_source(base, progress=shown), data=Path(data), out=Path(out), eval_data=None if eval is None else Path(eval),
        rank=rank, alpha=alpha, dropout=dropout, targets=tuple(targets), rslora=rslora, dora=dora, experts=experts,
        router_aux_loss_coef=router_aux_loss_coef, qlora=qlora,
        gradient_checkpointing=gradient_checkpointing, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
        grad_accum=grad_accum, lr=lr, seq_len=seq_len, packing=packing, warmup_steps=warmup_steps,
        warmup_ratio=warmup_ratio, schedule=schedule, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
        optim=optim, eval_every=eval_every, save_every=save_every,
        checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir),
        resume=None if resume is None else Path(resume), seed=seed, device=device, bf16=bf16, parallel=parallel,
        replicate_nodes=replicate_nodes, dist_timeout=dist_timeout, report_to=tuple(report_to), force=force,
    )
    return run(cfg, progress=shown)


def _check_devices(devices: int | None) -> None:
    """Refuse a ``devices`` this process cannot honour: starting processes is the CLI's (train/launch.py).

    Raises:
        OptionError: devices > 1 outside torchrun, or not the number torchrun started on this node.
    """
    if devices is not None and devices < 1:
        raise OptionError(f"--devices must be at least 1, not {devices}")
    if "WORLD_SIZE" not in os.environ:
        if devices is not None and devices > 1:
            raise OptionError(f"devices={devices} starts {devices} processes, which the Python API does not do: run "
                              f"`adaptertool train ... --devices {devices}`, or this script under torchrun "
                              f"(torchrun --nproc-per-node {devices} script.py)")
        return
    started = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if devices is not None and devices != started:
        raise OptionError(f"--devices {devices}, but torchrun started {started} processes on this node; "
                          "give one or the other")

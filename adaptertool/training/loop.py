"""The training loop: one function that reads top to bottom (after nanoGPT's train.py).

Each optimizer step takes ``grad_accum`` micro-batches. The loss of a step is the mean token
cross-entropy over all its target tokens::

    loss = sum_{micro-batches} sum_{targets t} -log softmax(logits_{t-1})[label_t]  /  n_targets(step)

so accumulating k micro-batches gives the same gradient as one batch k times larger (a MoE decoder
adds ``router_aux_loss_coef`` x its router load-balancing loss averaged over the step's forwards).
Then: clip the gradient norm, set the learning rate from :mod:`adaptertool.training.schedule`, step the optimizer.
The data order is a pure function of (seed, epoch) and the global RNG (dropout) is seeded inside a
forked RNG context and saved in checkpoints, so an interrupted run resumed from a checkpoint ends
with the same adapter, bit for bit, as an uninterrupted one (on the same device).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from tqdm.auto import tqdm

from adaptertool.errors import AdapterToolError, OptionError
from adaptertool.training.data import IGNORE, Batch, epoch_order
from adaptertool.training.distributed import SINGLE, Group, Replicas, full_tensor, shard_like
from adaptertool.training.schedule import lr_factor
from adaptertool.training.state import TrainState, save_state

if TYPE_CHECKING:
    import torch

    from adaptertool.training.model import Decoder

__all__ = ["OPTIMIZERS", "LoopConfig", "LoopResult", "evaluate", "make_optimizer", "train_loop"]

OPTIMIZERS = ("adamw", "sgd", "adamw8bit", "paged_adamw")


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    max_steps: int  # optimizer steps in the whole run
    max_micro: int | None = None  # stop after this many micro-batches (epochs x batches); None: max_steps only
    grad_accum: int = 1
    lr: float = 2e-4
    warmup: int = 0
    schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    optim: str = "adamw"
    eval_every: int = 0  # 0: only at the end
    save_every: int = 0  # 0: no checkpoints
    keep_checkpoints: int = 2
    seed: int = 0
    bf16: bool = False  # autocast the forward to bfloat16 (CUDA)


@dataclass(frozen=True, kw_only=True)
class LoopResult:
    steps: int
    tokens: int
    train_loss: float  # the last step's
    eval_loss: float | None
    seconds: float  # this process's time in the loop, evals included (a resumed run: only its own part)
    tokens_per_s: float  # this process's tokens over its time in the loop less evals
    log: list[str] = field(default_factory=list)  # the whole run's JSONL log lines
    last_checkpoint: str | None = None


def make_optimizer(name: str, params: list[torch.nn.Parameter], *, lr: float, weight_decay: float,
                   device: torch.device) -> torch.optim.Optimizer:
    """AdamW (torch), SGD with momentum 0.9 (torch), or bitsandbytes' 8-bit / paged AdamW.

    Raises:
        AdapterToolError: an unknown name, bitsandbytes missing, or paged AdamW off CUDA.
    """
    import torch

    if name == "adamw":  # fused: one kernel over all tensors, a fifth of the for-loop version's time on the CPU
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name not in OPTIMIZERS:
        raise OptionError(f"--optim must be one of {', '.join(OPTIMIZERS)}, not {name!r}")
    if name == "paged_adamw" and device.type != "cuda":
        raise OptionError("--optim paged_adamw pages optimizer state through CUDA unified memory and needs a "
                          "CUDA device; use --optim adamw or adamw8bit on the CPU")
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise OptionError(f"--optim {name} needs bitsandbytes (pip install bitsandbytes); or use --optim adamw") from err
    cls = bnb.optim.AdamW8bit if name == "adamw8bit" else bnb.optim.PagedAdamW
    return cls(params, lr=lr, weight_decay=weight_decay)


def train_loop(model: Decoder, batches: list[Batch], *, cfg: LoopConfig, device: torch.device,
               adapter_config: dict[str, Any], fingerprint: dict[str, Any], eval_batches: list[Batch] | None = None,
               checkpoint_dir: Path | None = None, resume: TrainState | None = None, log_path: Path | None = None,
               progress: bool = False, replicas: Replicas | None = None, group: Group = SINGLE,
               on_record: Callable[[dict[str, Any]], None] | None = None) -> LoopResult:
    """Train the model's trainable (LoRA) parameters on ``batches``; see the module docstring.

    ``log_path`` receives the JSONL log as it grows (rewritten from the checkpoint's on resume), and
    ``on_record`` each step's record (the metrics trackers).
    On several processes (``group``), ``replicas`` is the model under DDP or FSDP2 and every
    process runs this with the same arguments; only the first writes checkpoints and the log.

    Raises:
        AdapterToolError: a resume whose options differ, or a NaN/Inf loss or gradient (the message
            names the last good checkpoint).
    """
    import torch

    if resume is not None:
        _check_fingerprint(resume.fingerprint, fingerprint)
    replicas = replicas or Replicas(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg.optim, params, lr=cfg.lr, weight_decay=cfg.weight_decay, device=device)
    cuda = [device.index or 0] if device.type == "cuda" else []
    per_step = cfg.grad_accum * group.world  # micro-batches per optimizer step, across the job
    # Seeding dropout here must not leak into the caller's RNG: fork it.
    with torch.random.fork_rng(devices=cuda), contextlib.ExitStack() as closing:
        torch.manual_seed(cfg.seed + group.rank)  # each process its own dropout masks
        step, micro, tokens, log = 0, 0, 0, []
        if resume is not None:
            step, micro, tokens, log = resume.step, resume.micro, resume.tokens, list(resume.log)
            model.load_adapter_state_dict(resume.adapter)
            optimizer.load_state_dict({"state": _shard_optimizer_state(resume.optimizer, params),
                                       "param_groups": optimizer.state_dict()["param_groups"]})
            _set_rng(_rank_rng(resume.rng, group.rank))
        writes = group.main
        log_file = closing.enter_context(_open_log(log_path, log)) if log_path is not None and writes else None
        last_checkpoint = None
        start_tokens, clock = tokens, time.perf_counter()
        loss_value, eval_loss, eval_seconds = math.nan, None, 0.0
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
        stream = _micro_batches(batches, seed=cfg.seed, start=micro)
        bar = closing.enter_context(tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step",
                                         disable=not (progress and writes)))
        model.train()
        while step < cfg.max_steps and (cfg.max_micro is None or micro < cfg.max_micro):
            t0 = time.perf_counter()
            count = per_step if cfg.max_micro is None else min(per_step, cfg.max_micro - micro)
            step_batches = [next(stream) for _ in range(count)]
            micro += count
            n_targets = max(1, sum(b.targets for b in step_batches))
            lr = cfg.lr * lr_factor(step, total_steps=cfg.max_steps, warmup=cfg.warmup, schedule=cfg.schedule)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for batch, weight, last in _my_share(step_batches, group):
                with contextlib.nullcontext() if last else replicas.local_only():
                    with autocast:
                        # A MoE router's load-balancing loss is one number per forward, not a sum over
                        # tokens: weighted by n_targets / micro-batches it becomes coef x (its mean over the
                        # step's forwards) after the division below, the same however the step is split
                        # into micro-batches and processes; one forward gives transformers' CE mean + coef x aux.
                        loss = _loss_sum(replicas, batch, device, aux_weight=n_targets / len(step_batches))
                        # DDP and FSDP2 average the processes' gradients: x world makes it their sum
                        loss = loss * group.world / n_targets if weight else loss * 0.0
                    loss.backward()
                loss_sum += loss.detach()
            # The one host-device sync of the step: the log needs the number, the NaN check too.
            loss_value = float(group.sum(loss_sum)) / group.world
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf))
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                raise _diverged(loss_value, grad_norm, step + 1, last_checkpoint)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_tokens = sum(b.tokens for b in step_batches)
            tokens += step_tokens
            record = {"step": step, "epoch": round(micro / len(batches), 4), "loss": loss_value, "lr": lr,
                      "grad_norm": grad_norm, "tokens": tokens,
                      "tokens_per_s": round(step_tokens / max(time.perf_counter() - t0, 1e-9), 1)}
            done = step >= cfg.max_steps or (cfg.max_micro is not None and micro >= cfg.max_micro)
            if eval_batches and (done or (cfg.eval_every and step % cfg.eval_every == 0)):
                t_eval = time.perf_counter()
                eval_loss = evaluate(model, eval_batches, device=device, bf16=cfg.bf16, replicas=replicas, group=group)
                record["eval_loss"] = eval_loss
                model.train()
                eval_seconds += time.perf_counter() - t_eval
            log.append(json.dumps(record))
            if log_file is not None:
                log_file.write(log[-1] + "\n")
                log_file.flush()
            if on_record is not None and writes:
                on_record(record)
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            if checkpoint_dir is not None and cfg.save_every and step % cfg.save_every == 0 and not done:
                # every process takes part in gathering the state; the first writes it
                adapter, optimizer_state = model.adapter_state_dict(), _whole_optimizer_state(optimizer)
                rng = _job_rng(group.gather(_get_rng(device)))
                if writes:
                    state = TrainState(step=step, micro=micro, tokens=tokens, fingerprint=fingerprint, adapter=adapter,
                                       optimizer=optimizer_state, rng=rng, log=list(log))
                    last_checkpoint = save_state(checkpoint_dir, state, adapter_config, keep=cfg.keep_checkpoints)
    seconds = time.perf_counter() - clock
    return LoopResult(steps=step, tokens=tokens, train_loss=loss_value, eval_loss=eval_loss, seconds=seconds,
                      tokens_per_s=(tokens - start_tokens) / max(seconds - eval_seconds, 1e-9), log=log,
                      last_checkpoint=str(last_checkpoint) if last_checkpoint else None)


def _my_share(batches: list[Batch], group: Group) -> Iterator[tuple[Batch, bool, bool]]:
    """``(batch, counts, last)`` for this process's passes of a step: every ``world``-th batch from
    its rank on, padded with zero-weight passes so that every process runs as many forward and
    backward passes as the others (a collective waiting for a pass that never comes would hang)."""
    mine = batches[group.rank::group.world]
    passes = -(-len(batches) // group.world)
    for i in range(passes):
        yield (mine[i], True, i == passes - 1) if i < len(mine) else (batches[0], False, i == passes - 1)


def _check_fingerprint(saved: dict[str, Any], current: dict[str, Any]) -> None:
    changed = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if changed:
        hint = (f" (grad_accum: micro-batches per step across all processes, --grad-accum x processes, "
                f"{saved.get('grad_accum')} in the checkpoint)" if "grad_accum" in changed else "")
        raise OptionError(f"--resume: the checkpoint was made with different {', '.join(changed)}{hint}; "
                          "resume with the options (and data) of the interrupted run")


def _diverged(loss: float, grad_norm: float, step: int, checkpoint: Path | None) -> AdapterToolError:
    what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", grad_norm)
    where = (f"the last good checkpoint is {checkpoint} (resume with --resume {checkpoint}, perhaps with a lower --lr)"
             if checkpoint is not None else "no checkpoint was saved before it (see --save-every)")
    return AdapterToolError(f"the {what} became {value} at step {step}; training stopped; {where}")


def evaluate(model: Decoder, batches: list[Batch], *, device: torch.device, bf16: bool = False,
             replicas: Replicas | None = None, group: Group = SINGLE) -> float:
    """Mean token cross-entropy over all target tokens of ``batches`` (dropout off, no gradients);
    on several processes each takes its share and the sums are added up."""
    import torch

    replicas = replicas or Replicas(model)
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for batch, counts, _ in _my_share(batches, group):
            loss = _loss_sum(replicas, batch, device).double()
            total += loss if counts else 0.0 * loss
    return float(group.sum(total)) / max(1, sum(b.targets for b in batches))


def _loss_sum(replicas: Replicas, batch: Batch, device: torch.device, *, aux_weight: float = 0.0) -> torch.Tensor:
    """Summed cross-entropy of the batch's targets: position t predicts label t + 1. The model's
    loss_sum never builds the (B, T, vocab) logits, and runs its head only where there is a target.
    A MoE decoder adds ``aux_weight x coef x`` its router load-balancing loss (none in evaluation)."""
    import torch

    ids = batch.input_ids.to(device, non_blocking=True)
    mask = None if batch.attention_mask is None else batch.attention_mask.to(device, non_blocking=True)
    targets = torch.cat([batch.labels[:, 1:], torch.full_like(batch.labels[:, :1], IGNORE)], dim=1).to(device)
    return replicas.loss_sum(ids, targets, mask, aux_weight)


def _micro_batches(batches: list[Batch], *, seed: int, start: int) -> Iterator[Batch]:
    """Micro-batches from position ``start`` on, epoch after epoch, each epoch in its own order."""
    epoch, index = divmod(start, len(batches))
    while True:
        order = epoch_order(len(batches), seed=seed, epoch=epoch)
        for i in order[index:]:
            yield batches[i]
        epoch, index = epoch + 1, 0


def _get_rng(device: torch.device) -> dict[str, torch.Tensor]:
    import torch

    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states[f"cuda.{device.index or 0}"] = torch.cuda.get_rng_state(device)
    return states


def _job_rng(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Every process's RNG states for a checkpoint: the first's under their own names (as a
    single-process run saves them), process r's as ``rank{r}/NAME``."""
    job = dict(states[0])
    for rank, own in enumerate(states[1:], 1):
        job.update({f"rank{rank}/{name}": state for name, state in own.items()})
    return job


def _rank_rng(states: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """This process's states from :func:`_job_rng`'s; none for a process the saving job did not
    have (its dropout keeps the seed + rank start)."""
    if rank == 0:
        return {name: state for name, state in states.items() if "/" not in name}
    prefix = f"rank{rank}/"
    return {name.removeprefix(prefix): state for name, state in states.items() if name.startswith(prefix)}


def _whole_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's per-parameter state with FSDP2 shards gathered whole (every process calls this)."""
    return {index: {key: full_tensor(value) if _is_tensor(value) else value for key, value in entry.items()}
            for index, entry in optimizer.state_dict()["state"].items()}


def _shard_optimizer_state(state: dict[Any, Any], params: list[torch.nn.Parameter]) -> dict[Any, Any]:
    """A checkpoint's whole optimizer state laid out as the parameters are (sharded under FSDP2)."""
    out = {}
    for index, entry in state.items():
        param = params[int(index)]
        out[index] = {key: shard_like(value, param) if _is_tensor(value) and value.shape == param.shape else value
                      for key, value in entry.items()}
    return out


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def _set_rng(states: dict[str, torch.Tensor]) -> None:
    import torch

    for name, state in states.items():
        if name == "cpu":
            torch.set_rng_state(state)
        elif torch.cuda.is_available():
            torch.cuda.set_rng_state(state, int(name.split(".")[1]))


def _open_log(path: Path, lines: list[str]) -> TextIO:
    """The live JSONL log, rewritten with the lines up to a resumed checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    log_file = path.open("w", encoding="utf-8")
    log_file.writelines(line + "\n" for line in lines)
    return log_file


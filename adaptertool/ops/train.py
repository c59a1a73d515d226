"""train: a LoRA / QLoRA adapter trained on a safetensors checkpoint with our own small loop.

Recipe: check the options and OUT, read the tokenizer and the data (a malformed line fails here,
before the model loads), load the decoder with fresh LoRA layers (NF4 base with ``qlora``), run
:func:`adaptertool.training.loop.train_loop`, then write OUT atomically: the PEFT adapter
(adapter_config.json with ``base_model_name_or_path`` = BASE as given, adapter_model.safetensors),
the JSONL log and, when matplotlib imports, loss.png. Tokenizer files are not copied: a PEFT
adapter names its base, whose tokenizer it was trained with (PEFT's save_pretrained does the same).

Checkpoints (``save_every``) and the live log go to ``checkpoint_dir``, by default ``OUT.checkpoints``
beside OUT; that default folder is removed once OUT is complete, an explicit one is kept. A failed
or interrupted run keeps it, so ``resume`` can continue from its newest checkpoint.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from adaptertool.errors import CollectiveError, InputError, OptionError
from adaptertool.io import (
    TensorSpec,
    check_output,
    dtype_code,
    read_json,
    staged_output,
    write_adapter,
)
from adaptertool.io.hub_ids import source_name
from adaptertool.ops.measure import Stopwatch, peak_rss_bytes
from adaptertool.ops.options import check_device, resolve_device
from adaptertool.training.data import (
    Dataset,
    DataStats,
    TextTokenizer,
    build_dataset,
    parse_records,
    tokenize_records,
)
from adaptertool.training.distributed import (
    PARALLEL,
    SINGLE,
    Group,
    choose_parallel,
    environment_group,
    first_line,
    parallelize,
    resident_bytes,
    shard_block,
    start,
    stop,
)
from adaptertool.training.loop import (
    OPTIMIZERS,
    LoopConfig,
    LoopResult,
    evaluate,
    train_loop,
)
from adaptertool.training.schedule import SCHEDULES, warmup_steps
from adaptertool.training.state import latest_checkpoint
from adaptertool.training.trackers import REPORT_TO, TENSORBOARD_DIR, Trackers

if TYPE_CHECKING:
    from adaptertool.training.lora import LoraSpec

__all__ = ["TrainConfig", "TrainReport", "checkpoint_folder", "train"]

LOG_FILE = "train_log.jsonl"
PLOT_FILE = "loss.png"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers, from glibc's malloc.h


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    base: Path
    data: Path
    out: Path
    eval_data: Path | None = None
    rank: int = 16
    alpha: float | None = None  # None: the rank (scaling 1), as init writes and extract/convert/combine produce
    dropout: float = 0.05
    targets: tuple[str, ...] = ("all-linear",)
    rslora: bool = False
    dora: bool = False
    experts: str = "per-expert"  # MoE expert LoRAs: per-expert Linears (target_modules) or fused (target_parameters)
    router_aux_loss_coef: float | None = None  # MoE load-balancing loss weight; None: config.json's
    qlora: bool = False
    gradient_checkpointing: bool = False
    epochs: int | None = None  # None and no max_steps: one epoch
    max_steps: int | None = None  # wins over epochs when both are given
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    seq_len: int = 512
    packing: bool = True
    warmup_steps: int | None = None
    warmup_ratio: float | None = None
    schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    optim: str = "adamw"
    eval_every: int = 0  # 0: eval only at the end
    save_every: int = 0  # 0: no checkpoints
    checkpoint_dir: Path | None = None  # None: OUT.checkpoints beside OUT, removed on success
    resume: Path | None = None  # a checkpoint, or a checkpoint folder (its newest step-*)
    seed: int = 0
    device: str = "auto"
    bf16: bool = True  # bf16 weights and autocast on CUDA; the CPU always computes in float32
    parallel: str = "auto"  # on several processes: ddp, fsdp, or auto (from the base's size)
    replicate_nodes: bool = False  # fsdp on several nodes: shard within each node, replicate across them
    dist_timeout: float = 1800.0  # seconds a collective may wait for the other processes
    report_to: tuple[str, ...] = ()  # metrics trackers besides train_log.jsonl: tensorboard, wandb
    force: bool = False

    def __post_init__(self) -> None:
        positive = {"--rank": self.rank, "--batch-size": self.batch_size, "--grad-accum": self.grad_accum,
                    "--seq-len": self.seq_len}
        for flag, value in positive.items():
            if value < 1:
                raise OptionError(f"{flag} must be at least 1, not {value}")
        for flag, value in {"--epochs": self.epochs, "--max-steps": self.max_steps}.items():
            if value is not None and value < 1:
                raise OptionError(f"{flag} must be at least 1, not {value}")
        for flag, value in {"--eval-every": self.eval_every, "--save-every": self.save_every,
                            "--weight-decay": self.weight_decay, "--max-grad-norm": self.max_grad_norm}.items():
            if value < 0:
                raise OptionError(f"{flag} must be >= 0, not {value}")
        if not self.lr > 0:
            raise OptionError(f"--lr must be positive, not {self.lr}")
        if self.router_aux_loss_coef is not None and not self.router_aux_loss_coef >= 0:
            raise OptionError(f"--router-aux-loss-coef must be >= 0, not {self.router_aux_loss_coef}")
        if self.schedule not in SCHEDULES:
            raise OptionError(f"--schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}")
        if self.optim not in OPTIMIZERS:
            raise OptionError(f"--optim must be one of {', '.join(OPTIMIZERS)}, not {self.optim!r}")
        check_device(self.device)
        if self.parallel not in PARALLEL:
            raise OptionError(f"--parallel must be one of {', '.join(PARALLEL)}, not {self.parallel!r}")
        if not self.dist_timeout > 0:
            raise OptionError(f"--dist-timeout must be positive, not {self.dist_timeout}")
        for name in self.report_to:
            if name not in REPORT_TO:
                raise OptionError(f"--report-to must be one of {', '.join(REPORT_TO)}, not {name!r}")
        warmup_steps(1, steps=self.warmup_steps, ratio=self.warmup_ratio)  # validates both
        self.lora()  # validates rank, alpha, dropout, targets

    def lora(self) -> LoraSpec:
        from adaptertool.training.lora import LoraSpec

        return LoraSpec(rank=self.rank, alpha=float(self.alpha if self.alpha is not None else self.rank),
                        dropout=self.dropout, targets=tuple(self.targets), rslora=self.rslora, dora=self.dora,
                        experts=self.experts)


@dataclass(frozen=True, kw_only=True)
class TrainReport:
    out: str
    files: list[str]
    device: str
    steps: int
    epochs: float  # passes over the training data
    tokens: int  # real tokens trained on (a resumed run counts the whole run)
    train_loss: float  # the last step's
    eval_loss: float | None  # at the end
    eval_loss_start: float | None  # before training (not measured on resume)
    trainable_params: int
    data: DataStats
    eval_data: DataStats | None = None
    resumed_from: str | None = None
    checkpoint_dir: str | None = None  # kept checkpoints, when an explicit --checkpoint-dir
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    tokens_per_s: float = 0.0  # the job's training tokens over its training time
    peak_rss_bytes: int = 0  # this process's
    model_bytes: int = 0  # this process's share of the model: base (its shard under fsdp), adapter, buffers
    peak_vram_bytes: int = 0
    processes: int = 1
    parallel: str | None = None  # ddp or fsdp on several processes
    rank: int = 0  # this process's; only the first writes OUT


def train(cfg: TrainConfig, *, progress: bool = False) -> TrainReport:
    """Train a LoRA adapter on ``cfg.base`` with ``cfg.data`` and write it to ``cfg.out``.

    Started by torchrun (its variables in the environment), every process runs this with the same
    arguments: each joins the job, trains on its share of every step, and the first writes OUT.

    Raises:
        AdapterToolError: bad options, a malformed data line (with its line number), a base the
            decoder does not support, a resume with other options, or a NaN/Inf loss (OUT is not
            written; the message names the last good checkpoint).
        CollectiveError: on several processes, a collective that failed (another process died or
            timed out); the message names the last checkpoint.
    """
    group = environment_group()
    if group is None:
        return _train(cfg, None, resolve_device(cfg.device), progress)
    device = start(group, cfg.device, timeout_s=cfg.dist_timeout)
    try:
        return _train(cfg, group, device, progress)
    except (RuntimeError, OSError) as err:
        if not _collective_failure(err):
            raise
        folder = latest_checkpoint(checkpoint_folder(cfg.out, cfg.checkpoint_dir))
        last = f"the last checkpoint, {folder}, is intact (--resume {folder})" if folder else "no checkpoint was written"
        raise CollectiveError(f"rank {group.rank}: a collective operation failed ({first_line(err)}); another "
                              f"process probably exited (see its output: out of memory?) or --dist-timeout passed; "
                              f"{last}") from err
    finally:
        stop()


def _train(cfg: TrainConfig, job: Group | None, device: torch.device, progress: bool) -> TrainReport:
    """The run on this process; ``job`` None: a process not started by torchrun."""
    from adaptertool.training.state import load_state
    from adaptertool.training.weights import load_decoder

    group = job or SINGLE
    clock = Stopwatch()
    inputs = [p for p in (cfg.base, cfg.data, cfg.eval_data) if p is not None]
    _check_order(cfg)
    check_output(cfg.out, force=cfg.force, inputs=inputs)
    model_config, tok = _tokenizer(cfg.base)
    _check_seq_len(cfg, model_config)
    dataset = _dataset(cfg.data, tok, cfg, shuffle_seed=cfg.seed)
    evalset = _dataset(cfg.eval_data, tok, cfg, shuffle_seed=0) if cfg.eval_data is not None else None
    loop_cfg = _loop_config(cfg, len(dataset.batches), device, group)
    resume = load_state(cfg.resume) if cfg.resume is not None else None
    cuda_bf16 = device.type == "cuda" and cfg.bf16
    dtype = torch.bfloat16 if cuda_bf16 else torch.float32
    notes: list[str] = []
    parallel, shard = None, None
    if job is not None:  # under torchrun, even of one process (FSDP2 on one GPU)
        parallel, why = choose_parallel(cfg.parallel, base_bytes=_base_bytes(cfg.base, qlora=cfg.qlora, dtype=dtype),
                                        device=device, group=group)
        notes.append(f"{group.world} processes, {parallel}: {why}")
        if parallel == "fsdp":
            shard = shard_block(group, device, replicate_nodes=cfg.replicate_nodes)
    if device.type == "cpu":  # a 4-bit or FP8 base expands its weights on the fly too
        _tune_heap(transient_weights=cfg.qlora or parallel == "fsdp" or "quantization_config" in model_config)
    checkpoint_dir = checkpoint_folder(cfg.out, cfg.checkpoint_dir)
    fingerprint = _fingerprint(cfg, dataset.stats, loop_cfg, group)
    if group.main:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    with _trackers(cfg, group, checkpoint_dir, fingerprint) as on_record:  # before the load: a missing package fails fast
        # FSDP2 takes each block from the CPU as it is loaded and keeps this process's shard on the device
        model = load_decoder(cfg.base, lora=cfg.lora(), qlora=cfg.qlora, device="cpu" if shard else device, dtype=dtype,
                             seed=cfg.seed, gradient_checkpointing=cfg.gradient_checkpointing, shard=shard,
                             router_aux_loss_coef=cfg.router_aux_loss_coef)
        replicas = parallelize(model, parallel, device)
        adapter_config = model.adapter_config(base_model_name_or_path=source_name(cfg.base))
        eval_batches = evalset.batches if evalset is not None else None
        eval_start = (evaluate(model, eval_batches, device=device, bf16=cuda_bf16, replicas=replicas, group=group)
                      if eval_batches is not None and resume is None else None)
        result = train_loop(model, dataset.batches, cfg=loop_cfg, device=device, adapter_config=adapter_config,
                            fingerprint=fingerprint, eval_batches=eval_batches, checkpoint_dir=checkpoint_dir,
                            resume=resume, log_path=checkpoint_dir / LOG_FILE, progress=progress, replicas=replicas,
                            group=group, on_record=on_record)
    if device.type == "cpu":
        _release_heap()
    state = {k: v.detach() for k, v in model.adapter_state_dict().items()}  # every process takes part
    files: list[str] = []
    if group.main:
        files, written = _write_out(cfg, state, adapter_config, result, checkpoint_dir)
        notes += written
        if cfg.checkpoint_dir is None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
    group.barrier()  # no process leaves (ending the job) while the first still writes
    micro_per_step = cfg.grad_accum * group.world
    return TrainReport(
        out=str(cfg.out), files=files, device=str(device), steps=result.steps,
        epochs=round(min(result.steps * micro_per_step, loop_cfg.max_micro or math.inf) / len(dataset.batches), 4),
        tokens=result.tokens, train_loss=result.train_loss, eval_loss=result.eval_loss, eval_loss_start=eval_start,
        trainable_params=sum(v.numel() for v in state.values()),
        data=dataset.stats, eval_data=evalset.stats if evalset is not None else None,
        resumed_from=str(cfg.resume) if cfg.resume is not None else None,
        checkpoint_dir=str(cfg.checkpoint_dir) if cfg.checkpoint_dir is not None else None, notes=notes,
        seconds=clock.seconds, tokens_per_s=result.tokens_per_s, peak_rss_bytes=peak_rss_bytes(),
        peak_vram_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
        processes=group.world, parallel=parallel, rank=group.rank, model_bytes=resident_bytes(model),
    )


@contextlib.contextmanager
def _trackers(cfg: TrainConfig, group: Group, folder: Path,
              fingerprint: dict[str, Any]) -> Iterator[Callable[[dict[str, Any]], None] | None]:
    """The --report-to trackers' per-step callback (the first process's), closed with the run's outcome."""
    if not (cfg.report_to and group.main):
        yield None
        return
    trackers = Trackers(cfg.report_to, folder=folder, config=fingerprint, run_name=cfg.out.name)
    try:
        yield trackers.log
    except BaseException:
        trackers.close(failed=True)
        raise
    trackers.close()


def checkpoint_folder(out: Path, checkpoint_dir: Path | None) -> Path:
    """Where a run's checkpoints and live log go: --checkpoint-dir, else OUT.checkpoints beside OUT."""
    return checkpoint_dir or out.parent / f"{out.name}.checkpoints"


def _collective_failure(err: BaseException) -> bool:
    """Whether ``err`` is torch.distributed reporting a broken or timed-out collective."""
    return isinstance(err, torch.distributed.DistError) or any(
        text in str(err) for text in ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out"))


def _base_bytes(base: Path, *, qlora: bool, dtype: torch.dtype) -> int:
    """What the frozen base takes on a device once loaded: 16/32-bit tensors in ``dtype``, stored
    4-bit and FP8 codes as they are, and under ``qlora`` the block Linears at NF4's ~0.52 bytes a weight."""
    from adaptertool.io import open_checkpoint, torch_dtype

    total = 0
    with open_checkpoint(base) as ckpt:
        for name in ckpt:
            info = ckpt[name]
            numel = math.prod(info.shape)
            stored = torch_dtype(info.dtype)
            if not stored.is_floating_point or stored.itemsize == 1:  # 4-bit or FP8 codes stay as they are
                total += numel * stored.itemsize
            elif qlora and name.startswith("model.layers.") and name.endswith("proj.weight"):
                total += numel * 33 // 64  # 4-bit codes, one 8-bit absmax a 64-block, its nested scales
            else:
                total += numel * dtype.itemsize
    return total


def _tune_heap(*, transient_weights: bool) -> None:
    """Set glibc's malloc for the step's allocation pattern on the CPU (unless the user tuned it already).

    16-bit LoRA: every step allocates and frees the same MB-sized tensors. By default glibc hands
    freed memory at the heap's top back to the OS, and the next step faults it in again: ~100,000
    page faults a step at ~3 us each on SmolLM2 (a dropout mask took 3.2 ms instead of 0.9).
    Keeping freed memory (no trimming; blocks up to 256 MB from the heap) leaves the peak where it
    was, measured, and the faults at ~0.
    QLoRA expands a dense weight per layer in every forward and backward and frees it at once;
    kept in the heap, these blocks push QLoRA's peak above 16-bit LoRA's. A fixed 1 MiB mmap
    threshold returns them, at the price of fresh page faults. Measured on SmolLM2, 4 x 256 tokens:
    default 4.7 GB at 77 tokens/s, 4 MiB the same, 1 MiB 2.1 GB at 55 tokens/s, 128 KiB 1.9 GB at
    46 tokens/s (16-bit LoRA: 4.4 GB).
    FSDP2 gathers each block's weights for its forward and backward and frees them after: the same
    pattern. On the synthetic 1.2B model (2 processes, float32, 1 x 32 tokens) a process peaked at
    7.3 GB with freed memory kept, 4.6 GB with glibc's defaults and ~4.2 GB with the 1 MiB threshold.
    """
    user_set = any(name.startswith("MALLOC_") for name in os.environ) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")
    if not sys.platform.startswith("linux") or user_set:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl): nothing to tune
        return
    if transient_weights:
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    else:
        libc.mallopt(_M_TRIM_THRESHOLD, -1)  # -1: never trim (mallopt(3))
        libc.mallopt(_M_MMAP_THRESHOLD, 256 << 20)


def _release_heap() -> None:
    """Hand the heap's free memory, kept between steps by :func:`_tune_heap`, back to the OS once the loop is
    done: what is written after it (Python objects, matplotlib's plot) comes from fresh pages, not from there."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc (musl): nothing kept
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _tokenizer(base: Path) -> tuple[dict[str, Any], TextTokenizer]:
    """config.json and the tokenizer of the base model's folder."""
    folder = base if base.is_dir() else base.parent
    for name in ("config.json", "tokenizer.json"):
        if not (folder / name).is_file():
            raise InputError(f"{folder} has no {name}; train needs the model folder with its tokenizer "
                             "(tokenizer.json, as transformers saves it)")
    tokenizer_config = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    template = folder / "chat_template.jinja"
    model_config = read_json(folder / "config.json")
    tok = TextTokenizer.from_json((folder / "tokenizer.json").read_text(encoding="utf-8"),
                                  tokenizer_config=tokenizer_config, model_config=model_config,
                                  chat_template=template.read_text(encoding="utf-8") if template.is_file() else None,
                                  source=str(folder / "tokenizer.json"))
    return model_config, tok


def _check_seq_len(cfg: TrainConfig, model_config: dict[str, Any]) -> None:
    limit = model_config.get("max_position_embeddings")
    if isinstance(limit, int) and cfg.seq_len > limit:
        raise OptionError(f"--seq-len {cfg.seq_len} is longer than the model's max_position_embeddings ({limit})")


def _check_order(cfg: TrainConfig) -> None:
    # `train BASE OUT DATA` would otherwise say OUT exists and suggest --force, which replaces the data file.
    if not cfg.data.exists() and cfg.out.is_file():
        raise OptionError(f"DATA {cfg.data} does not exist and OUT {cfg.out} is a file: are they swapped? "
                          "the order is train BASE DATA OUT")


def _dataset(path: Path, tok: TextTokenizer, cfg: TrainConfig, *, shuffle_seed: int) -> Dataset:
    if not path.is_file():
        raise InputError(f"{path} does not exist or is not a file; expected a JSONL data file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); expected JSONL") from err
    records = parse_records(lines, source=str(path))
    examples, whole = tokenize_records(records, tok, source=str(path))
    return build_dataset(examples, seq_len=cfg.seq_len, batch_size=cfg.batch_size, packing=cfg.packing,
                         pad_id=tok.pad_id, seed=shuffle_seed, records=len(records), whole_chat_loss=whole)


def _loop_config(cfg: TrainConfig, n_batches: int, device: torch.device, group: Group) -> LoopConfig:
    """Steps from --max-steps, else from --epochs (a last step may take fewer micro-batches); a step
    takes --grad-accum micro-batches on every process."""
    max_micro = None if cfg.max_steps is not None else (cfg.epochs or 1) * n_batches
    total = cfg.max_steps if cfg.max_steps is not None else math.ceil(max_micro / (cfg.grad_accum * group.world))
    return LoopConfig(
        max_steps=total, max_micro=max_micro, grad_accum=cfg.grad_accum, lr=cfg.lr,
        warmup=warmup_steps(total, steps=cfg.warmup_steps, ratio=cfg.warmup_ratio), schedule=cfg.schedule,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, optim=cfg.optim, eval_every=cfg.eval_every,
        save_every=cfg.save_every, seed=cfg.seed, bf16=device.type == "cuda" and cfg.bf16,
    )


def _fingerprint(cfg: TrainConfig, stats: DataStats, loop_cfg: LoopConfig, group: Group) -> dict[str, Any]:
    """What shapes the run's trajectory: a resume must match it exactly. ``grad_accum`` is the job's
    micro-batches per step (--grad-accum x processes): a resume on another number of processes
    keeps it (2 processes with --grad-accum 1 continue as 1 with --grad-accum 2)."""
    lora = cfg.lora()
    # MoE settings only where set: checkpoints from before they existed still resume
    moe = {k: v for k, v in {"experts": lora.experts if lora.experts != "per-expert" else None,
                             "router_aux_loss_coef": cfg.router_aux_loss_coef}.items() if v is not None}
    return {"base": str(cfg.base), "data_tokens": stats.tokens, "data_batches": stats.batches,
            "rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout, "targets": list(lora.targets),
            "rslora": lora.rslora, "dora": lora.dora, "qlora": cfg.qlora, "batch_size": cfg.batch_size,
            "seq_len": cfg.seq_len, "packing": cfg.packing, "max_steps": loop_cfg.max_steps,
            "max_micro": loop_cfg.max_micro, "grad_accum": cfg.grad_accum * group.world, "lr": cfg.lr,
            "warmup": loop_cfg.warmup, "schedule": cfg.schedule, "weight_decay": cfg.weight_decay,
            "max_grad_norm": cfg.max_grad_norm, "optim": cfg.optim, "seed": cfg.seed, **moe}


def _write_out(cfg: TrainConfig, state: dict[str, torch.Tensor], adapter_config: dict[str, Any],
               result: LoopResult, checkpoint_dir: Path) -> tuple[list[str], list[str]]:
    """OUT, atomically: the adapter, the log, (when matplotlib imports) the loss plot and the
    TensorBoard events of --report-to tensorboard."""
    notes: list[str] = []
    specs = [TensorSpec(k, dtype_code(v.dtype), tuple(v.shape)) for k, v in state.items()]
    inputs = [p for p in (cfg.base, cfg.data, cfg.eval_data) if p is not None]
    with staged_output(cfg.out, force=cfg.force, inputs=inputs) as tmp:
        write_adapter(tmp, adapter_config, specs, state.__getitem__)
        (tmp / LOG_FILE).write_text("".join(line + "\n" for line in result.log), encoding="utf-8")
        if not _plot(tmp / PLOT_FILE, result.log):
            notes.append("matplotlib is not installed: no loss.png (pip install matplotlib)")
        if (checkpoint_dir / TENSORBOARD_DIR).is_dir():
            shutil.copytree(checkpoint_dir / TENSORBOARD_DIR, tmp / TENSORBOARD_DIR)
        files = sorted(p.name for p in tmp.iterdir())
    return files, notes


def _plot(path: Path, log: list[str]) -> bool:
    """Train (and eval) loss per step as a PNG; False when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    records = [json.loads(line) for line in log]
    figure = Figure(figsize=(7, 4))
    FigureCanvasAgg(figure)  # a canvas of our own: pyplot's global state stays untouched
    axes = figure.add_subplot()
    axes.plot([r["step"] for r in records], [r["loss"] for r in records], label="train")
    evals = [r for r in records if "eval_loss" in r]
    if evals:
        axes.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
    axes.set(xlabel="step", ylabel="loss", title="adaptertool train")
    axes.legend()
    figure.savefig(path, dpi=100)
    return True


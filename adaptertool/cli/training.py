"""The train command: a LoRA/QLoRA adapter from a JSONL dataset, with our own small training loop."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from adaptertool.cli.app import (
    alpha_option,
    cli,
    emit,
    force_option,
    human_bytes,
    human_count,
    json_option,
    progress_enabled,
    quiet_option,
)
from adaptertool.cli.sources import SourcePath


@cli.command("train")
@click.argument("base", type=SourcePath())
@click.argument("data", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--eval", "eval_data", type=click.Path(path_type=Path), default=None,
              help="Held-out JSONL: eval loss every --eval-every steps and at the end.")
@click.option("--rank", type=int, default=16, show_default=True, help="LoRA rank r.")
@alpha_option
@click.option("--dropout", type=float, default=0.05, show_default=True, help="LoRA dropout on the layer input.")
@click.option("--targets", multiple=True, default=("all-linear",), show_default=True, metavar="NAME",
              help="Modules to train: all-linear, or names matched as PEFT target_modules (repeatable).")
@click.option("--rslora/--no-rslora", default=False, show_default=True, help="Scale by alpha/sqrt(r) (rsLoRA).")
@click.option("--dora/--no-dora", default=False, show_default=True, help="Weight-decomposed LoRA (DoRA).")
@click.option("--experts", type=click.Choice(["per-expert", "fused"]), default="per-expert", show_default=True,
              help="MoE expert LoRAs: one per expert Linear (PEFT target_modules), or PEFT target_parameters "
                   "on the fused experts.")
@click.option("--router-aux-loss-coef", type=float, default=None,
              help="MoE: weight of the router load-balancing loss [default: config.json's router_aux_loss_coef].")
@click.option("--qlora/--no-qlora", default=False, show_default=True,
              help="Keep the base's Linear weights in NF4 (a 16-bit base is quantised at load).")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=False, show_default=True,
              help="Recompute each block in the backward: less memory, about a third more time.")
@click.option("--epochs", type=int, default=None, help="Passes over DATA [default: 1, unless --max-steps].")
@click.option("--max-steps", type=int, default=None, help="Optimizer steps (wins over --epochs).")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Sequences per micro-batch.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--lr", type=float, default=2e-4, show_default=True, help="Peak learning rate.")
@click.option("--seq-len", type=int, default=512, show_default=True,
              help="Tokens per sequence (packed block, or truncation length without packing).")
@click.option("--packing/--no-packing", default=True, show_default=True,
              help="Pack examples into --seq-len blocks, or pad length-grouped batches.")
@click.option("--warmup-steps", type=int, default=None, help="Linear warmup steps [default: 0].")
@click.option("--warmup-ratio", type=float, default=None, help="Warmup as a fraction of all steps instead.")
@click.option("--schedule", type=click.Choice(["cosine", "linear", "constant"]), default="cosine", show_default=True,
              help="Learning-rate decay after warmup.")
@click.option("--weight-decay", type=float, default=0.0, show_default=True, help="Decoupled weight decay.")
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True, help="Gradient clipping norm (0: off).")
@click.option("--optim", type=click.Choice(["adamw", "sgd", "adamw8bit", "paged_adamw"]), default="adamw",
              show_default=True, help="Optimizer (adamw8bit, paged_adamw: bitsandbytes; paged needs CUDA).")
@click.option("--eval-every", type=int, default=0, show_default=True, help="Eval every N steps (0: at the end only).")
@click.option("--save-every", type=int, default=0, show_default=True, help="Checkpoint every N steps (0: none).")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where checkpoints and the live log go (kept) [default: OUT.checkpoints, removed on success].")
@click.option("--resume", type=click.Path(exists=True, path_type=Path), default=None,
              help="Continue from a checkpoint (step-N folder, or a checkpoint dir: its newest).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds LoRA init, data order and dropout.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where to train.")
@click.option("--bf16/--no-bf16", default=True, show_default=True,
              help="On CUDA: bf16 base weights and autocast (the CPU always trains in float32).")
@click.option("--devices", type=click.IntRange(min=1), default=None,
              help="Train on N processes of this machine (N GPUs, or N CPU processes), started by torchrun's launcher.")
@click.option("--parallel", type=click.Choice(["auto", "ddp", "fsdp"]), default="auto", show_default=True,
              help="On several processes: ddp replicates the base, fsdp shards it (FSDP2); auto picks by its size.")
@click.option("--replicate-nodes/--no-replicate-nodes", default=False, show_default=True,
              help="fsdp on several nodes: shard within each node, replicate across nodes (HSDP).")
@click.option("--dist-timeout", type=float, default=1800.0, show_default=True,
              help="Seconds a collective waits for the other processes before the job fails.")
@click.option("--report-to", "report_to", multiple=True, type=click.Choice(["tensorboard", "wandb"]), metavar="NAME",
              help="Also log the metrics to tensorboard or wandb (repeatable; their packages are optional extras).")
@force_option
@json_option
@quiet_option
@click.pass_context
def train_cmd(ctx: click.Context, base: Path, data: Path, out: Path, eval_data: Path | None, devices: int | None,
              as_json: bool, quiet: bool, **options: Any) -> None:
    """Train a LoRA (or QLoRA) adapter on BASE with the JSONL examples in DATA.

    Example: adaptertool train ./SmolLM2-135M train.jsonl ./my-adapter --eval val.jsonl --epochs 2 --seq-len 512

    On several GPUs or machines: torchrun --nproc-per-node 8 -m adaptertool train ... (or --devices 8 on one machine).
    """
    if "WORLD_SIZE" not in os.environ and devices is not None and devices > 1:
        from adaptertool.ops.train import checkpoint_folder
        from adaptertool.training.launch import launch

        # the processes check the options; the first prints the report, the launcher any failure
        launch(_command_line(ctx), devices, checkpoint_dir=checkpoint_folder(out, options["checkpoint_dir"]))
        return
    from adaptertool.api.training import train

    report = train(base, data, out, eval=eval_data, devices=devices, progress=progress_enabled(quiet, as_json), **options)
    if report.rank == 0:
        emit(report, as_json, _train_text)


def _command_line(ctx: click.Context) -> list[str]:
    """This train command's arguments, rebuilt from the parsed values (for the processes it starts)."""
    args = ["--debug"] if ctx.find_root().params.get("debug") else []
    args.append(ctx.info_name or "train")
    for param in ctx.command.params:
        value = ctx.params[param.name]  # type: ignore[index]
        if isinstance(param, click.Argument):
            args.append(str(value))
        elif value is not None and ctx.get_parameter_source(param.name) is not ParameterSource.DEFAULT:  # type: ignore[arg-type]
            assert isinstance(param, click.Option)
            if param.is_flag:
                args.append(param.opts[0] if value else param.secondary_opts[0])
            else:
                args += [item for v in (value if param.multiple else [value]) for item in (param.opts[-1], str(v))]
    return args


def _train_text(r: Any) -> str:
    d = r.data
    cut = (f", {d.truncated} truncated to --seq-len ({d.truncated_tokens} tokens dropped)" if d.truncated else "")
    cut += f", {d.dropped} left without targets and skipped" if d.dropped else ""
    cut += f", {d.whole_chat_loss} conversations trained whole" if d.whole_chat_loss else ""
    evals = ""
    if r.eval_loss is not None:
        start = f"{r.eval_loss_start:.4f} -> " if r.eval_loss_start is not None else ""
        evals = f", eval loss {start}{r.eval_loss:.4f}"
    lines = [
        f"data: {d.records} records, {d.tokens} tokens ({d.target_tokens} trained on) in {d.batches} batches{cut}",
        (f"trained {human_count(r.trainable_params)} parameters for {r.steps} steps ({r.epochs:g} epochs, {r.tokens} tokens) "
         f"on {r.device}: train loss {r.train_loss:.4f}{evals}"),
        *(f"note: {note}" for note in r.notes),
        (f"wrote {r.out} ({', '.join(r.files)}) in {r.seconds:.1f} s, {r.tokens_per_s:.0f} tokens/s, "
         f"peak memory {human_bytes(r.peak_rss_bytes)}"
         + (f", peak VRAM {human_bytes(r.peak_vram_bytes)}" if r.peak_vram_bytes else "")
         + (f" (rank 0 of {r.processes}; its share of the model {human_bytes(r.model_bytes)})" if r.processes > 1 else "")),
    ]
    if r.checkpoint_dir:
        lines.append(f"checkpoints kept in {r.checkpoint_dir}")
    return "\n".join(lines)

"""The command line: parse, call one ops pipeline, render its report. Nothing else lives here.

stdout carries only the result (a short summary, or one JSON object with --json); logs, warnings
and progress bars go to stderr. A user-facing failure prints ``error: ...`` and exits 1; usage
errors exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from adaptertool import __version__
from adaptertool.errors import AdapterToolError
from adaptertool.io import parse_size, torch_dtype

# Pipelines are imported inside their commands: most pull in torch, whose import costs seconds
# that `info` and `verify` (headers only) should not pay.
if TYPE_CHECKING:
    from adaptertool.ops.info import InfoReport

F = TypeVar("F", bound=Callable[..., Any])

DTYPE_CODES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        # OSError here is the environment (disk full, permission denied), not a bug.
        except (AdapterToolError, OSError) as err:
            if ctx.params.get("debug"):
                traceback.print_exc()
            click.echo(f"error: {err}", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="adaptertool")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-v info, -vv debug).")
def cli(debug: bool, verbose: int) -> None:
    """Model surgery and adapter management over safetensors checkpoints, streamed shard by shard."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a summary.")(f)


def _quiet_option(f: F) -> F:
    return click.option("-q", "--quiet", is_flag=True, help="No progress bars.")(f)


def _force_option(f: F) -> F:
    return click.option("--force", is_flag=True, help="Replace OUT if it exists (only once the new one is complete).")(f)


def _shard_option(f: F) -> F:
    return click.option(
        "--max-shard-size", default="5GB", show_default=True, metavar="SIZE",
        help="Largest shard to write, e.g. 5GB, 500MB, 2GiB ('0' for a single file).",
    )(f)


def _progress(quiet: bool, as_json: bool = False) -> bool:
    return not quiet and not as_json and sys.stderr.isatty()


def _shard_bytes(text: str) -> int | None:
    size = parse_size(text)
    return None if size == 0 else size  # 0 (in any unit): one file


def _emit(report: Any, as_json: bool, summary: Callable[[Any], str]) -> None:
    click.echo(json.dumps(dataclasses.asdict(report), indent=2) if as_json else summary(report))


@cli.command("info")
@click.argument("path", type=click.Path(path_type=Path))
@_json_option
def info_cmd(path: Path, as_json: bool) -> None:
    """Show what a checkpoint or PEFT adapter holds.

    Example: adaptertool info ./SmolLM2-135M --json
    """
    from adaptertool.ops.info import info

    _emit(info(path), as_json, _info_text)


def _info_text(r: InfoReport) -> str:
    lines = [
        f"{r.path}: {r.format}, {len(r.files)} file(s)",
        f"  tensors {r.tensors}, parameters {_count(r.parameters)}, {_bytes(r.bytes)}",
        "  dtypes " + ", ".join(f"{code} x{n}" for code, n in r.dtypes.items()),
    ]
    if r.architecture:
        lines.append(f"  architecture {r.architecture}")
    a = r.adapter
    if a is not None:
        ranks = "/".join(map(str, a.ranks)) or "?"
        flags = "".join([" rslora" if a.rslora else "", " dora" if a.dora else ""])
        lines.append(f"  adapter {a.peft_type} r={a.rank} (ranks in tensors: {ranks}) alpha={a.alpha}{flags}")
        lines.append(f"  targets {', '.join(a.targets) or '-'} ({a.modules} modules)")
        if a.modules_to_save:
            lines.append(f"  modules_to_save {', '.join(a.modules_to_save)}")
        lines.append(f"  base model {a.base_model or 'unknown'}")
    return "\n".join(lines)


@cli.command("verify")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--nan/--no-nan", default=False, show_default=True, help="Also scan every float tensor for NaN/Inf.")
@_json_option
@_quiet_option
def verify_cmd(path: Path, nan: bool, as_json: bool, quiet: bool) -> None:
    """Check a checkpoint's headers, index, sizes and (with --nan) values.

    Example: adaptertool verify ./merged --nan
    """
    from adaptertool.ops.verify import verify

    report = verify(path, nan=nan, progress=_progress(quiet, as_json))
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    if as_json:
        _emit(report, True, str)
    elif report.ok:
        scanned = ", no NaN/Inf" if report.scanned else ""
        click.echo(f"ok: {report.path}: {report.tensors} tensors in {report.files} file(s), {_bytes(report.bytes)}{scanned}")
    for problem in report.problems:
        click.echo(f"error: {problem}", err=True)
    for bad in report.nonfinite:
        click.echo(f"error: {report.path}: tensor {bad.tensor} holds {bad.nan} NaN and {bad.inf} Inf values", err=True)
    if not report.ok:
        sys.exit(1)


@cli.command("reshard")
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@_shard_option
@click.option("--dtype", type=click.Choice(sorted(DTYPE_CODES)), default=None, help="Cast float tensors to this dtype [default: keep].")
@_force_option
@_json_option
@_quiet_option
def reshard_cmd(source: Path, out: Path, max_shard_size: str, dtype: str | None, force: bool, as_json: bool, quiet: bool) -> None:
    """Rewrite a checkpoint with other shard sizes or float dtype.

    Example: adaptertool reshard ./model ./model-2gb --max-shard-size 2GB
    """
    from adaptertool.ops.reshard import ReshardConfig, reshard

    cfg = ReshardConfig(source=source, out=out, max_shard_bytes=_shard_bytes(max_shard_size),
                        dtype=torch_dtype(DTYPE_CODES[dtype]) if dtype else None, force=force)
    _emit(reshard(cfg, progress=_progress(quiet, as_json)), as_json, lambda r: (
        f"wrote {r.out}: {len(r.files)} file(s), {r.tensors} tensors ({r.copied} copied, {r.cast} cast), "
        f"{_bytes(r.bytes_written)} in {r.seconds:.1f} s, peak memory {_bytes(r.peak_rss_bytes)}"
    ))


def _adapter_and_weight(text: str) -> tuple[Path, float]:
    # ADAPTER[:WEIGHT]; a colon followed by something that is not a number belongs to the path.
    path, sep, weight = text.rpartition(":")
    if sep:
        try:
            return Path(path), float(weight)
        except ValueError:
            pass
    return Path(text), 1.0


def _merge_options(f: F) -> F:
    for option in reversed([
        click.option("--scale", type=float, default=1.0, show_default=True, help="Multiply every adapter's weight by this."),
        click.option("--dtype", type=click.Choice(["auto", *sorted(DTYPE_CODES)]), default="auto", show_default=True,
                     help="Output float dtype; auto keeps the base's."),
        _shard_option,
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True,
                     help="Where deltas are computed (the output is the same; cuda is faster on big ranks)."),
        _force_option, _json_option, _quiet_option,
    ]):
        f = option(f)
    return f


def _merge_summary(verb: str) -> Callable[[Any], str]:
    def render(r: Any) -> str:
        counts = [f"{r.merged} tensors changed", f"{r.replaced} replaced" if r.replaced else "",
                  f"{r.copied} copied" if r.copied else "", f"{r.cast} cast to {r.dtype}" if r.cast else ""]
        return "\n".join([
            *(f"note: {note}" for note in r.notes),
            f"{verb} {len(r.adapters)} adapter(s) into {r.out}: {', '.join(c for c in counts if c)}; "
            f"{len(r.files)} file(s) in {r.seconds:.1f} s, peak memory {_bytes(r.peak_rss_bytes)}",
        ])

    return render


def _run_merge(base: Path, adapters: list[tuple[Path, float]], out: Path, *, subtract: bool, scale: float, dtype: str,
               max_shard_size: str, device: str, force: bool, as_json: bool, quiet: bool) -> None:
    from adaptertool.ops.merge import MergeConfig, merge

    cfg = MergeConfig(
        base=base, adapters=tuple(adapters), out=out, scale=scale, subtract=subtract,
        dtype=None if dtype == "auto" else torch_dtype(DTYPE_CODES[dtype]),
        max_shard_bytes=_shard_bytes(max_shard_size), device=device, force=force,
    )
    _emit(merge(cfg, progress=_progress(quiet, as_json)), as_json, _merge_summary("subtracted" if subtract else "merged"))


@cli.command("merge")
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("adapter", type=str)
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--add", "extra", multiple=True, metavar="ADAPTER[:WEIGHT]", help="Another adapter to merge in the same pass (repeatable).")
@_merge_options
def merge_cmd(base: Path, adapter: str, out: Path, extra: tuple[str, ...], **options: Any) -> None:
    """Merge PEFT adapters into their base model, streamed tensor by tensor.

    ADAPTER may carry a weight as ADAPTER:WEIGHT. Supports LoRA (incl. rsLoRA, DoRA, embedding and
    Conv1D LoRA, lora_bias, rank/alpha patterns, modules_to_save), LoHa, LoKr, AdaLoRA and IA3.

    Example: adaptertool merge ./SmolLM2-135M ./my-lora ./merged --add ./style-lora:0.5
    """
    adapters = [_adapter_and_weight(a) for a in (adapter, *extra)]
    _run_merge(base, adapters, out, subtract=False, **options)


@cli.command("subtract")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("adapter", type=str)
@click.argument("out", type=click.Path(path_type=Path))
@_merge_options
def subtract_cmd(model: Path, adapter: str, out: Path, **options: Any) -> None:
    """Take a merged adapter back out of a model: W - scale * delta.

    Works for additive adapters (LoRA, rsLoRA, LoHa, LoKr, AdaLoRA); DoRA, IA3 and modules_to_save
    cannot be undone without the original base and are refused.

    Example: adaptertool subtract ./merged ./my-lora ./base-again
    """
    _run_merge(model, [_adapter_and_weight(adapter)], out, subtract=True, **options)


@cli.command("demo")
@click.argument("out", type=click.Path(path_type=Path), default=Path("adaptertool-demo"))
@_force_option
@_json_option
def demo_cmd(out: Path, force: bool, as_json: bool) -> None:
    """Make a tiny model and LoRA adapter, merge them, and check the result.

    OUT defaults to ./adaptertool-demo. Example: adaptertool demo ./demo
    """
    from adaptertool.ops.demo import DemoConfig, demo

    _emit(demo(DemoConfig(out=out, force=force)), as_json, lambda r: "\n".join(r.steps))


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else str(n)


def main() -> None:
    """Console entry point."""
    # SIGTERM becomes SystemExit so staged outputs are cleaned up as for Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args = sys.argv[1:]
    if "--debug" in args:  # accepted anywhere, though click wants group options first
        args.remove("--debug")
        args.insert(0, "--debug")
    cli(args, prog_name="adaptertool")

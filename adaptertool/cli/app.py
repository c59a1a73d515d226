"""The adaptertool command group, its shared options and output helpers, and the entry point.

stdout carries only the result (a short summary, or one JSON object with --json); logs, warnings
and progress bars go to stderr. A user-facing failure prints ``error: ...`` and exits 1; usage
errors exit 2; anything else is a bug and keeps its traceback. Commands live in the sibling
modules and call their Python API function (``adaptertool/api``), imported inside the command: most
pull in torch, whose import costs seconds that ``info`` and ``verify`` (headers only) should not pay.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import click

from adaptertool import __version__
from adaptertool.errors import AdapterToolError
from adaptertool.training.launch import reported_elsewhere

__all__ = [
    "alpha_option", "cli", "emit", "force_option", "human_bytes", "human_count", "json_option", "main",
    "progress_enabled", "quiet_option", "shard_option",
]

F = TypeVar("F", bound=Callable[..., Any])

class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        # OSError here is the environment (disk full, permission denied), not a bug.
        except (AdapterToolError, OSError) as err:
            if ctx.params.get("debug"):
                traceback.print_exc()
            if not reported_elsewhere(err):  # a process of a train job other than the one that reports
                click.echo(f"error: {_printable(str(err))}", err=True)
            ctx.exit(1)


def _printable(message: str) -> str:
    """``message`` as one printable line: names read from files (tensor names, paths) may hold a
    newline or, from a non-UTF-8 file name, a lone surrogate that stderr cannot encode."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in message)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="adaptertool")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-v info, -vv debug).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for tensor maths [default: 1; train: one per core]; accepted anywhere on the line.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: int, threads: int | None) -> None:
    """Model surgery and adapter management over safetensors checkpoints, streamed shard by shard."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if threads is None and "torch" not in sys.modules and "OMP_NUM_THREADS" not in os.environ:
        # One thread unless asked: merge, convert and extract gain at most a few % from a second
        # thread on an idle machine and run 2-7x slower with it when another process holds a
        # core (benchmarks/bench_threads.py). train is GEMM-bound and keeps torch's one per core. A
        # caller that imported torch already (the Python API, tests) keeps its own setting.
        threads = None if ctx.invoked_subcommand == "train" else 1
    if threads is None:
        return
    if "torch" in sys.modules:
        import torch  # loaded already: costs nothing

        torch.set_num_threads(threads)
    else:  # read when torch loads; header-only commands (info, verify) never load it
        os.environ["OMP_NUM_THREADS"] = str(threads)


def json_option(f: F) -> F:
    return click.option("--json/--no-json", "as_json", default=False, show_default=True,
                        help="Print one JSON object instead of a summary.")(f)


def quiet_option(f: F) -> F:
    return click.option("-q", "--quiet/--no-quiet", default=False, show_default=True, help="No progress bars.")(f)


def force_option(f: F) -> F:
    return click.option("--force/--no-force", default=False, show_default=True,
                        help="Replace OUT if it exists (only once the new one is complete).")(f)


def alpha_option(f: F) -> F:
    # One default for every command that writes a fresh adapter: extract, convert and combine write
    # r == lora_alpha too, so adapters from any command merge at the same strength.
    return click.option("--alpha", type=float, default=None,
                        help="lora_alpha [default: the rank, so the scaling alpha/r is 1].")(f)


def shard_option(f: F) -> F:
    return click.option(
        "--max-shard-size", default="5GB", show_default=True, metavar="SIZE",
        help="Largest shard to write, e.g. 5GB, 500MB, 2GiB ('0' for a single file).",
    )(f)


def progress_enabled(quiet: bool, as_json: bool = False) -> bool:
    return not quiet and not as_json and sys.stderr.isatty()


def emit(report: Any, as_json: bool, summary: Callable[[Any], str]) -> None:
    click.echo(json.dumps(dataclasses.asdict(report), indent=2) if as_json else summary(report))


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else str(n)


def main() -> None:
    """Console entry point."""
    # SIGTERM becomes SystemExit so staged outputs are cleaned up as for Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        cli(_group_options_first(sys.argv[1:]), prog_name="adaptertool")
    finally:
        # Leaving: a late SIGTERM (torchrun stopping a job's other processes) ends the process as the
        # default does; raised inside an exit handler, SystemExit would print a traceback.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _group_options_first(args: list[str]) -> list[str]:
    """Move --debug and --threads N (or --threads=N) to the front: click wants group options before
    the command, people write them anywhere."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i:]
            break
        if arg == "--debug" or arg.startswith("--threads="):
            front.append(arg)
        elif arg == "--threads" and i + 1 < len(args):
            front += args[i:i + 2]
            i += 1
        else:
            rest.append(arg)
        i += 1
    return front + rest

"""Commands over whole checkpoints: info, verify and reshard."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from adaptertool.api.arguments import DTYPE_CODES
from adaptertool.cli.app import (
    cli,
    emit,
    force_option,
    human_bytes,
    human_count,
    json_option,
    progress_enabled,
    quiet_option,
    shard_option,
)
from adaptertool.cli.sources import SourcePath

if TYPE_CHECKING:
    from adaptertool.ops.info import InfoReport


@cli.command("info")
@click.argument("path", type=SourcePath())
@json_option
def info_cmd(path: Path, as_json: bool) -> None:
    """Show what a checkpoint or PEFT adapter holds.

    Example: adaptertool info ./SmolLM2-135M --json
    """
    from adaptertool.api.checkpoints import info

    emit(info(path), as_json, _info_text)


def _info_text(r: InfoReport) -> str:
    lines = [
        f"{r.path}: {r.format}, {len(r.files)} file(s)",
        f"  tensors {r.tensors}, parameters {human_count(r.parameters)}, {human_bytes(r.bytes)}",
        "  dtypes " + ", ".join(f"{code} x{n}" for code, n in r.dtypes.items()),
    ]
    if r.architecture:
        lines.append(f"  architecture {r.architecture}")
    q = r.quantization
    if q is not None:
        kinds = "/".join(sorted(q.quant_types)).upper()
        sizes = "/".join(sorted(q.blocksizes, key=lambda b: (len(b), b)))
        how = f"blocksize {sizes}" if q.method == "bitsandbytes" else f"per scale {sizes}, {q.scale_format} scales"
        double = ", double-quant" if q.double_quant else ""
        lines.append(f"  quantized {q.weights} weights {kinds} ({how}{double}): "
                     f"{human_bytes(q.stored_bytes)} for {human_bytes(q.original_bytes)}, {human_bytes(q.bytes_saved)} saved")
        if q.skip_modules:
            lines.append(f"  kept unquantised: {', '.join(q.skip_modules)}")
    e = r.experts
    if e is not None:
        active = f", {e.experts_per_token} active" if e.experts_per_token else ""
        shared = f", shared {', '.join(e.shared)}" if e.shared else ""
        dense = f", dense layers {', '.join(map(str, e.dense_layers))}" if e.dense_layers else ""
        lines.append(f"  experts {e.experts} per layer{active} ({e.layout}, {e.family}) in {len(e.moe_layers)} layers, "
                     f"router {', '.join(e.router) or '-'}{shared}{dense}")
    lines += [f"  note: {note}" for note in r.notes]
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
@click.argument("path", type=SourcePath())
@click.option("--nan/--no-nan", default=False, show_default=True, help="Also scan every float tensor for NaN/Inf.")
@json_option
@quiet_option
def verify_cmd(path: Path, nan: bool, as_json: bool, quiet: bool) -> None:
    """Check a checkpoint's headers, index, sizes and (with --nan) values.

    Example: adaptertool verify ./merged --nan
    """
    from adaptertool.api.checkpoints import verify

    report = verify(path, nan=nan, progress=progress_enabled(quiet, as_json))
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    if as_json:
        emit(report, True, str)
    elif report.ok:
        scanned = ", no NaN/Inf" if report.scanned else ""
        click.echo(f"ok: {report.path}: {report.tensors} tensors in {report.files} file(s), {human_bytes(report.bytes)}{scanned}")
    for problem in report.problems:
        click.echo(f"error: {problem}", err=True)
    for bad in report.nonfinite:
        click.echo(f"error: {report.path}: tensor {bad.tensor} holds {bad.nan} NaN and {bad.inf} Inf values", err=True)
    if not report.ok:
        sys.exit(1)


@cli.command("reshard")
@click.argument("source", type=SourcePath())
@click.argument("out", type=click.Path(path_type=Path))
@shard_option
@click.option("--dtype", type=click.Choice(sorted(DTYPE_CODES)), default=None, help="Cast float tensors to this dtype [default: keep].")
@force_option
@json_option
@quiet_option
def reshard_cmd(source: Path, out: Path, max_shard_size: str, dtype: str | None, force: bool, as_json: bool, quiet: bool) -> None:
    """Rewrite a checkpoint with other shard sizes or float dtype.

    Example: adaptertool reshard ./model ./model-2gb --max-shard-size 2GB
    """
    from adaptertool.api.checkpoints import reshard

    report = reshard(source, out, max_shard_size=max_shard_size, dtype=dtype, force=force,
                     progress=progress_enabled(quiet, as_json))
    emit(report, as_json, lambda r: (
        f"wrote {r.out}: {len(r.files)} file(s), {r.tensors} tensors ({r.copied} copied, {r.cast} cast), "
        f"{human_bytes(r.bytes_written)} in {r.seconds:.1f} s, peak memory {human_bytes(r.peak_rss_bytes)}"
    ))

"""The extract command: a LoRA adapter from a full fine-tune."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from adaptertool.api.arguments import DTYPE_CODES
from adaptertool.cli.app import (
    cli,
    emit,
    force_option,
    human_bytes,
    json_option,
    progress_enabled,
    quiet_option,
)
from adaptertool.cli.sources import SourcePath


@cli.command("extract")
@click.argument("base", type=SourcePath())
@click.argument("tuned", type=SourcePath())
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--rank", type=int, default=16, show_default=True, help="Rank of every module (the fixed rule).")
@click.option("--energy", type=float, default=None,
              help="Per-module rule instead: smallest rank keeping this fraction of ||delta||_F^2, in (0, 1].")
@click.option("--auto-rank/--no-auto-rank", default=False, show_default=True,
              help="Per-module rule instead: keep singular values above the bf16/fp16 rounding-noise edge.")
@click.option("--max-rank", type=int, default=None,
              help="Cap on every module's rank [default: --rank, or 128 with --energy/--auto-rank].")
@click.option("--targets", multiple=True, default=("all-linear",), show_default=True, metavar="NAME",
              help="Modules to extract: all-linear (experts included), experts, or names matched as PEFT "
                   "target_modules (repeatable).")
@click.option("--experts", type=click.Choice(["per-expert", "fused"]), default=None,
              help="Mixture-of-experts: a LoRA per expert Linear (target_modules), or PEFT target_parameters LoRAs "
                   "on the fused expert parameters [default: per-expert, fused for gpt-oss].")
@click.option("--svd", type=click.Choice(["randomized", "exact"]), default="randomized", show_default=True,
              help="Randomized SVD (fast, seeded) or the exact full SVD (the optimum, slow).")
@click.option("--niter", type=int, default=6, show_default=True, help="Power iterations of the randomized SVD.")
@click.option("--oversample", type=int, default=16, show_default=True, help="Extra sketch columns of the randomized SVD.")
@click.option("--embeddings", type=click.Choice(["auto", "skip", "save", "lora"]), default="auto", show_default=True,
              help="Changed embeddings/lm_head: auto/save them as modules_to_save (only when changed), skip them, or factor them (lora).")
@click.option("--norms/--no-norms", default=True, show_default=True,
              help="Save changed norm layers (RMSNorm/LayerNorm weights and biases) whole as modules_to_save.")
@click.option("--report", "report_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the full report (every module) to this file: for a name ending .html, a "
                   "self-contained page charting each module's singular values; else JSON.")
@click.option("--dtype", type=click.Choice(sorted(DTYPE_CODES)), default="fp32", show_default=True,
              help="dtype of the LoRA factors.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the SVDs run.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD.")
@force_option
@json_option
@quiet_option
def extract_cmd(base: Path, tuned: Path, out: Path, rank: int, energy: float | None, auto_rank: bool,
                max_rank: int | None, targets: tuple[str, ...], experts: str | None, svd: str, niter: int, oversample: int,
                embeddings: str, norms: bool, report_file: Path | None, dtype: str, device: str, seed: int, force: bool,
                as_json: bool, quiet: bool) -> None:
    """Extract a LoRA adapter approximating a full fine-tune (truncated SVD of TUNED - BASE).

    Example: adaptertool extract ./SmolLM2-135M ./SmolLM2-135M-tuned ./extracted --rank 16 --report r.json
    """
    from adaptertool.api.extracting import extract

    report = extract(base, tuned, out, rank=rank, energy=energy, auto_rank=auto_rank, max_rank=max_rank, targets=targets,
                     experts=experts, svd=svd, niter=niter, oversample=oversample, embeddings=embeddings, norms=norms,
                     report=report_file, dtype=dtype, device=device, seed=seed, force=force,
                     progress=progress_enabled(quiet, as_json))
    emit(report, as_json, _extract_text)


def _extract_text(r: Any) -> str:
    # Experts are listed by group (layer and projection, or fused parameter): --json has every one.
    rows = [m for m in r.modules if m.group is None]
    width = max([len(m.module) for m in rows] + [len(g.group) for g in r.expert_groups], default=6)
    lines = [f"{'module':<{width}}  rank  retained  rel.error"]
    for m in rows:
        flags = (" capped" if m.capped else "") + (" (size)" if m.size_capped else "") + (" +bias" if m.bias else "")
        lines.append(f"{m.module:<{width}}  {m.rank:>4}  {m.retained:>8.4f}  {m.rel_error:>9.4f}{flags}")
    for g in r.expert_groups:
        ranks = str(g.rank_min) if g.rank_min == g.rank_max else f"{g.rank_min}-{g.rank_max}"
        lines.append(f"{g.group:<{width}}  {ranks:>4}  {g.retained:>8.4f}  {g.rel_error:>9.4f}  "
                     f"{g.changed} of {g.experts} experts changed")
    norm_modules = {n.module for n in r.norms}
    whole = [m for m in r.modules_to_save if m not in norm_modules]
    saved = f"; modules_to_save: {', '.join(whole)}" if whole else ""
    lines += [
        f"total: {_counts(r)} (r={r.rank}), {len(r.unchanged)} unchanged skipped{saved}",
        (f"  retained energy {r.retained:.4f}, relative Frobenius error {r.rel_error:.4f} "
         "(1 - retained is the share of the fine-tune's change the adapter leaves out)"),
        *_norms_lines(r.norms),
        f"  adapter {human_bytes(r.adapter_bytes)} vs full delta {human_bytes(r.delta_bytes)}",
        *(f"note: {note}" for note in r.notes),
        f"wrote {r.out} ({r.svd} SVD on {r.device}) in {r.seconds:.1f} s, peak memory {human_bytes(r.peak_rss_bytes)}",
    ]
    return "\n".join(lines)


def _counts(r: Any) -> str:
    """Modules with a LoRA each (experts' included), and fused expert parameters, each a row per expert in --json."""
    params = {m.module for m in r.modules if m.group == m.module}
    modules = sum(m.group != m.module for m in r.modules)
    return f"{modules} modules" + (f" and {len(params)} fused expert parameters" if params else "")


def _norms_lines(norms: list[Any]) -> list[str]:
    if not norms:
        return []
    largest = max(norms, key=lambda n: n.rel_change)
    low = min(n.rel_change for n in norms)
    return [f"  norms: {len(norms)} changed modules saved whole (modules_to_save, {human_bytes(sum(n.bytes for n in norms))}), "
            f"relative change {low:.4f}-{largest.rel_change:.4f} (largest {largest.module})"]

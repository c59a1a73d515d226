"""The convert command: PiSSA/OLoRA to plain LoRA, rank resizing, the export form, and llama.cpp's GGUF."""

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


@cli.command("convert")
@click.argument("adapter", type=SourcePath("adapter"))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--from-pissa", type=SourcePath("adapter"), default=None, metavar="INITIAL",
              help="ADAPTER is a trained PiSSA adapter and INITIAL the adapter init wrote: make a LoRA over the original base.")
@click.option("--from-olora", type=SourcePath("adapter"), default=None, metavar="INITIAL",
              help="The same for an OLoRA adapter.")
@click.option("--rank", type=int, default=None, help="Resize: re-factor each module's delta at this rank (truncated SVD).")
@click.option("--energy", type=float, default=None,
              help="Resize instead by energy: per module, the smallest rank keeping this fraction of ||delta||_F^2.")
@click.option("--max-rank", type=int, default=None, help="Cap on the resized ranks [default: --rank, or 128 with --energy].")
@click.option("--svd", type=click.Choice(["randomized", "exact"]), default="randomized", show_default=True,
              help="Randomized SVD (fast, seeded) or the exact SVD, for a resize.")
@click.option("--export/--no-export", default=False, show_default=True,
              help="Fold the scaling into B: one r == lora_alpha, no rsLoRA, no patterns (llama.cpp/vLLM-style loaders).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD.")
@click.option("--to", "to", type=click.Choice(["peft", "gguf"]), default="peft", show_default=True,
              help="Output format: a PEFT adapter folder, or one GGUF file for llama.cpp / Ollama (the adapter as it is).")
@click.option("--base", type=SourcePath("model", config_only=True), default=None,
              help="With --to gguf: the base model's folder or Hub id, for its config.json [default: the adapter's "
                   "base_model_name_or_path].")
@click.option("--dtype", type=click.Choice(["auto", *sorted(DTYPE_CODES)]), default="auto", show_default=True,
              help="dtype of the factors; auto keeps the adapter's.")
@force_option
@json_option
@quiet_option
def convert_cmd(adapter: Path, out: Path, from_pissa: Path | None, from_olora: Path | None, rank: int | None,
                energy: float | None, max_rank: int | None, svd: str, export: bool, seed: int, to: str,
                base: Path | None, dtype: str, force: bool, as_json: bool, quiet: bool) -> None:
    """Convert an adapter: PiSSA/OLoRA to plain LoRA, resize its rank, the export form, or llama.cpp's GGUF.

    Example: adaptertool convert ./pissa-trained ./lora --from-pissa ./pissa-adapter
    """
    from adaptertool.api.converting import convert

    report = convert(adapter, out, from_pissa=from_pissa, from_olora=from_olora, rank=rank, energy=energy,
                     max_rank=max_rank, svd=svd, export=export, seed=seed, to=to, base=base, dtype=dtype, force=force,
                     progress=progress_enabled(quiet, as_json))
    emit(report, as_json, _gguf_text if to == "gguf" else _convert_text)


def _convert_text(r: Any) -> str:
    ranks = sorted({m.rank for m in r.modules})
    shown = f"r={r.rank}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]} (r={r.rank}, others in rank_pattern)"
    error = f", relative Frobenius error {r.rel_error:.4f}" if "resize" in r.steps else ""
    return "\n".join([
        *(f"note: {note}" for note in r.notes),
        (f"wrote {r.out} ({' + '.join(r.steps)}): {len(r.modules)} modules, {shown}, alpha={r.alpha:g}{error}; "
         f"{human_bytes(r.adapter_bytes)} in {r.seconds:.1f} s, peak memory {human_bytes(r.peak_rss_bytes)}"),
    ])


def _gguf_text(r: Any) -> str:
    ranks = f"r={r.ranks[0]}" if len(r.ranks) == 1 else f"ranks {r.ranks[0]}-{r.ranks[-1]}"
    return "\n".join([
        *(f"note: {note}" for note in r.notes),
        (f"wrote {r.out} (GGUF LoRA for llama.cpp, architecture {r.architecture} from {r.base_config}): "
         f"{r.modules} modules, {ranks}, alpha={r.alpha:g}, {r.dtype}; {human_bytes(r.file_bytes)} in {r.seconds:.1f} s"),
    ])

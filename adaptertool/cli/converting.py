"""The convert command: PiSSA/OLoRA to plain LoRA, rank resizing, the export form, and llama.cpp's GGUF."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from adaptertool.cli.app import (
    DTYPE_CODES,
    cli,
    emit,
    force_option,
    human_bytes,
    json_option,
    progress_enabled,
    quiet_option,
)
from adaptertool.cli.sources import SourcePath
from adaptertool.errors import AdapterToolError
from adaptertool.io import torch_dtype


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
    steps = [flag for flag, value in (("--from-pissa", from_pissa), ("--from-olora", from_olora), ("--rank", rank),
                                      ("--energy", energy), ("--max-rank", max_rank), ("--export", export or None))
             if value is not None]
    if to == "gguf":
        if steps:
            raise AdapterToolError(f"--to gguf writes ADAPTER as it is and does not combine with {steps[0]}; convert "
                                   "into a folder first, then convert that folder --to gguf")
        from adaptertool.ops.convert_gguf import GgufConvertConfig, convert_to_gguf

        gguf_cfg = GgufConvertConfig(adapter=adapter, out=out, base=base, force=force,
                                     dtype=None if dtype == "auto" else torch_dtype(DTYPE_CODES[dtype]))
        emit(convert_to_gguf(gguf_cfg, progress=progress_enabled(quiet, as_json)), as_json, _gguf_text)
        return
    if base is not None:
        raise AdapterToolError("--base names the base for --to gguf; the other conversions need no base")
    from adaptertool.ops.convert import ConvertConfig, convert

    cfg = ConvertConfig(
        adapter=adapter, out=out, from_pissa=from_pissa, from_olora=from_olora, rank=rank, energy=energy,
        max_rank=max_rank, svd=svd, export=export, seed=seed,
        dtype=None if dtype == "auto" else torch_dtype(DTYPE_CODES[dtype]), force=force,
    )
    emit(convert(cfg, progress=progress_enabled(quiet, as_json)), as_json, _convert_text)


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

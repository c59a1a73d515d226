"""convert: PiSSA/OLoRA to plain LoRA, rank resizing, the export form, and llama.cpp's GGUF."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from adaptertool.api.arguments import OutPath, Source, check_choice, float_dtype, progress_on, resolve_optional
from adaptertool.errors import OptionError
from adaptertool.ops.sources import local_source

if TYPE_CHECKING:
    from adaptertool.ops.convert import ConvertReport
    from adaptertool.ops.convert_gguf import GgufConvertReport

__all__ = ["convert"]


def convert(adapter: Source, out: OutPath, *, from_pissa: Source | None = None, from_olora: Source | None = None,
            rank: int | None = None, energy: float | None = None, max_rank: int | None = None, svd: str = "randomized",
            export: bool = False, seed: int = 0, to: str = "peft", base: Source | None = None, dtype: str = "auto",
            force: bool = False, progress: bool | None = None) -> ConvertReport | GgufConvertReport:
    """Convert an adapter (``adaptertool convert``): the keyword arguments are the command's options.

    ``to="peft"`` writes an adapter folder after the steps asked for (``from_pissa``/``from_olora``
    INITIAL, a resize by ``rank`` or ``energy``, ``export``) and returns a ConvertReport;
    ``to="gguf"`` writes the adapter as it is into one GGUF file for llama.cpp, its architecture read
    from ``base`` (default: the adapter's base_model_name_or_path), and returns a GgufConvertReport.

    Raises:
        InputError, OptionError, OutputError, HubError: see docs/api.md.
    """
    check_choice("--to", to, ("peft", "gguf"))
    shown = progress_on(progress)
    steps = [flag for flag, value in (("--from-pissa", from_pissa), ("--from-olora", from_olora), ("--rank", rank),
                                      ("--energy", energy), ("--max-rank", max_rank), ("--export", export or None))
             if value is not None]
    if to == "gguf":
        if steps:
            raise OptionError(f"--to gguf writes ADAPTER as it is and does not combine with {steps[0]}; convert "
                              "into a folder first, then convert that folder --to gguf")
        from adaptertool.ops.convert_gguf import GgufConvertConfig, convert_to_gguf

        gguf_cfg = GgufConvertConfig(adapter=local_source(adapter, kind="adapter", progress=shown), out=Path(out),
                                     base=resolve_optional(base, config_only=True, progress=shown), force=force,
                                     dtype=float_dtype("--dtype", dtype, auto=True))
        return convert_to_gguf(gguf_cfg, progress=shown)
    if base is not None:
        raise OptionError("--base names the base for --to gguf; the other conversions need no base")
    from adaptertool.ops.convert import ConvertConfig, convert as run

    cfg = ConvertConfig(
        adapter=local_source(adapter, kind="adapter", progress=shown), out=Path(out),
        from_pissa=resolve_optional(from_pissa, kind="adapter", progress=shown),
        from_olora=resolve_optional(from_olora, kind="adapter", progress=shown), rank=rank, energy=energy,
        max_rank=max_rank, svd=svd, export=export, seed=seed, dtype=float_dtype("--dtype", dtype, auto=True), force=force,
    )
    return run(cfg, progress=shown)

"""How the API reads the arguments it shares with the CLI: float dtype names, shard sizes, inputs
given as paths or Hub ids, and whether to draw progress bars.

Progress: ``progress=None`` (every function's default) draws bars when stderr is a terminal or the
caller runs in a Jupyter kernel, where ``tqdm.auto`` draws them as widgets; True or False decides.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Union

from adaptertool.errors import OptionError
from adaptertool.io import parse_size
from adaptertool.ops.sources import local_source, split_weight

if TYPE_CHECKING:
    import torch

__all__ = [
    "DTYPE_CODES", "OutPath", "Source", "Weighted", "check_choice", "float_dtype", "progress_on",
    "resolve_optional", "shard_bytes", "split_source", "weighted",
]

# The CLI's --dtype names -> safetensors codes; "auto" (where a command takes it) keeps the input's dtype.
DTYPE_CODES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}

OutPath = Union[str, "os.PathLike[str]"]  # an output: a local path
Source = OutPath  # an input: a local path, or (text only) a Hub id org/name[@revision]
Weighted = Union[Source, tuple[Source, float]]  # an adapter, as "ADAPTER:WEIGHT" text or (ADAPTER, weight)


def progress_on(progress: bool | None) -> bool:
    """``progress``, or for None: whether stderr is a terminal or this is a Jupyter kernel."""
    if progress is not None:
        return progress
    # The test tqdm.auto makes for a notebook front end.
    return (sys.stderr is not None and sys.stderr.isatty()) or "ipykernel.zmqshell" in sys.modules


def check_choice(option: str, value: object, choices: Sequence[object]) -> None:
    """Refuse ``value`` for ``option`` unless it is one of ``choices``, as click.Choice does on the command line.

    Raises:
        OptionError: naming the option and the choices.
    """
    if value not in choices:
        raise OptionError(f"{option} must be one of {', '.join(map(str, choices))}, not {value!r}")


def float_dtype(option: str, name: str | None, *, auto: bool = False) -> torch.dtype | None:
    """The torch dtype for a --dtype name (bf16, fp16, fp32); None for None or, where allowed, "auto".

    Raises:
        OptionError: any other name.
    """
    from adaptertool.io import torch_dtype

    if name is None or (auto and name == "auto"):
        return None
    check_choice(option, name, [*(["auto"] if auto else []), *sorted(DTYPE_CODES)])
    return torch_dtype(DTYPE_CODES[name])


def shard_bytes(size: str | int) -> int | None:
    """Bytes per shard for --max-shard-size: text such as 5GB, or a number of bytes; 0 (in any unit): one file.

    Raises:
        OptionError: text that is not a size.
    """
    value = parse_size(size) if isinstance(size, str) else size
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise OptionError(f"--max-shard-size must be a size such as 5GB or a byte count >= 0, not {size!r}")
    return None if value == 0 else value


def resolve_optional(value: Source | None, *, kind: str = "model", config_only: bool = False,
                    progress: bool = False) -> Path | None:
    """:func:`~adaptertool.ops.sources.local_source` for an input that may be left out (None)."""
    return None if value is None else local_source(value, kind=kind, config_only=config_only, progress=progress)


def split_source(value: Weighted) -> tuple[Source, float | None]:
    """An adapter and the weight given with it: ``(ADAPTER, w)``, ``"ADAPTER:w"`` text, or ADAPTER alone (None)."""
    if isinstance(value, tuple):
        return value
    return split_weight(value) if isinstance(value, str) else (value, None)


def weighted(value: Weighted, *, progress: bool) -> tuple[Path, float]:
    """An adapter, resolved, with its weight (1 where none is given)."""
    path, weight = split_source(value)
    return local_source(path, kind="adapter", progress=progress), 1.0 if weight is None else weight

"""Inputs that take a local path or a Hub id (``org/name`` or ``org/name@revision``): one rule for
the CLI and the Python API.

A path that exists always wins, and a ``pathlib.Path`` is always a local path. Other text shaped like
``org/name[@revision]`` is downloaded through the Hugging Face cache (with HF_HUB_OFFLINE only the
cache is asked) and stands for the cached snapshot folder; huggingface_hub is imported only then,
so commands on local files never load it.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from adaptertool.errors import HubError

__all__ = ["hub_id", "local_source", "split_weight"]

log = logging.getLogger(__name__)


def hub_id(value: str | os.PathLike[str]) -> str | None:
    """The Hub id ``value`` names, or None where it stands for a local path.

    Raises:
        OptionError: text shaped like an id (one ``/``, not starting with ``/``, ``.`` or ``~``) that is
            not a valid one, such as ``org/na--me``.
    """
    if not isinstance(value, str) or Path(value).exists():
        return None
    # Cheap shape test before anything is imported: org/name, optionally @revision (which may hold "/").
    repo = value.split("@", 1)[0]
    if value.startswith(("/", ".", "~")) or repo.count("/") != 1 or "\\" in value:
        return None  # a missing local path is the command's to report, with its own message
    from adaptertool.io.hub import parse_hub_id

    parse_hub_id(value)
    return value


def local_source(value: str | os.PathLike[str], *, kind: str = "model", config_only: bool = False,
                 progress: bool = False) -> Path:
    """The local file or folder ``value`` stands for: itself, or a Hub id's cached snapshot folder.

    Args:
        kind: "model" or "adapter", words in messages only: both download the same top-level files.
        config_only: a Hub id downloads its config.json alone (a base whose architecture is all we need).

    Raises:
        OptionError: a malformed Hub id.
        HubError: the download failed (auth, missing repo, no network).
    """
    ident = hub_id(value)
    if ident is None:
        return Path(value)
    from adaptertool.ops.hub import resolve_config, resolve_source

    log.info("%s is not a local path; looking it up on the Hub", ident)
    try:
        if config_only:
            return resolve_config(ident, progress=progress)
        return resolve_source(ident, kind=kind, progress=progress)
    except HubError as err:
        if "no such repo" not in str(err):
            raise
        # A mistyped relative path (models/llama) looks like a Hub id: say both were tried.
        raise HubError(f"{ident} is neither a local path nor a Hub repo: {err}") from err


def split_weight(text: str) -> tuple[str, float | None]:
    """``SOURCE[:WEIGHT]`` -> (source, weight or None).

    The weight is the text after the last ``:`` when it parses as a finite number and the whole
    argument is not itself an existing path; so ``C:\\adapters\\x`` and ``run:7/`` stay paths.
    """
    head, sep, tail = text.rpartition(":")
    if not sep or not head or Path(text).exists():
        return text, None
    try:
        weight = float(tail)
    except ValueError:
        return text, None
    return (head, weight) if math.isfinite(weight) else (text, None)

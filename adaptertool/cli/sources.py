"""Input arguments that take a local path or a Hub id (``org/name`` or ``org/name@revision``).

A path that exists always wins. Anything else shaped like ``org/name[@revision]`` is downloaded
through the Hugging Face cache when the argument is converted (saying so once on stderr; with
HF_HUB_OFFLINE only the cache is asked), and the command receives the cached snapshot folder;
huggingface_hub is imported only then, so commands on local files never load it.
A malformed id is a usage error (exit 2); a failed download (auth, missing repo, no network) is
an AdapterToolError, which the command group prints as one line with exit 1.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import click

from adaptertool.errors import AdapterToolError

__all__ = ["HubId", "SourcePath", "WeightedSource", "split_weight"]

_LOOKED_UP: set[str] = set()  # Hub ids this process has said it looks up


def _looks_like_hub_id(text: str) -> bool:
    # Cheap shape test before anything is imported: org/name, optionally @revision (which may hold "/").
    repo = text.split("@", 1)[0]
    return not text.startswith(("/", ".", "~")) and repo.count("/") == 1 and "\\" not in text


class SourcePath(click.ParamType):
    """A local file or folder, or a Hub id resolved to its cached snapshot folder (a ``pathlib.Path``)."""

    name = "path"

    def __init__(self, kind: str = "model", *, config_only: bool = False) -> None:
        self.kind = kind  # "model" or "adapter": only words in messages; both download the same top-level files
        self.config_only = config_only  # a Hub id downloads its config.json alone (a base whose architecture is all we need)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path:
        if isinstance(value, Path):
            return value
        path = Path(value)
        if path.exists() or not _looks_like_hub_id(value):
            return path  # a missing local path is the command's to report, with its own message
        from adaptertool.io.hub import offline, parse_hub_id
        from adaptertool.ops.hub import resolve_config, resolve_source

        try:
            parse_hub_id(value)
        except AdapterToolError:
            self.fail(f"{value!r} is neither an existing path nor a Hub id (org/name[@revision])", param, ctx)
        if value not in _LOOKED_UP:  # said once: a mistyped local path should not reach the network unnoticed
            _LOOKED_UP.add(value)
            where = "the Hub cache (HF_HUB_OFFLINE is set)" if offline() else "the Hub"
            click.echo(f"note: {value} is not a local path; looking it up in {where}", err=True)
        try:
            # Bars only for a person watching: the command's own --quiet/--json are not parsed yet here.
            if self.config_only:
                return resolve_config(value, progress=sys.stderr.isatty())
            return resolve_source(value, kind=self.kind, progress=sys.stderr.isatty())
        except AdapterToolError as err:
            if "no such repo" not in str(err):
                raise
            # A mistyped relative path (models/llama) looks like a Hub id: say both were tried.
            raise AdapterToolError(f"{value} is neither a local path nor a Hub repo: {err}") from err


class HubId(click.ParamType):
    """``org/name`` or ``org/name@revision``, checked when parsed so a malformed id is a usage error (exit 2)."""

    name = "repo_id"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from adaptertool.io.hub import parse_hub_id

        try:
            parse_hub_id(value)
        except AdapterToolError as err:
            self.fail(str(err), param, ctx)
        return str(value)


class WeightedSource(click.ParamType):
    """``ADAPTER[:WEIGHT]``, ADAPTER a path or Hub id: converts to ``(Path, weight)`` (weight 1 by default)."""

    name = "adapter[:weight]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[Path, float]:
        if isinstance(value, tuple):
            return value
        source, weight = split_weight(value)
        return SourcePath("adapter").convert(source, param, ctx), 1.0 if weight is None else weight


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

"""Click types for input arguments that take a local path or a Hub id (``org/name`` or ``org/name@revision``).

The rule and the download are ``ops/sources.py``'s, shared with the Python API; here a Hub id is
resolved when the argument is converted, saying so once on stderr. A malformed id is a usage error
(exit 2); a failed download (auth, missing repo, no network) is a HubError, which the command group
prints as one line with exit 1.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from adaptertool.errors import OptionError
from adaptertool.ops.sources import hub_id, local_source, split_weight

__all__ = ["HubId", "SourcePath", "WeightedSource"]

_LOOKED_UP: set[str] = set()  # Hub ids this process has said it looks up


class SourcePath(click.ParamType):
    """A local file or folder, or a Hub id resolved to its cached snapshot folder (a ``pathlib.Path``)."""

    name = "path"

    def __init__(self, kind: str = "model", *, config_only: bool = False) -> None:
        self.kind = kind
        self.config_only = config_only

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path:
        try:
            ident = hub_id(value)
        except OptionError:
            self.fail(f"{value!r} is neither an existing path nor a Hub id (org/name[@revision])", param, ctx)
        if ident is None:
            return Path(value)
        if ident not in _LOOKED_UP:  # said once: a mistyped local path should not reach the network unnoticed
            from adaptertool.io.hub import offline

            _LOOKED_UP.add(ident)
            where = "the Hub cache (HF_HUB_OFFLINE is set)" if offline() else "the Hub"
            click.echo(f"note: {ident} is not a local path; looking it up in {where}", err=True)
        # Bars only for a person watching: the command's own --quiet/--json are not parsed yet here.
        return local_source(ident, kind=self.kind, config_only=self.config_only, progress=sys.stderr.isatty())


class HubId(click.ParamType):
    """``org/name`` or ``org/name@revision``, checked when parsed so a malformed id is a usage error (exit 2)."""

    name = "repo_id"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from adaptertool.io.hub import parse_hub_id

        try:
            parse_hub_id(value)
        except OptionError as err:
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

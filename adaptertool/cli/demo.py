"""The demo command: a tiny model and adapter, merged and checked, with nothing to download."""

from __future__ import annotations

from pathlib import Path

import click

from adaptertool.cli.app import cli, emit, force_option, json_option


@cli.command("demo")
@click.argument("out", type=click.Path(path_type=Path), default=Path("adaptertool-demo"))
@force_option
@json_option
def demo_cmd(out: Path, force: bool, as_json: bool) -> None:
    """Make a tiny model and LoRA adapter, merge them, and check the result.

    OUT defaults to ./adaptertool-demo. Example: adaptertool demo ./demo
    """
    from adaptertool.api.demo import demo

    emit(demo(out, force=force), as_json, lambda r: "\n".join(r.steps))

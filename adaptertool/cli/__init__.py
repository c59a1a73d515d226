"""The command line: parse, call one ops pipeline, render its report. Nothing else lives here."""

from adaptertool.cli import (  # noqa: F401  (importing registers the commands)
    checkpoints,
    combining,
    converting,
    demo,
    extracting,
    hub,
    initializing,
    merging,
    quantizing,
    training,
)
from adaptertool.cli.app import cli, main

__all__ = ["cli", "main"]

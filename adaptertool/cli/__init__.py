"""The command line: parse, call one ops pipeline, render its report. Nothing else lives here."""

from adaptertool.cli import checkpoints, extracting, merging, quantizing  # noqa: F401  (importing registers the commands)
from adaptertool.cli.app import cli, main

__all__ = ["cli", "main"]

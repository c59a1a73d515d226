"""The combine: several adapters into one command(s)."""

from adaptertool.cli.app import cli  # noqa: F401  (commands register on it)

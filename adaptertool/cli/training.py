"""The train: the LoRA/QLoRA training loop command(s)."""

from adaptertool.cli.app import cli  # noqa: F401  (commands register on it)

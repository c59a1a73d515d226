"""The push and pull: the Hugging Face Hub command(s)."""

from adaptertool.cli.app import cli  # noqa: F401  (commands register on it)

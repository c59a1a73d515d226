"""The init and convert: fresh adapters (default/gaussian/PiSSA/OLoRA) and adapter conversions command(s)."""

from adaptertool.cli.app import cli  # noqa: F401  (commands register on it)

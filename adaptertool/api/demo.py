"""demo: the built-in example, and the quickest way to inputs for trying the API."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from adaptertool.api.arguments import OutPath

if TYPE_CHECKING:
    from adaptertool.ops.demo import DemoReport

__all__ = ["demo"]


def demo(out: OutPath = "adaptertool-demo", *, force: bool = False) -> DemoReport:
    """Make a tiny Llama checkpoint (``out/base``) and a LoRA adapter for it (``out/adapter``), merge them
    (``out/merged``) and check the merge against a float64 reference (``adaptertool demo``).

    Raises:
        OutputError: ``out`` exists without ``force``.
    """
    from adaptertool.ops.demo import DemoConfig, demo as run

    return run(DemoConfig(out=Path(out), force=force))

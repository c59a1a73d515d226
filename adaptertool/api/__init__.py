"""The Python API: one function per command, taking the CLI's options as keyword arguments.

Each function resolves its inputs (a local path, or a Hub id as the CLI takes it), builds the
command's ``ops`` Config, runs the pipeline and returns its typed report; the CLI parses, calls it
and prints. ``import adaptertool`` re-exports these names and loads a module on first use: most
import torch, which ``info`` and ``verify`` do without. docs/api.md describes the surface.
"""

from adaptertool._lazy import lazy_exports

EXPORTS = {
    "checkpoints": ("info", "reshard", "verify"),
    "combining": ("combine",),
    "converting": ("convert",),
    "demo": ("demo",),
    "extracting": ("extract",),
    "hub": ("pull", "push"),
    "initializing": ("init",),
    "merging": ("merge", "subtract"),
    "quantizing": ("dequantize", "quantize"),
    "training": ("train",),
}

__all__, __getattr__ = lazy_exports(__name__, EXPORTS)

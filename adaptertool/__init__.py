"""adaptertool: model surgery and adapter management over safetensors checkpoints."""

from adaptertool.errors import AdapterToolError

__all__ = ["AdapterToolError", "__version__"]
__version__ = "0.1.0"

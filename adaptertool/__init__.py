"""adaptertool: model surgery and adapter management over safetensors checkpoints.

``import adaptertool as at`` gives one function per command (``at.merge``, ``at.extract``, ...,
docs/api.md) and the error kinds. The functions load on first use, so this import stays cheap: it
never imports torch.
"""

from adaptertool._lazy import lazy_exports
from adaptertool.api import EXPORTS
from adaptertool.errors import (
    AdapterToolError,
    CollectiveError,
    HubError,
    InputError,
    OptionError,
    OutputError,
    ProcessError,
)

_API, __getattr__ = lazy_exports("adaptertool.api", EXPORTS)
__all__ = ["AdapterToolError", "CollectiveError", "HubError", "InputError", "OptionError", "OutputError",
           "ProcessError", "__version__", *_API]
__version__ = "0.1.0"

"""One pipeline per command: plan from headers, stream tensors through pure maths, commit atomically.

Names are loaded on first use (PEP 562): most pipelines import torch, which costs seconds of
start-up that header-only commands such as ``info`` should not pay.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "demo": ("DemoConfig", "DemoReport", "demo"),
    "info": ("InfoReport", "info"),
    "merge": ("MergeConfig", "MergeReport", "merge"),
    "reshard": ("ReshardConfig", "ReshardReport", "reshard"),
    "verify": ("VerifyReport", "verify"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)

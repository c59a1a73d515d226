"""The tiny MoE fixtures (fixtures/build_moe.py): built once, cached under .cache/fixtures/moe/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def moe_fixtures() -> Path:
    """The fixture folder: ``<family>/{per-expert,fused}/``, ``<family>/adapters/<name>/`` and
    ``<family>/oracles/<name>/`` (PEFT's float32 merge of that adapter), as build_moe.py describes.

    A cached build imports neither transformers nor PEFT (tests/conftest.py checks they are installed).
    """
    # fixtures/ is a folder of scripts, not a package: load the builder from its path.
    path = Path(__file__).resolve().parents[2] / "fixtures" / "build_moe.py"
    spec = importlib.util.spec_from_file_location("build_moe", path)
    assert spec is not None and spec.loader is not None
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    return builder.build()

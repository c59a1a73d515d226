"""Fixtures: a fresh fake Hub per test, and the CLI run in a subprocess pointed at it.

huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE when it is imported, so end-to-end
cases run ``python -m adaptertool`` with them in the environment; library-level cases pass
``endpoint=``, ``cache_dir=`` and ``token=`` explicitly instead. The user's own HF_* settings are
cleared for every test by tests/conftest.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.hub.fake_hub import TOKEN, FakeHub


@dataclass(frozen=True)
class Done:
    code: int
    out: str
    err: str


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    server = FakeHub()
    server.start()
    yield server
    server.close()


@pytest.fixture
def hub_env(hub: FakeHub, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("HF_", "HUGGING", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"), HF_TOKEN=TOKEN, HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_UPDATE_CHECK="1", NO_PROXY="127.0.0.1,localhost", OMP_NUM_THREADS="1")
    return env


def run_cli(env: dict[str, str], *args: str, **overrides: str | None) -> Done:
    """``python -m adaptertool ARGS`` with ``env`` (an override of None removes that variable)."""
    env = dict(env)
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    done = subprocess.run([sys.executable, "-m", "adaptertool", *args], env=env, capture_output=True, text=True,
                          check=False, timeout=120)
    return Done(done.returncode, done.stdout, done.stderr)

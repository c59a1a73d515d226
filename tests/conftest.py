"""Shared fixtures: tiny deterministic Llama checkpoints, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adaptertool.ops.examples import TINY, write_llama, write_lora_adapter

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], Path]:
    """{(dtype name, sharded): folder} for bf16/fp16/fp32, single-file and 3+ shards."""
    root = tmp_path_factory.mktemp("tiny")
    models = {}
    for name, dtype in DTYPES.items():
        for sharded in (False, True):
            out = root / f"{name}-{'sharded' if sharded else 'single'}"
            write_llama(out, TINY, dtype=dtype, max_shard_bytes=12_000 if sharded else None)
            models[(name, sharded)] = out
    return models


@pytest.fixture(scope="session")
def tiny_sharded(tiny_models: dict[tuple[str, bool], Path]) -> Path:
    return tiny_models[("bf16", True)]


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_lora_adapter(tmp_path_factory.mktemp("adapter") / "lora", TINY, rank=4, alpha=8.0)

"""config.json's dtype key: written as the installed transformers writes and reads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, LlamaConfig

from adaptertool.ops.model_files import set_config_dtype, write_model_files


def test_transformers_writes_dtype_not_torch_dtype(tmp_path: Path) -> None:
    # The oracle for the rule below: what the installed transformers itself saves.
    LlamaConfig(dtype="bfloat16").save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["dtype"] == "bfloat16" and "torch_dtype" not in saved


@pytest.mark.parametrize("keys", [("dtype",), ("torch_dtype",), ("dtype", "torch_dtype")])
def test_set_config_dtype_is_what_transformers_loads(tmp_path: Path, keys: tuple[str, ...]) -> None:
    config = LlamaConfig().to_dict()
    for key in ("dtype", "torch_dtype"):
        config.pop(key, None)
    config.update({key: "bfloat16" for key in keys})
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    (tmp_path / "out").mkdir()
    write_model_files(tmp_path / "src", tmp_path / "out", dtype=torch.float16)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["dtype"] == "float16"
    assert written.get("torch_dtype", "float16") == "float16"  # kept, and updated, only where it was
    assert ("torch_dtype" in written) == ("torch_dtype" in keys)
    assert AutoConfig.from_pretrained(tmp_path / "out").dtype == torch.float16


def test_set_config_dtype_in_place() -> None:
    config = {"torch_dtype": "float32"}
    set_config_dtype(config, torch.bfloat16)
    assert config == {"dtype": "bfloat16", "torch_dtype": "bfloat16"}

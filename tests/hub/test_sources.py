"""Every input argument takes a Hub id: the same command on ids and on local paths writes the same bytes.

In-process (CliRunner), so huggingface_hub's import-time settings are pointed at the fake Hub here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import constants

from adaptertool.cli import cli
from adaptertool.ops.sources import split_weight
from adaptertool.ops.examples import TINY, write_llama, write_lora_adapter
from tests.hub.fake_hub import TOKEN, FakeHub


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    write_llama(root / "base", TINY, dtype=torch.float32, max_shard_bytes=30_000)
    write_llama(root / "tuned", TINY, dtype=torch.float32, seed=5)
    write_lora_adapter(root / "lora", TINY)
    return {name: root / name for name in ("base", "tuned", "lora")}


@pytest.fixture
def on_hub(hub: FakeHub, local: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    for name, folder in local.items():
        hub.seed(f"me/{name}", {p.name: p.read_bytes() for p in folder.iterdir()})
    return hub


COMMANDS = {
    "reshard": ["reshard", "{base}", "{out}", "--max-shard-size", "0"],
    "quantize": ["quantize", "{base}", "{out}"],
    "extract": ["extract", "{base}", "{tuned}", "{out}", "--rank", "2", "--svd", "exact"],
    "subtract": ["subtract", "{base}", "{lora}:0.5", "{out}"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_hub_ids_and_local_paths_give_the_same_output(on_hub: FakeHub, local: dict[str, Path], tmp_path: Path,
                                                       command: str) -> None:
    outputs = {}
    for source, names in (("local", {k: str(v) for k, v in local.items()}), ("hub", {k: f"me/{k}" for k in local})):
        out = tmp_path / source
        args = [a.format(out=out, **names) for a in COMMANDS[command]]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        outputs[source] = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".safetensors"}
    assert outputs["hub"] == outputs["local"] and outputs["hub"]
    assert any("/resolve/" in path for _, path in on_hub.requests)


def test_split_weight(tmp_path: Path) -> None:
    assert split_weight("adapters/sft:0.7") == ("adapters/sft", 0.7)
    assert split_weight("a:-1e-3") == ("a", -0.001)
    assert split_weight("adapters/sft") == ("adapters/sft", None)
    assert split_weight("C:\\adapters\\x") == ("C:\\adapters\\x", None)
    assert split_weight("run:final") == ("run:final", None)
    assert split_weight("a:inf") == ("a:inf", None)
    odd = tmp_path / "run:2"
    odd.mkdir()
    assert split_weight(str(odd)) == (str(odd), None)  # an existing path wins over a weight suffix

"""Issue 18, the Hub: credentials in HF_ENDPOINT never printed, hostile file names in a repo one line,
and a missing local path shaped like org/name said to go to the Hub, once, honouring HF_HUB_OFFLINE."""

from __future__ import annotations

from pathlib import Path

import torch

from adaptertool.io.hub import _redact
from adaptertool.ops.examples import TINY, write_llama, write_lora_adapter
from tests.hub.conftest import run_cli
from tests.hub.fake_hub import TOKEN, FakeHub


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_credentials_in_the_endpoint_are_redacted(hub_env: dict[str, str], tmp_path: Path) -> None:
    done = run_cli(hub_env, "pull", "me/base", str(tmp_path / "out"), HF_ENDPOINT="http://alice:s3cret@127.0.0.1:9")
    assert done.code == 1 and "s3cret" not in done.err and "alice" not in done.err, done.err
    assert done.err.startswith("error: cannot reach the Hub at http://***@127.0.0.1:9 for me/base")
    assert _redact("see https://u:p@host/x and http://tok@h") == "see https://***@host/x and http://***@h"


def test_hostile_file_names_in_a_repo_are_one_line(hub: FakeHub, hub_env: dict[str, str], tmp_path: Path) -> None:
    hub.seed("me/evil", {"config.json": b"{}", "../../escape.json": b"{}"})
    done = run_cli(hub_env, "pull", "me/evil", str(tmp_path / "work" / "out"))
    assert done.code == 1 and done.out == "" and len(done.err.splitlines()) == 1, done.err  # was 68 lines of traceback
    assert done.err.startswith("error: me/evil: the repo holds a file whose name would be written outside the download "
                               "folder (Invalid filename '../../escape.json'")
    assert not (tmp_path / "work").exists() and not list(tmp_path.rglob("escape.json"))


def test_a_hub_lookup_is_said_once_and_offline_asks_only_the_cache(hub: FakeHub, hub_env: dict[str, str],
                                                                   tmp_path: Path) -> None:
    write_llama(tmp_path / "base", TINY, dtype=torch.float32)
    write_lora_adapter(tmp_path / "lora", TINY)
    hub.seed("me/base", _tree(tmp_path / "base"))
    hub.seed("me/lora", _tree(tmp_path / "lora"))
    done = run_cli(hub_env, "merge", "me/base", "me/lora", str(tmp_path / "m"), "--add", "me/lora:0.5")
    assert done.code == 0, done.err
    notes = [line for line in done.err.splitlines() if line.startswith("note: ")]
    assert sorted(notes) == ["note: me/base is not a local path; looking it up in the Hub",
                             "note: me/lora is not a local path; looking it up in the Hub"]  # me/lora twice, said once
    seen = len(hub.requests)
    cold = run_cli(hub_env, "info", "me/other", HF_HUB_OFFLINE="1")
    assert cold.code == 1 and len(hub.requests) == seen  # nothing asked of the network
    assert cold.err.splitlines() == [
        "note: me/other is not a local path; looking it up in the Hub cache (HF_HUB_OFFLINE is set)",
        cold.err.splitlines()[1],
    ] and cold.err.splitlines()[1].startswith("error: me/other is not (fully) in the cache")
    assert TOKEN not in done.err + cold.err

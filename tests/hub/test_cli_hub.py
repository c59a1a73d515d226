"""End to end: the adaptertool CLI in a subprocess, the real huggingface_hub client, the fake Hub.

Hub ids wherever a path is accepted, offline use of a warm cache, one-line errors that leave no
output behind, and a token that never shows up anywhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load

from adaptertool.ops.examples import TINY, write_llama, write_lora_adapter
from adaptertool.ops.hub import PullConfig, pull
from adaptertool.ops.merge import MergeConfig, merge
from tests.hub.conftest import run_cli
from tests.hub.fake_hub import TOKEN, FakeHub


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub-cli")
    write_llama(root / "base", TINY, dtype=torch.float32, max_shard_bytes=30_000)
    write_lora_adapter(root / "lora", TINY, base_model="me/base")
    write_lora_adapter(root / "style", TINY, seed=7, targets=("v_proj", "o_proj"), base_model="me/base")
    return {name: root / name for name in ("base", "lora", "style")}


def _publish(hub: FakeHub, models: dict[str, Path]) -> None:
    # Straight into the fake Hub: push has its own tests, and this keeps the subprocess cases short.
    for name, path in models.items():
        hub.seed(f"me/{name}", _tree(path))


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_and_pull_never_show_the_token(hub: FakeHub, hub_env: dict[str, str], models: dict[str, Path],
                                            tmp_path: Path) -> None:
    pushed = run_cli(hub_env, "-vv", "push", str(models["lora"]), "me/lora", "--private")
    assert pushed.code == 0, pushed.err
    assert pushed.out.splitlines()[-1].startswith(f"{hub.url}/me/lora/commit/") and hub.repos["me/lora"].private
    pulled = run_cli(hub_env, "-vv", "pull", "me/lora", str(tmp_path / "out"))
    assert pulled.code == 0, pulled.err
    assert pulled.out == f"{tmp_path / 'out'}\n"  # stdout is the path alone: $(adaptertool pull ...) works
    assert "HTTP Request" in pulled.err  # -vv really logged the traffic
    as_json = run_cli(hub_env, "pull", "me/lora", "--json")
    assert json.loads(as_json.out)["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    for done in (pushed, pulled, as_json):
        assert TOKEN not in done.out + done.err
    written = [*(tmp_path / "out").rglob("*"), *Path(hub_env["HF_HOME"]).rglob("*")]
    assert not [p for p in written if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert TOKEN.encode() not in hub.files("me/lora")["README.md"]


def test_merge_with_hub_ids(hub: FakeHub, hub_env: dict[str, str], models: dict[str, Path], tmp_path: Path) -> None:
    _publish(hub, models)
    done = run_cli(hub_env, "merge", "me/base", "me/lora@main", str(tmp_path / "hub-merged"), "--add", "me/style:0.5")
    assert done.code == 0, done.err
    expected = merge(MergeConfig(base=models["base"], adapters=((models["lora"], 1.0), (models["style"], 0.5)),
                                 out=tmp_path / "local-merged"))
    assert expected.merged == 6
    ours, local = _tree(tmp_path / "hub-merged"), _tree(tmp_path / "local-merged")
    assert ours["config.json"] == local["config.json"]
    assert load(ours["model.safetensors"]).keys() == load(local["model.safetensors"]).keys()
    for name, tensor in load(ours["model.safetensors"]).items():
        assert torch.equal(tensor, load(local["model.safetensors"])[name]), name
    with safe_open(tmp_path / "hub-merged" / "model.safetensors", "pt") as f:  # the card's source
        assert f.metadata()["adaptertool.base_model"] == "me/base"
        assert json.loads(f.metadata()["adaptertool.adapters"]) == ["me/lora:1", "me/style:0.5"]
    # Only top-level files of each repo were fetched, each once.
    gets = [p for m, p in hub.requests if m == "GET" and "/resolve/" in p]
    assert len(gets) == len(set(gets)) == len(_tree(models["base"])) + 2 * 2


def test_offline_with_a_warm_cache(hub: FakeHub, hub_env: dict[str, str], models: dict[str, Path], tmp_path: Path) -> None:
    _publish(hub, models)
    for repo in ("me/base", "me/lora"):  # warm the cache the subprocesses use
        pull(PullConfig(repo=repo, cache_dir=Path(hub_env["HF_HOME"]) / "hub", endpoint=hub.url, token=TOKEN))
    seen = len(hub.requests)
    hub.mode = "drop"  # and the Hub unreachable, to be sure nothing is asked of it
    info = run_cli(hub_env, "info", "me/base", "--json", HF_HUB_OFFLINE="1")
    assert info.code == 0, info.err
    assert json.loads(info.out)["tensors"] == 21
    merged = run_cli(hub_env, "merge", "me/base", "me/lora", str(tmp_path / "m"), HF_HUB_OFFLINE="1")
    assert merged.code == 0, merged.err
    assert len(hub.requests) == seen
    cold = run_cli(hub_env, "pull", "me/style", str(tmp_path / "s"), HF_HUB_OFFLINE="1")
    assert cold.code == 1 and cold.out == "" and not (tmp_path / "s").exists()
    assert cold.err.startswith("error: me/style is not (fully) in the cache") and "HF_HUB_OFFLINE" in cold.err
    assert len(cold.err.strip().splitlines()) == 1


FAILURES = {
    "401": ({"HF_TOKEN": "hf_wrongToken"}, "me/base", "the Hub needs authentication and the token was rejected (HTTP 401)"),
    "no-token": ({"HF_TOKEN": None}, "me/base", "no token was found (HTTP 401); run `hf auth login` or set HF_TOKEN"),
    "404-repo": ({}, "me/missing", "me/missing: no such repo on"),
    "404-revision": ({}, "me/base@v9", "me/base has no revision 'v9' on"),
    "dropped": ({}, "me/base", "cannot reach the Hub at"),
    "refused": ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "me/base", "(ConnectError); check the network, or set HF_HUB_OFFLINE=1"),
}


@pytest.mark.parametrize(("case", "command"), [
    *((case, "pull") for case in sorted(FAILURES)),
    # merge resolves its inputs the same way; two cases show the error reaches its command line too.
    ("404-revision", "merge"), ("dropped", "merge"), ("404-repo", "merge"),
])
def test_failures_are_one_line_and_leave_no_output(hub: FakeHub, hub_env: dict[str, str], tmp_path: Path,
                                                   case: str, command: str) -> None:
    env, repo, message = FAILURES[case]
    hub.seed("me/base", {"config.json": b"{}", "model.safetensors": b"x"})
    hub.seed("me/lora", {"adapter_config.json": b"{}", "adapter_model.safetensors": b"x"})
    if case == "dropped":
        hub.mode = "drop"
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    args = ["pull", repo, str(out)] if command == "pull" else ["merge", repo, "me/lora", str(out)]
    done = run_cli(hub_env, *args, **env)
    assert done.code == 1 and done.out == ""
    # merge says once that an input is not a local path and goes to the Hub; then the one-line error.
    note = f"note: {repo} is not a local path; looking it up in the Hub\n" if command == "merge" else ""
    assert done.err.startswith(note), done.err
    err = done.err.removeprefix(note)
    if command == "merge" and case == "404-repo":  # an input may be a mistyped relative path too
        assert err.startswith(f"error: {repo} is neither a local path nor a Hub repo: ")
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, done.err
    assert list(out.parent.iterdir()) == []  # no OUT, no staging leftovers
    assert TOKEN not in done.err and "hf_wrongToken" not in done.err


def test_hub_id_syntax_errors_are_usage_errors(hub_env: dict[str, str], tmp_path: Path) -> None:
    for bad in ("me/na..me", "me/name@", "me/-name"):
        done = run_cli(hub_env, "info", bad)
        assert done.code == 2 and "neither an existing path nor a Hub id (org/name[@revision])" in done.err
    for command in (["pull", "me/na..me"], ["push", str(tmp_path), "me/na..me"]):
        done = run_cli(hub_env, *command)
        assert done.code == 2 and "'me/na..me' is not a Hub id; expected org/name or org/name@revision" in done.err


def test_push_offline_says_push_needs_the_network(hub: FakeHub, hub_env: dict[str, str], tmp_path: Path) -> None:
    write_llama(tmp_path / "base", TINY)
    done = run_cli(hub_env, "push", str(tmp_path / "base"), "me/base", HF_HUB_OFFLINE="1")
    assert done.code == 1 and done.err == "error: uploading to me/base needs the network, and HF_HUB_OFFLINE is set; unset HF_HUB_OFFLINE to push\n"
    assert hub.requests == []


def test_a_local_path_wins_and_needs_no_hub(hub: FakeHub, hub_env: dict[str, str], models: dict[str, Path],
                                            tmp_path: Path) -> None:
    (tmp_path / "me").mkdir()
    write_llama(tmp_path / "me" / "base", TINY)
    code = (
        "import sys; from adaptertool.cli import cli; "
        "cli(['info', 'me/base'], standalone_mode=False); "
        "assert 'huggingface_hub' not in sys.modules and 'torch' not in sys.modules, 'imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=hub_env, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("me/base: safetensors") and hub.requests == []


def test_convert_to_gguf_downloads_only_the_bases_config(hub: FakeHub, hub_env: dict[str, str], models: dict[str, Path],
                                                         tmp_path: Path) -> None:
    hub.seed("me/base", _tree(models["base"]))  # the adapter's base_model_name_or_path
    done = run_cli(hub_env, "convert", str(models["lora"]), str(tmp_path / "a.gguf"), "--to", "gguf", "--json")
    assert done.code == 0, done.err
    assert json.loads(done.out)["base_config"] == "me/base"
    snapshots = Path(hub_env["HF_HOME"]) / "hub" / "models--me--base" / "snapshots"
    assert [p.name for p in snapshots.rglob("*") if p.is_file()] == ["config.json"]  # not the weights
    done = run_cli(hub_env, "convert", str(models["lora"]), str(tmp_path / "b.gguf"), "--to", "gguf", "--base", "me/nothing")
    assert done.code == 1 and done.err.splitlines()[-1].startswith("error: me/nothing is neither a local path nor a Hub repo")

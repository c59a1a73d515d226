"""push and pull through the real huggingface_hub client against the fake Hub (library level)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from adaptertool.errors import AdapterToolError
from adaptertool.ops.examples import TINY, write_llama, write_lora_adapter
from adaptertool.ops.hub import PullConfig, PushConfig, pull, push
from tests.hub.fake_hub import TOKEN, FakeHub


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hub-base") / "base"
    write_llama(out, TINY, dtype=torch.bfloat16, max_shard_bytes=12_000)
    return out


def _push(hub: FakeHub, path: Path, repo: str, **options: object) -> object:
    return push(PushConfig(path=path, repo_id=repo, endpoint=hub.url, token=TOKEN, **options))


def _pull(hub: FakeHub, repo: str, cache: Path, **options: object) -> object:
    return pull(PullConfig(repo=repo, endpoint=hub.url, token=TOKEN, cache_dir=cache, **options))


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_then_pull_is_byte_identical(hub: FakeHub, base: Path, tmp_path: Path) -> None:
    report = _push(hub, base, "me/base")
    assert hub.repos["me/base"].messages == ["initial commit", "Upload model with adaptertool"]  # one commit
    assert report.kind == "model" and report.card == "new" and report.url.endswith(f"/me/base/commit/{report.commit}")
    pulled = _pull(hub, "me/base", tmp_path / "cache", out=tmp_path / "out")
    got, sent = _tree(tmp_path / "out"), _tree(base)
    assert pulled.path == str(tmp_path / "out") and pulled.commit == report.commit
    assert sorted(got) == sorted([*sent, "README.md"]) == pulled.files
    assert {name: got[name] for name in sent} == sent
    assert got["README.md"] == hub.files("me/base")["README.md"]
    # Without OUT the files stay in the cache and the snapshot folder is the answer.
    cached = _pull(hub, "me/base", tmp_path / "cache")
    assert Path(cached.path).parent.name == "snapshots" and _tree(Path(cached.path)) == got


def test_pull_resumes_a_dropped_download(hub: FakeHub, base: Path, tmp_path: Path) -> None:
    _push(hub, base, "me/base")
    hub.truncate_next = True  # the first file over 1000 bytes is cut halfway and the connection closed
    _pull(hub, "me/base", tmp_path / "cache", out=tmp_path / "out")
    got = _tree(tmp_path / "out")
    assert not hub.truncate_next and {name: got[name] for name in _tree(base)} == _tree(base)
    gets = [path for method, path in hub.requests if method == "GET" and "/resolve/" in path]
    assert len(gets) == len(got) + 1  # one file fetched twice: the rest of it, resumed


def test_push_to_a_new_branch_and_as_pull_request(hub: FakeHub, tmp_path: Path) -> None:
    adapter = write_lora_adapter(tmp_path / "lora", TINY)
    _push(hub, adapter, "me/lora", revision="dev")
    repo = hub.repos["me/lora"]
    assert "adapter_model.safetensors" in hub.files("me/lora", "dev") and set(hub.files("me/lora")) == {".gitattributes"}
    report = _push(hub, adapter, "me/lora", create_pr=True, message="try this")
    assert report.url.endswith("/me/lora/discussions/1") and repo.messages[-1] == "try this"
    assert hub.files("me/lora", "refs/pr/1")["adapter_model.safetensors"] == (adapter / "adapter_model.safetensors").read_bytes()
    _push(hub, adapter, "me/lora", revision="refs/pr/1", message="address review")  # more commits to the open PR
    assert repo.messages[-1] == "address review" and "refs/pr/2" not in repo.refs
    with pytest.raises(AdapterToolError, match="--create-pr opens a pull request against the default branch"):
        PushConfig(path=adapter, repo_id="me/lora", create_pr=True, revision="dev")


def _with_pickle(folder: Path) -> None:
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")


def _with_staging_debris(folder: Path) -> None:
    (folder / ".merged.adaptertool-4242-x1y2").mkdir()
    (folder / ".merged.adaptertool-4242-x1y2" / "model.safetensors").write_bytes(b"partial")


def _with_partial_download(folder: Path) -> None:
    (folder / "model-00002-of-00006.safetensors.incomplete").write_bytes(b"partial")


def _missing_shard(folder: Path) -> None:
    (folder / "model-00003-of-00006.safetensors").unlink()


def _truncated_shard(folder: Path) -> None:
    shard = folder / "model-00002-of-00006.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])


@pytest.mark.parametrize(("damage", "message"), [
    (_with_pickle, "holds the pickle pytorch_model.bin; pickles can run code"),
    (_with_staging_debris, r"holds \.merged\.adaptertool-4242-x1y2/model\.safetensors, left by an unfinished run"),
    (_with_partial_download, "model-00002-of-00006.safetensors.incomplete, left by an unfinished run"),
    (_missing_shard, "model-00003-of-00006.safetensors"),
    (_truncated_shard, "model-00002-of-00006.safetensors"),
], ids=["pickle", "staging-debris", "partial-download", "missing-shard", "truncated-shard"])
def test_push_refuses_pickles_and_partial_outputs(hub: FakeHub, base: Path, tmp_path: Path, damage, message: str) -> None:
    folder = tmp_path / "model"
    shutil.copytree(base, folder)
    damage(folder)
    with pytest.raises(AdapterToolError, match=message):
        _push(hub, folder, "me/base")
    assert hub.requests == []  # refused before anything was sent


def test_push_refuses_a_staging_folder(hub: FakeHub, base: Path, tmp_path: Path) -> None:
    staging = tmp_path / ".merged.adaptertool-4242-abcd"
    shutil.copytree(base, staging)
    with pytest.raises(AdapterToolError, match="is the temporary folder of an unfinished run"):
        _push(hub, staging, "me/base")
    assert hub.requests == []


def test_pull_leaves_pickles_unless_allowed(hub: FakeHub, base: Path, tmp_path: Path) -> None:
    files = {**_tree(base), "pytorch_model.bin": b"\x80\x04not really a pickle", "training_args.bin": b"\x80\x04x"}
    hub.seed("me/old", files)
    report = _pull(hub, "me/old", tmp_path / "cache", out=tmp_path / "safe")
    assert report.pickles_skipped == ["pytorch_model.bin", "training_args.bin"] and "--allow-pickle" in report.notes[0]
    assert not list((tmp_path / "safe").glob("*.bin")) and _tree(tmp_path / "safe") == _tree(base)
    with pytest.raises(AdapterToolError, match=r"--include \*\.bin asks for pickle files"):
        _pull(hub, "me/old", tmp_path / "cache", out=tmp_path / "refused", include=("*.bin",))
    assert not (tmp_path / "refused").exists()
    _pull(hub, "me/old", tmp_path / "cache", out=tmp_path / "all", allow_pickle=True)
    assert _tree(tmp_path / "all") == files
    only = _pull(hub, "me/old", tmp_path / "cache", out=tmp_path / "json", include=("*.json",))
    assert only.files == ["config.json", "model.safetensors.index.json"]


def test_pull_of_a_pickle_only_repo_says_what_to_do(hub: FakeHub, tmp_path: Path) -> None:
    hub.seed("me/legacy", {"pytorch_model.bin": b"\x80\x04x"})
    with pytest.raises(AdapterToolError, match="it holds only pickles: pass --allow-pickle"):
        _pull(hub, "me/legacy", tmp_path / "cache", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_push_with_a_rejected_token_creates_nothing(hub: FakeHub, tmp_path: Path) -> None:
    adapter = write_lora_adapter(tmp_path / "lora", TINY)
    with pytest.raises(AdapterToolError, match=r"^me/lora: .*\(HTTP 401\); .*run `hf auth login` or set HF_TOKEN") as caught:
        push(PushConfig(path=adapter, repo_id="me/lora", endpoint=hub.url, token="hf_wrong"))
    assert "hf_wrong" not in str(caught.value) and "\n" not in str(caught.value) and hub.repos == {}

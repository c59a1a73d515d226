"""Hugging Face Hub access: the only module that imports huggingface_hub.

Downloads go through the standard cache (HF_HOME / HF_HUB_CACHE, resumable, HF_HUB_OFFLINE
respected) and fetch only files adaptertool can use; pickles (*.bin, *.pt, ...) only when the caller
allows them, and they are never unpickled. Uploads are one commit. Every huggingface_hub or network
exception leaves this module as a one-line AdapterToolError. Tokens are passed to the client and
nowhere else: no message, log line or file written here ever holds one.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx2
import huggingface_hub as hf
from huggingface_hub import constants, errors
from tqdm.auto import tqdm

from adaptertool.errors import HubError, OptionError
from adaptertool.io.hub_ids import hub_id_of_cache_path
from adaptertool.io.sidefiles import SIDE_FILES, read_json

__all__ = [
    "PICKLE_PATTERNS", "USABLE_PATTERNS", "CommitResult", "HubRef", "Snapshot", "download", "download_checkpoint",
    "hub_id_of_cache_path", "offline", "parse_hub_id", "read_card", "upload",
]

PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt")
# Weights, index, configs, tokenizer files and the model card, at any depth.
USABLE_PATTERNS = (
    "*.safetensors", "*.json", "*.jinja", "*README.md",
    *(f"*{name}" for name in SIDE_FILES if not name.endswith((".json", ".jinja"))),
)
# A checkpoint input needs only its top-level files: subfolders hold other formats (onnx/, original/...).
_NESTED = "*/*"
_CHECKPOINT_SIDE_PATTERNS = tuple(p for p in USABLE_PATTERNS if p != "*.safetensors")
# Names as huggingface_hub validates them: letters, digits, - _ . and no leading/trailing separator.
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"({_NAME}/{_NAME})(?:@(.+))?")
# Everything the client raises for a failed call: HTTP errors, cache misses and offline mode are
# OSErrors; transport failures (refused, dropped, timed out) are httpx2's own; Xet storage has one.
_FAILURES = (OSError, httpx2.TransportError, errors.XetDownloadError)
# How huggingface_hub's ValueErrors for a repo file name that escapes the target folder begin.
_UNSAFE_NAME = ("Invalid filename", "Invalid pointer path")
_CREDENTIALS = re.compile(r"://[^/@\s]*@")  # the user:password@ of a URL


@dataclass(frozen=True)
class HubRef:
    """A Hub model repo and an optional revision (branch, tag or commit; None: the default branch)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"


@dataclass(frozen=True, kw_only=True)
class CommitResult:
    repo_url: str
    commit_url: str
    commit: str
    pr_url: str | None


def parse_hub_id(text: str, *, revision: str | None = None) -> HubRef:
    """Parse ``org/name`` or ``org/name@revision`` (``revision`` is used when the text names none).

    Raises:
        AdapterToolError: not a valid id, or two revisions given.
    """
    match = _HUB_ID.fullmatch(text)
    if match is None or "--" in match.group(1) or ".." in match.group(1) or match.group(2) == "":
        raise OptionError(f"{text!r} is not a Hub id; expected org/name or org/name@revision")
    if match.group(2) is not None and revision is not None and match.group(2) != revision:
        raise OptionError(f"{text} names revision {match.group(2)!r} and --revision says {revision!r}; give one")
    return HubRef(match.group(1), match.group(2) or revision)


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    folder: Path  # the cache's snapshot folder: <cache>/models--org--name/snapshots/<commit>
    commit: str
    files: list[str]  # repo paths downloaded (or found cached), "/"-separated
    pickles_left: list[str]  # the repo's pickle files, not downloaded (empty with allow_pickle)


def download(ref: HubRef, *, include: Sequence[str] = USABLE_PATTERNS, exclude: Sequence[str] = (),
             allow_pickle: bool = False, cache_dir: Path | None = None, endpoint: str | None = None,
             token: str | None = None, progress: bool = False) -> Snapshot:
    """Download the files of ``ref`` matching ``include`` (fnmatch, ``*`` crosses folders) into the cache.

    Pickle files are left out unless ``allow_pickle``. Files already cached are not fetched again, and
    an interrupted download resumes. With HF_HUB_OFFLINE=1 the cache alone answers.

    Raises:
        AdapterToolError: auth, missing repo or revision, no connection (with what to do).
    """
    ignore = [*exclude, *(() if allow_pickle else PICKLE_PATTERNS)]
    try:
        folder = Path(hf.snapshot_download(
            ref.repo_id, revision=ref.revision, cache_dir=cache_dir, endpoint=endpoint, token=token,
            allow_patterns=list(include), ignore_patterns=ignore, tqdm_class=None if progress else _Silent,
        ))
    except _FAILURES as err:
        raise _hub_error(err, ref, endpoint=endpoint, token=token, cache_dir=cache_dir) from err
    except ValueError as err:
        # The client's refusal of a repo file name that would land outside the cache ("../x", "/etc/x").
        if not str(err).startswith(_UNSAFE_NAME):
            raise
        raise HubError(_redact(f"{ref}: the repo holds a file whose name would be written outside the download "
                                       f"folder ({str(err).splitlines()[0][:200]}); refusing it: ask its owner to "
                                       "rename the file, or --include only the files you need")) from err
    try:
        listing = [f.path for f in hf.get_cached_repo_tree(ref.repo_id, revision=folder.name, cache_dir=cache_dir)]
    except errors.CachedRepoTreeNotFoundError:  # a cache filled by an older client: what is on disk is all we know
        listing = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    files = list(hf.utils.filter_repo_objects(listing, allow_patterns=list(include), ignore_patterns=ignore))
    pickles = [] if allow_pickle else hf.utils.filter_repo_objects(listing, allow_patterns=list(PICKLE_PATTERNS),
                                                                    ignore_patterns=list(exclude))
    return Snapshot(folder=folder, commit=folder.name, files=files, pickles_left=sorted(pickles))


def download_checkpoint(ref: HubRef, *, what: str = "checkpoint", cache_dir: Path | None = None,
                        endpoint: str | None = None, token: str | None = None, progress: bool = False) -> Path:
    """Download what a command needs to read ``ref`` as a checkpoint or adapter; returns its snapshot folder.

    Top-level files only: configs and tokenizer first, then the shards the index names (or every
    top-level .safetensors when there is no index), so a repo that also holds other copies of the
    weights (consolidated files, onnx/, original/) costs only the copy that is read.
    """
    def fetch(target: HubRef, include: Sequence[str]) -> Snapshot:
        return download(target, include=include, exclude=[_NESTED], cache_dir=cache_dir, endpoint=endpoint,
                        token=token, progress=progress)

    folder = fetch(ref, _CHECKPOINT_SIDE_PATTERNS).folder
    pinned = HubRef(ref.repo_id, folder.name)  # the commit just resolved: both steps read the same revision
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    preferred = folder / "model.safetensors.index.json"
    index = preferred if preferred in indexes else (indexes[0] if len(indexes) == 1 else None)
    shards = sorted(set(read_json(index).get("weight_map", {}).values())) if index is not None else ["*.safetensors"]
    got = fetch(pinned, shards).files
    if not got:
        raise HubError(f"{ref} holds no .safetensors {what} at its top level; is it the right repo?")
    return folder


def read_card(repo_id: str, *, revision: str | None = None, endpoint: str | None = None,
              token: str | None = None) -> str | None:
    """``repo_id``'s README.md on branch ``revision`` (or, if that branch does not exist yet, the
    default branch), or None when there is no such repo or file yet. Nothing is left in the cache.
    It is the first call of a push, so failures are worded for one.

    Raises:
        AdapterToolError: auth, no connection (with what to do).
    """
    for rev in dict.fromkeys([revision, None]):
        try:
            with tempfile.TemporaryDirectory(prefix="adaptertool-card-") as scratch:
                path = hf.hf_hub_download(repo_id, "README.md", revision=rev, local_dir=scratch, endpoint=endpoint,
                                          token=token)
                return Path(path).read_text(encoding="utf-8")
        except errors.RevisionNotFoundError:
            continue
        except (errors.RepositoryNotFoundError, errors.RemoteEntryNotFoundError):
            return None
        except _FAILURES as err:
            raise _hub_error(err, HubRef(repo_id, rev), endpoint=endpoint, token=token, writing=True) from err
    return None


def upload(folder: Path, files: Sequence[str], repo_id: str, *, card: bytes | None, private: bool = False,
           revision: str | None = None, message: str, create_pr: bool = False, endpoint: str | None = None,
           token: str | None = None) -> CommitResult:
    """Create ``repo_id`` if needed and commit ``files`` (paths relative to ``folder``) plus README.md
    from ``card`` in one commit, on branch ``revision`` (created if missing) or as a pull request.

    Raises:
        AdapterToolError: auth, missing revision, no connection (with what to do).
    """
    api = hf.HfApi(endpoint=endpoint, token=token)
    operations = [hf.CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
    if card is not None:
        operations.append(hf.CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))
    ref = HubRef(repo_id, revision)
    try:
        repo_url = api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        # A new branch starts from the default branch; an open pull request (refs/pr/N) already exists.
        if revision is not None and revision != constants.DEFAULT_REVISION and not revision.startswith("refs/") \
                and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(repo_id, operations, commit_message=message, revision=revision,
                                 create_pr=create_pr)
    except ValueError as err:
        if not str(err).startswith("Invalid metadata in README.md"):
            raise
        details = "; ".join(line.lstrip("- ") for line in str(err).splitlines()[1:] if line.strip())
        raise HubError(f"{repo_id}: the Hub rejects README.md's metadata ({details}); fix its YAML header") from err
    except _FAILURES as err:
        raise _hub_error(err, ref, endpoint=endpoint, token=token, writing=True) from err
    return CommitResult(repo_url=str(repo_url), commit_url=info.commit_url, commit=info.oid, pr_url=info.pr_url)


def offline() -> bool:
    """Whether HF_HUB_OFFLINE is set: the cache alone answers, and nothing goes to the network."""
    return bool(constants.HF_HUB_OFFLINE)


class _Silent(tqdm):  # type: ignore[misc]
    """huggingface_hub's bars, switched off for this call only (its own switch is process-wide)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def _hub_error(err: OSError | httpx2.TransportError | errors.XetDownloadError, ref: HubRef, *, endpoint: str | None,
               token: str | None, cache_dir: Path | None = None, writing: bool = False) -> HubError:
    """The one-line message for a failed Hub call, with any credentials in a URL taken out."""
    described = _describe(err, ref, endpoint=endpoint, token=token, cache_dir=cache_dir, writing=writing)
    return HubError(_redact(str(described)))


def _redact(text: str) -> str:
    """``text`` with the user:password of every URL in it (an HF_ENDPOINT may hold them) replaced by ***."""
    return _CREDENTIALS.sub("://***@", text)


def _describe(err: OSError | httpx2.TransportError | errors.XetDownloadError, ref: HubRef, *, endpoint: str | None,
              token: str | None, cache_dir: Path | None = None, writing: bool = False) -> HubError:
    """What went wrong and what to do, as one line."""
    where = endpoint or constants.ENDPOINT
    login = "run `hf auth login` or set HF_TOKEN"
    cause = err.__cause__ or err.__context__
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, errors.RevisionNotFoundError):
        return HubError(f"{ref.repo_id} has no revision {ref.revision!r} on {where}; check the branch, tag or commit")
    if isinstance(err, errors.GatedRepoError):
        return HubError(f"{ref.repo_id} is gated: accept its terms on its Hub page, then {login}")
    if isinstance(err, errors.RepositoryNotFoundError):
        private = " (or it is private and the token cannot see it)" if status == 401 else ""
        return HubError(f"{ref.repo_id}: no such repo on {where}{private}; check the id, or {login}")
    if isinstance(err, errors.HfHubHTTPError) and status in (401, 403):
        has_token = token is not None or hf.get_token() is not None
        if status == 403 or (writing and has_token):
            return HubError(f"{ref.repo_id}: the Hub refused access (HTTP {status}); use a token with "
                            f"{'write' if writing else 'read'} access: {login}")
        problem = "the token was rejected" if has_token else "no token was found"
        return HubError(f"{ref.repo_id}: the Hub needs authentication and {problem} (HTTP 401); {login}")
    if isinstance(err, errors.HfHubHTTPError) and status is not None:
        return HubError(f"{ref}: {where} answered HTTP {status}; try again later")
    if isinstance(err, errors.LocalEntryNotFoundError) and isinstance(cause, OSError | httpx2.TransportError) and not \
            isinstance(cause, errors.OfflineModeIsEnabled):
        return _describe(cause, ref, endpoint=endpoint, token=token, cache_dir=cache_dir, writing=writing)
    if writing and isinstance(err, errors.LocalEntryNotFoundError | errors.OfflineModeIsEnabled):
        return HubError(f"uploading to {ref.repo_id} needs the network, and HF_HUB_OFFLINE is set; "
                        "unset HF_HUB_OFFLINE to push")
    if isinstance(err, errors.LocalEntryNotFoundError | errors.OfflineModeIsEnabled):
        cache = cache_dir or constants.HF_HUB_CACHE
        return HubError(f"{ref} is not (fully) in the cache {cache} and downloads are off (HF_HUB_OFFLINE); "
                        "pull it once online, or unset HF_HUB_OFFLINE")
    if isinstance(err, httpx2.TransportError):
        reason = type(err).__name__
        return HubError(f"cannot reach the Hub at {where} for {ref} ({reason}); check the network, or set "
                        "HF_HUB_OFFLINE=1 to use what is already in the cache")
    # The client's own checks (truncated download, missing ETag) and local disk failures.
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return HubError(f"{ref}: transfer failed ({first}); run the command again to resume")

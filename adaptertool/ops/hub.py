"""pull and push: the Hugging Face Hub, through the standard cache, one commit per push.

pull downloads what adaptertool can use (never pickles unless asked) into the cache, and copies it
to OUT when one is given. push refuses folders holding pickles or the debris of an unfinished run,
checks the checkpoint's headers, and commits the folder with a model card (README.md) whose YAML
metadata says what the folder is; the card is built in memory, so the folder is never modified.
``resolve_source`` turns a hub id given where a path is expected into a cached snapshot folder, and
``resolve_config`` into one that holds only its config.json (for a base whose architecture alone is needed).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import yaml

from adaptertool.errors import AdapterToolError, HubError, InputError, OptionError
from adaptertool.io import (
    check_output,
    is_unfinished,
    open_checkpoint,
    read_json,
    staged_output,
)
from adaptertool.io.hub import (
    PICKLE_PATTERNS,
    USABLE_PATTERNS,
    download,
    download_checkpoint,
    hub_id_of_cache_path,
    parse_hub_id,
    read_card,
    upload,
)
from adaptertool.ops.measure import Stopwatch
from adaptertool.ops.verify import verify

__all__ = [
    "ModelCard", "PullConfig", "PullReport", "PushConfig", "PushReport", "model_card", "pull", "push", "resolve_config",
    "resolve_source",
]

_NOT_UPLOADED = (".git", ".cache")  # git metadata; huggingface_hub's local_dir bookkeeping


def resolve_source(text: str, *, kind: str = "checkpoint", progress: bool = False) -> Path:
    """The local folder holding hub id ``text`` (``org/name[@revision]``), downloaded through the cache.

    Raises:
        AdapterToolError: a malformed id, or the download failed (auth, missing repo, no network).
    """
    ref = parse_hub_id(text)
    return download_checkpoint(ref, what=kind, progress=progress)


def resolve_config(text: str, *, progress: bool = False) -> Path:
    """The cached snapshot folder of hub id ``text`` with its top-level config.json alone downloaded.

    Raises:
        AdapterToolError: a malformed id, a failed download, or a repo without a top-level config.json.
    """
    ref = parse_hub_id(text)
    snapshot = download(ref, include=["config.json"], progress=progress)
    if "config.json" not in snapshot.files:
        raise HubError(f"{ref} has no config.json at its top level; is it a model repo?")
    return snapshot.folder


@dataclass(frozen=True, kw_only=True)
class PullConfig:
    repo: str  # org/name or org/name@revision
    revision: str | None = None
    out: Path | None = None  # None: leave the files in the cache and report that folder
    include: tuple[str, ...] = ()  # fnmatch patterns over repo paths; empty: every file adaptertool can use
    allow_pickle: bool = False
    force: bool = False
    cache_dir: Path | None = None  # None: HF_HUB_CACHE, under HF_HOME
    endpoint: str | None = None  # None: HF_ENDPOINT, or huggingface.co
    token: str | None = field(default=None, repr=False)  # None: HF_TOKEN, or the saved login

    def __post_init__(self) -> None:
        parse_hub_id(self.repo, revision=self.revision)
        asked = [p for p in self.include if p.endswith(tuple(s.lstrip("*") for s in PICKLE_PATTERNS))]
        if asked and not self.allow_pickle:
            raise OptionError(f"--include {asked[0]} asks for pickle files, which can run code when loaded; "
                              "pass --allow-pickle if you trust this repo (adaptertool itself never unpickles)")


@dataclass(frozen=True, kw_only=True)
class PullReport:
    repo: str
    commit: str
    path: str  # OUT, or the snapshot folder in the cache
    files: list[str]
    bytes: int
    pickles_skipped: list[str]
    notes: list[str]
    seconds: float


def pull(cfg: PullConfig, *, progress: bool = False) -> PullReport:
    """Download ``cfg.repo`` into the cache (resuming what an earlier run left), then copy it to OUT."""
    clock = Stopwatch()
    ref = parse_hub_id(cfg.repo, revision=cfg.revision)
    if cfg.out is not None:
        check_output(cfg.out, force=cfg.force)
    usable = (*USABLE_PATTERNS, *(PICKLE_PATTERNS if cfg.allow_pickle else ()))
    snapshot = download(ref, include=cfg.include or usable, allow_pickle=cfg.allow_pickle,
                        cache_dir=cfg.cache_dir, endpoint=cfg.endpoint, token=cfg.token, progress=progress)
    if not snapshot.files:
        what = " or ".join(cfg.include) if cfg.include else "files adaptertool can use"
        pickled = "; it holds only pickles: pass --allow-pickle to download them" if snapshot.pickles_left else ""
        raise HubError(f"{ref} has no {what} at commit {snapshot.commit[:12]}{pickled}")
    path = snapshot.folder
    if cfg.out is not None:
        with staged_output(cfg.out, force=cfg.force) as tmp:
            for name in snapshot.files:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(snapshot.folder / name, tmp / name)  # follows the cache's symlink to the blob
        path = cfg.out
    notes = []
    if snapshot.pickles_left and not cfg.include:
        notes.append(f"skipped {len(snapshot.pickles_left)} pickle file(s) ({', '.join(snapshot.pickles_left[:3])}): "
                     "--allow-pickle downloads them; adaptertool never unpickles")
    return PullReport(
        repo=str(ref), commit=snapshot.commit, path=str(path), files=snapshot.files,
        bytes=sum((snapshot.folder / name).stat().st_size for name in snapshot.files),
        pickles_skipped=snapshot.pickles_left, notes=notes, seconds=clock.seconds,
    )


@dataclass(frozen=True, kw_only=True)
class PushConfig:
    path: Path
    repo_id: str  # org/name
    private: bool = False  # only when the repo is created; an existing repo keeps its visibility
    revision: str | None = None  # branch to commit to, created from the default branch if missing
    message: str | None = None  # None: "Upload <what> with adaptertool"
    create_pr: bool = False
    endpoint: str | None = None  # None: HF_ENDPOINT, or huggingface.co
    token: str | None = field(default=None, repr=False)  # None: HF_TOKEN, or the saved login

    def __post_init__(self) -> None:
        if parse_hub_id(self.repo_id).revision is not None:
            raise OptionError(f"push takes REPO_ID as org/name; give the branch with --revision, not in {self.repo_id}")
        if self.create_pr and self.revision not in (None, "main"):
            raise OptionError("--create-pr opens a pull request against the default branch; drop --revision")
        if self.message is not None and not self.message.strip():
            raise OptionError("--message is empty; give a commit message or leave it out")


@dataclass(frozen=True, kw_only=True)
class PushReport:
    repo: str
    kind: str  # adapter, model, quantized model, merged model
    url: str  # the commit, or the pull request with --create-pr
    commit: str
    files: list[str]  # README.md included
    bytes: int
    card: str  # "new", or "updated": the folder's README.md (else the repo's) kept, its metadata updated
    seconds: float


def push(cfg: PushConfig, *, progress: bool = False) -> PushReport:
    """Check ``cfg.path`` and commit it to ``cfg.repo_id`` in one commit, with a model card."""
    clock = Stopwatch()
    files = _push_files(cfg.path)
    problems = verify(cfg.path, progress=progress).problems
    if problems:
        raise InputError(f"{cfg.path} looks incomplete ({problems[0]}); push a finished output")
    local = cfg.path / "README.md"
    existing = local.read_text(encoding="utf-8") if local.is_file() else read_card(
        cfg.repo_id, revision=None if cfg.create_pr else cfg.revision, endpoint=cfg.endpoint, token=cfg.token)
    card = model_card(cfg.path, cfg.repo_id, existing=existing)
    message = cfg.message or f"Upload {card.kind} with adaptertool"
    result = upload(cfg.path, [f for f in files if f != "README.md"], cfg.repo_id, card=card.text.encode(),
                    private=cfg.private, revision=cfg.revision, message=message, create_pr=cfg.create_pr,
                    endpoint=cfg.endpoint, token=cfg.token)
    sizes = {f: (cfg.path / f).stat().st_size for f in files} | {"README.md": len(card.text.encode())}
    return PushReport(
        repo=cfg.repo_id, kind=card.kind, url=result.pr_url or result.commit_url, commit=result.commit,
        files=sorted(sizes), bytes=sum(sizes.values()), card="new" if existing is None else "updated",
        seconds=clock.seconds,
    )


def _push_files(folder: Path) -> list[str]:
    """Every file to upload, as "/"-separated paths; refuses pickles and unfinished-run debris."""
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder; push takes the folder of a checkpoint or adapter")
    if is_unfinished(folder.resolve().name):
        raise InputError(f"{folder} is the temporary folder of an unfinished run; push its finished OUT")
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if relative.parts[0] in _NOT_UPLOADED or path.is_dir():
            continue
        name = relative.as_posix()
        if any(map(is_unfinished, relative.parts)):
            raise InputError(f"{folder} holds {name}, left by an unfinished run; remove it, then push again")
        if any(fnmatch(path.name, pattern) for pattern in PICKLE_PATTERNS):
            raise InputError(f"{folder} holds the pickle {name}; pickles can run code when loaded, so push "
                             "refuses them: remove it or convert it to safetensors")
        files.append(name)
    if not any(name.endswith(".safetensors") and "/" not in name for name in files):
        raise InputError(f"{folder} holds no .safetensors checkpoint or adapter at its top level; nothing to push")
    return files


# PEFT task types -> the Hub's pipeline tags.
_PIPELINES = {"CAUSAL_LM": "text-generation", "SEQ_2_SEQ_LM": "text2text-generation", "SEQ_CLS": "text-classification",
              "TOKEN_CLS": "token-classification", "QUESTION_ANS": "question-answering",
              "FEATURE_EXTRACTION": "feature-extraction"}
# Provenance keys merge writes into the safetensors metadata (ops/merge.py); quantize writes none, so a
# quantised model's base comes from config.json's _name_or_path.
_BASE_KEY, _ADAPTERS_KEY = "adaptertool.base_model", "adaptertool.adapters"


@dataclass(frozen=True, kw_only=True)
class ModelCard:
    kind: str
    text: str


def model_card(folder: Path, repo_id: str, *, existing: str | None = None) -> ModelCard:
    """README.md for ``folder``: YAML metadata describing what it holds, above the body of the
    ``existing`` card when there is one (its metadata is kept, with what adaptertool knows set or
    merged in: facts replace, tags add up)."""
    kind, facts, tags, details = _card_facts(folder)
    metadata, body = _split_card(existing, repo_id) if existing is not None else ({}, None)
    metadata.update(facts)
    metadata["tags"] = list(dict.fromkeys([*(metadata.get("tags") or []), *tags]))
    if body is None:
        body = _default_body(repo_id, kind, metadata.get("base_model"), details)
    front = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return ModelCard(kind=kind, text=f"---\n{front}---\n\n{body.lstrip()}")


def _card_facts(folder: Path) -> tuple[str, dict[str, Any], list[str], list[str]]:
    """(kind, metadata keys to set, tags to add, body lines) from the folder's configs and headers."""
    if (folder / "adapter_config.json").is_file():
        return _adapter_facts(read_json(folder / "adapter_config.json"))
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    with open_checkpoint(folder) as ckpt:
        provenance = dict(ckpt.metadata or {})
    facts: dict[str, Any] = {"library_name": "transformers"} if config.get("architectures") else {}
    base = _hub_model(provenance.get(_BASE_KEY) or config.get("_name_or_path"))
    if base is not None:
        facts["base_model"] = base
    quantization = config.get("quantization_config")
    if isinstance(quantization, dict) and quantization.get("quant_method") == "bitsandbytes":
        bits = "4-bit" if quantization.get("load_in_4bit") else "8-bit"
        kind_tags = ["bitsandbytes", bits, str(quantization.get("bnb_4bit_quant_type", "")).lower() or None]
        if base is not None:
            facts["base_model_relation"] = "quantized"
        details = [f"- `{k}`: `{v}`" for k, v in sorted(quantization.items()) if not k.startswith("_")]
        return "quantized model", facts, ["adaptertool", *filter(None, kind_tags)], ["## Quantization", "", *details]
    if _ADAPTERS_KEY in provenance:
        adapters = json.loads(provenance[_ADAPTERS_KEY])
        return "merged model", facts, ["adaptertool", "merge"], ["## Merged adapters", "", *map(_adapter_line, adapters)]
    return "model", facts, ["adaptertool"], []


def _adapter_facts(config: dict[str, Any]) -> tuple[str, dict[str, Any], list[str], list[str]]:
    peft_type = str(config.get("peft_type", "LORA")).lower()
    tags = ["adaptertool", peft_type, "peft"]
    if config.get("use_dora"):
        tags.append("dora")
    base_path = config.get("base_model_name_or_path")
    if _is_4bit(base_path):
        tags.append("qlora")
    facts: dict[str, Any] = {"library_name": "peft"}
    base = _hub_model(base_path)
    if base is not None:
        facts.update(base_model=base, base_model_relation="adapter")
    pipeline = _PIPELINES.get(str(config.get("task_type")))
    if pipeline is not None:
        facts["pipeline_tag"] = pipeline
    rank = f"rank {config['r']}, " if "r" in config else ""
    details = [f"{peft_type.upper()} adapter ({rank}targets: {', '.join(map(str, config.get('target_modules') or [])) or '-'})."]
    return "adapter", facts, tags, details


def _hub_model(value: object) -> str | None:
    """A Hub model id for a recorded base model: an id as is, a cache snapshot path mapped back; local paths give None."""
    if not isinstance(value, str) or not value:
        return None
    cached = hub_id_of_cache_path(value)
    if cached is not None:
        return cached
    try:
        ref = parse_hub_id(value)
    except AdapterToolError:
        return None
    return ref.repo_id if ref.revision is None and not Path(value).exists() else None


def _adapter_line(entry: str) -> str:
    """``- org/name (weight w)`` for a recorded ``source:weight``; a local path only by its folder name."""
    source, _, weight = entry.rpartition(":")
    return f"- {_hub_model(source) or Path(source).name} (weight {weight})"


def _is_4bit(base: object) -> bool:
    """Whether the base an adapter names is a local (or cached) 4-bit bitsandbytes checkpoint: a QLoRA adapter."""
    if not isinstance(base, str) or not (Path(base) / "config.json").is_file():
        return False
    quantization = read_json(Path(base) / "config.json").get("quantization_config") or {}
    return bool(quantization.get("load_in_4bit"))


def _split_card(text: str, repo_id: str) -> tuple[dict[str, Any], str]:
    """(YAML metadata, body) of a model card; a card without front matter has empty metadata."""
    match = re.match(r"---[ \t]*\r?\n(.*?)^---[ \t]*\r?\n?", text, flags=re.DOTALL | re.MULTILINE)
    if match is None:
        return {}, text
    try:
        metadata = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as err:
        raise InputError(f"the README.md for {repo_id}: its YAML header does not parse ({type(err).__name__}); "
                         "fix it, then push") from err
    if not isinstance(metadata, dict):
        raise InputError(f"the README.md for {repo_id}: its YAML header is not a mapping of keys to values; "
                         "fix it, then push")
    return metadata, text[match.end():]


def _default_body(repo_id: str, kind: str, base: str | None, details: list[str]) -> str:
    made_from = f" of [{base}](https://huggingface.co/{base})" if base else ""
    article = "An" if kind[0] in "aeiou" else "A"
    summary = f"{article} {kind}{made_from}, written with adaptertool (streamed safetensors model surgery)."
    lines = [f"# {repo_id.split('/')[-1]}", "", summary, "", *details]
    return "\n".join(lines).rstrip() + "\n"

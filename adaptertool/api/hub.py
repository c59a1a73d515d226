"""pull and push: the Hugging Face Hub."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from adaptertool.api.arguments import OutPath, progress_on

if TYPE_CHECKING:
    from adaptertool.ops.hub import PullReport, PushReport

__all__ = ["pull", "push"]


def pull(repo_id: str, out: OutPath | None = None, *, revision: str | None = None, include: Sequence[str] = (),
         allow_pickle: bool = False, force: bool = False, progress: bool | None = None) -> PullReport:
    """Download a Hub repo's usable files into the cache, and copy them to ``out`` if given (``adaptertool pull``).

    The report's ``path`` is where the files are. Pickles are never fetched unless ``allow_pickle``.

    Raises:
        OptionError: a malformed ``repo_id``. HubError: the download failed. OutputError: ``out``
        exists without ``force``.
    """
    from adaptertool.ops.hub import PullConfig, pull as run

    cfg = PullConfig(repo=repo_id, revision=revision, out=None if out is None else Path(out), include=tuple(include),
                     allow_pickle=allow_pickle, force=force)
    return run(cfg, progress=progress_on(progress))


def push(path: OutPath, repo_id: str, *, private: bool = False, revision: str | None = None, message: str | None = None,
         create_pr: bool = False, progress: bool | None = None) -> PushReport:
    """Upload a checkpoint or adapter folder to the Hub in one commit, with a model card (``adaptertool push``).

    Raises:
        InputError: a folder that is not a finished checkpoint or adapter, or holds pickles.
        OptionError: a malformed ``repo_id`` or option. HubError: the upload failed.
    """
    from adaptertool.ops.hub import PushConfig, push as run

    cfg = PushConfig(path=Path(path), repo_id=repo_id, private=private, revision=revision, message=message,
                     create_pr=create_pr)
    return run(cfg, progress=progress_on(progress))

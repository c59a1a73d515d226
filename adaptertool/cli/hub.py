"""The Hugging Face Hub commands: pull, push."""

from __future__ import annotations

from pathlib import Path

import click

from adaptertool.cli.app import (
    cli,
    emit,
    force_option,
    human_bytes,
    json_option,
    progress_enabled,
    quiet_option,
)
from adaptertool.cli.sources import HubId


@cli.command("pull")
@click.argument("repo_id", type=HubId())
@click.argument("out", type=click.Path(path_type=Path), required=False)
@click.option("--revision", default=None, metavar="REV", help="Branch, tag or commit [default: the repo's default branch].")
@click.option("--include", multiple=True, metavar="PATTERN",
              help="Download only repo files matching PATTERN (fnmatch, e.g. '*.json'; repeatable) "
                   "[default: safetensors, index, configs, tokenizer files, README.md].")
@click.option("--allow-pickle/--no-allow-pickle", default=False, show_default=True,
              help="Also download pickle files (*.bin, *.pt, ...). They can run code when loaded; adaptertool never loads them.")
@force_option
@json_option
@quiet_option
def pull_cmd(repo_id: str, out: Path | None, revision: str | None, include: tuple[str, ...], allow_pickle: bool,
             force: bool, as_json: bool, quiet: bool) -> None:
    """Download a Hub repo's usable files into the cache (and copy them to OUT); print the local path.

    REPO_ID is org/name or org/name@revision. Never fetches pickles unless --allow-pickle; resumes
    interrupted downloads; HF_HOME, HF_HUB_OFFLINE and HF_TOKEN (or `hf auth login`) apply.

    Example: adaptertool pull HuggingFaceTB/SmolLM2-135M ./smollm2
    """
    from adaptertool.api.hub import pull

    report = pull(repo_id, out, revision=revision, include=include, allow_pickle=allow_pickle, force=force,
                  progress=progress_enabled(quiet, as_json))
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    if not as_json:
        click.echo(f"{report.repo} at {report.commit[:12]}: {len(report.files)} file(s), {human_bytes(report.bytes)}",
                   err=True)
    emit(report, as_json, lambda r: r.path)


@cli.command("push")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("repo_id", type=HubId())
@click.option("--private/--no-private", default=False, show_default=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", default=None, metavar="BRANCH", help="Commit to this branch (created if missing) or to an open pull request's refs/pr/N [default: main].")
@click.option("--message", "-m", default=None, help="Commit message [default: 'Upload <what> with adaptertool'].")
@click.option("--create-pr/--no-create-pr", default=False, show_default=True,
              help="Open a pull request with the commit instead of committing to the branch.")
@json_option
@quiet_option
def push_cmd(path: Path, repo_id: str, private: bool, revision: str | None, message: str | None, create_pr: bool,
             as_json: bool, quiet: bool) -> None:
    """Upload a checkpoint or adapter folder to the Hub in one commit, with a model card.

    Creates the repo if needed; writes README.md's YAML metadata (library, base model, tags) and
    keeps the body of the README.md the folder (or else the repo) already has. Refuses pickles and
    unfinished outputs. HF_TOKEN (or `hf auth login`) gives the token.

    Example: adaptertool push ./my-lora me/my-lora --private
    """
    from adaptertool.api.hub import push

    report = push(path, repo_id, private=private, revision=revision, message=message, create_pr=create_pr,
                  progress=progress_enabled(quiet, as_json))
    emit(report, as_json, lambda r: (
        f"pushed {r.kind} {path} to {r.repo}: {len(r.files)} file(s), {human_bytes(r.bytes)}, "
        f"model card {r.card}, in {r.seconds:.1f} s\n{r.url}"
    ))

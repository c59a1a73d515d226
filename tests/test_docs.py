"""Every example in docs/commands/*.md runs as pasted, in a folder where the README's demo ran.

``console`` blocks hold ``$ command`` lines, each followed by its output: the exit code must be the
one the output implies (``error:`` 1, click's ``Usage:`` 2, else 0). ``bash`` blocks hold commands
alone, which must succeed. Blocks meant only to be read are ``text``. Each page runs in a fresh
folder holding the demo's files, so a page cannot lean on files another page made.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from adaptertool.cli import cli
from adaptertool.cli.app import _group_options_first

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs" / "commands").glob("*.md"))


@dataclass(frozen=True)
class Example:
    line: str
    exit_code: int


def examples(text: str) -> list[Example]:
    found = []
    for kind, body in re.findall(r"```(console|bash)\n(.*?)```", text, re.S):
        lines = body.splitlines()
        for i, line in enumerate(lines):
            if kind == "bash":
                command = line.split(" #", 1)[0].strip()
                if command and not command.startswith("#"):
                    found.append(Example(command, 0))
            elif line.startswith("$ "):
                output = lines[i + 1] if i + 1 < len(lines) else ""
                code = 1 if output.startswith("error:") else 2 if output.startswith("Usage:") else 0
                found.append(Example(line[2:], code))
    return found


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What README.md's first command leaves: ``adaptertool demo`` run in an empty folder."""
    root = tmp_path_factory.mktemp("readme")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # the demo's default OUT is relative
        result = CliRunner().invoke(cli, ["demo"])
    assert result.exit_code == 0, result.output
    return root


def test_the_docs_use_the_folder_the_readme_demo_writes() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "&& adaptertool demo\n" in readme and "`./adaptertool-demo`" in readme
    for page in PAGES:
        assert not re.search(r"(?<![\w-])demo/", page.read_text(encoding="utf-8")), f"{page.name} uses demo/, not adaptertool-demo/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_every_example_runs_as_pasted(page: Path, demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    shutil.copytree(demo, work)
    monkeypatch.chdir(work)
    for example in examples(page.read_text(encoding="utf-8")):
        words = shlex.split(example.line.split(" | ", 1)[0])  # a pipe's tail only trims the output
        env = dict(w.split("=", 1) for w in words if re.fullmatch(r"[A-Z_]+=\S*", w))
        words = words[len(env):]
        if words[0] != "adaptertool":  # a shell command showing the result, such as ls
            done = subprocess.run(example.line, shell=True, capture_output=True, text=True, check=False)
            assert done.returncode == example.exit_code, f"{page.name}: `{example.line}`: {done.stderr}"
        elif not _needs_hub(words):
            result = CliRunner(env=env).invoke(cli, _group_options_first(words[1:]))
            assert result.exit_code == example.exit_code, f"{page.name}: `{example.line}` exited {result.exit_code}:\n{result.output}"


def _needs_hub(words: list[str]) -> bool:
    # tests/hub runs these against a fake Hub; here nothing may reach the network.
    return words[1] in ("push", "pull") or any(
        re.fullmatch(r"[\w.-]+/[\w.-]+(@\S+)?(:[-\d.]+)?", w) and not Path(w.split(":")[0]).exists() for w in words[2:])

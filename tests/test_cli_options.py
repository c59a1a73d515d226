"""Every command's parameters follow the conventions README.md states under "Commands", so the CLI stays one surface.

The rules: a boolean is a ``--x/--no-x`` pair (a bare ``is_flag`` leaves no way to turn a default
off, nor to say so explicitly); every option has help, and shows its default when it has one; a
command that writes an output (it takes ``--force``) names it as the positional OUT; ``--alpha``
means the same in every command. The group's own options (``--debug``, ``-v``, ``--threads``) are
not walked: ``main()`` parses ``--debug`` itself, wherever it stands.
"""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from adaptertool.cli import cli

COMMANDS = sorted(cli.commands.items())


def _violations(command: click.Command) -> list[str]:
    """Every way ``command``'s parameters break the rules, one line each."""
    found = []
    options = [p for p in command.params if isinstance(p, click.Option)]
    for option in options:
        flag = max(option.opts, key=len)
        if not option.help:
            found.append(f"{flag} has no help")
        if option.is_flag and not option.count:
            want = [f"--no-{flag.removeprefix('--')}"]
            if not option.is_bool_flag or option.secondary_opts != want:
                found.append(f"{flag} is a flag without its pair: declare it as '{flag}/{want[0]}'")
        # to_info_dict gives None for "no default" (click's unset sentinel of a multiple option included).
        if option.to_info_dict()["default"] not in (None, ()) and not option.show_default:
            found.append(f"{flag} has a default but not show_default=True")
    names = {p.name for p in command.params}
    arguments = {p.name for p in command.params if isinstance(p, click.Argument)}
    if "force" in names and "out" not in arguments:
        found.append("writes an output (takes --force) but has no positional OUT argument")
    return found


@pytest.mark.parametrize(("name", "command"), COMMANDS, ids=[name for name, _ in COMMANDS])
def test_command_follows_the_option_rules(name: str, command: click.Command) -> None:
    assert _violations(command) == []


def test_the_rules_catch_a_bare_flag_and_an_output_given_only_as_an_option() -> None:
    @click.command()
    @click.option("-o", "--out", required=True, help="Output.")
    @click.option("--force/--no-force", default=False, show_default=True, help="Replace OUT.")
    @click.option("--fast", is_flag=True, help="A bare flag.")
    @click.option("--level", default=3)
    def bad(out: str, force: bool, fast: bool, level: int) -> None:
        """A command that breaks every rule."""

    assert _violations(bad) == [
        "--fast is a flag without its pair: declare it as '--fast/--no-fast'",
        "--fast has a default but not show_default=True",
        "--level has no help",
        "--level has a default but not show_default=True",
        "writes an output (takes --force) but has no positional OUT argument",
    ]


def test_every_command_with_an_output_found() -> None:
    # The OUT rule keys on --force; this list keeps a command from escaping it by dropping --force.
    writers = {name for name, command in COMMANDS if any(p.name == "force" for p in command.params)}
    assert writers == {"combine", "convert", "demo", "dequantize", "extract", "init", "merge", "pull", "quantize",
                       "reshard", "subtract", "train"}


def test_alpha_has_one_default_everywhere(tmp_path: Path) -> None:
    from adaptertool.ops.init import InitConfig
    from adaptertool.ops.train import TrainConfig
    from adaptertool.training.lora import LoraSpec

    alphas = {name: p for name, command in COMMANDS for p in command.params if p.name == "alpha"}
    assert set(alphas) == {"init", "train"}
    assert len({(p.default, p.help) for p in alphas.values()}) == 1, "--alpha differs between commands"
    assert "[default: the rank" in str(alphas["train"].help)
    # The configs behind the options agree: no alpha means lora_alpha == r (scaling 1), the
    # convention extract, convert and combine write.
    assert TrainConfig(base=tmp_path, data=tmp_path, out=tmp_path, rank=8).lora().alpha == 8.0
    assert InitConfig(base=tmp_path, out=tmp_path, rank=8).lora_alpha == 8.0
    assert LoraSpec().alpha == LoraSpec().rank

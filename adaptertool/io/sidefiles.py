"""Files that travel with a model's weights: configs, tokenizer, chat template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from adaptertool.errors import InputError

__all__ = ["SIDE_FILES", "copy_side_files", "read_json"]

# What a user expects carried over to an output model. A model card (README.md) is not: it
# describes the input model, not what a command made of it.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
)


def copy_side_files(source: Path | None, dest: Path, *, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy the side files present in folder ``source`` into ``dest``; returns their names."""
    if source is None:
        return []
    copied = []
    for name in SIDE_FILES:
        if name not in skip and (source / name).is_file():
            shutil.copyfile(source / name, dest / name)
            copied.append(name)
    return copied


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object from ``path`` with a one-line error naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"), parse_int=_integer)
    except FileNotFoundError as err:
        raise InputError(f"{path} does not exist; check the path") from err
    except (OSError, ValueError) as err:  # ValueError: bad UTF-8 or JSON, or an integer past Python's 4300 digits
        raise InputError(f"{path}: cannot be read as JSON ({err})") from err
    except RecursionError:
        raise InputError(f"{path}: cannot be read as JSON (nested too deeply)") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: expected a JSON object")
    return value


def _integer(text: str) -> int:
    # Python's own refusal past 4300 digits tells the user to call sys.set_int_max_str_digits().
    if len(text.lstrip("-")) > 4300:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)

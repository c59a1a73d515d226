"""Imports flow one way: cli -> api -> ops -> {adapters, quant, training, io}; the maths never touches files."""

from __future__ import annotations

import ast
from pathlib import Path

import adaptertool

PACKAGE = Path(adaptertool.__file__).parent

# package folder -> import prefixes it must never use
FORBIDDEN = {
    "adapters": ("adaptertool.io", "adaptertool.ops", "adaptertool.api", "adaptertool.cli", "click", "tqdm", "huggingface_hub"),
    "quant": ("adaptertool.io", "adaptertool.ops", "adaptertool.api", "adaptertool.cli", "click", "tqdm", "huggingface_hub"),
    "io": ("adaptertool.adapters", "adaptertool.quant", "adaptertool.training", "adaptertool.ops", "adaptertool.api",
           "adaptertool.cli", "click"),
    "api": ("adaptertool.cli", "click"),
    "ops": ("adaptertool.api", "adaptertool.cli", "click"),
    "training": ("adaptertool.api", "adaptertool.cli", "adaptertool.ops", "click"),
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_layers_import_only_downwards() -> None:
    offences = []
    checked = 0
    for layer, banned in FORBIDDEN.items():
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            checked += 1
            for name in _imports(path):
                if name.startswith(banned):
                    offences.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert checked > 10
    assert offences == []


def test_only_io_hub_imports_huggingface_hub() -> None:
    users = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
             if any(n.startswith("huggingface_hub") for n in _imports(p))]
    assert set(users) <= {"io/hub.py"}


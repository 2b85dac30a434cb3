"""The layers point one way: the core (uniinst/ outside uniinst/ray/) imports neither Ray nor
the Ray layer; only the command line, which picks what a command runs on, reaches into it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "uniinst"
ENTRY_POINTS = {"cli.py"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_core_imports_neither_ray_nor_the_ray_layer():
    core = [
        p for p in PACKAGE.rglob("*.py")
        if "ray" not in p.relative_to(PACKAGE).parts[:1] and p.relative_to(PACKAGE).as_posix() not in ENTRY_POINTS
    ]
    assert len(core) > 40
    offending = {
        p.relative_to(PACKAGE).as_posix(): sorted(
            n for n in _imports(p) if n.split(".")[0] == "ray" or n.startswith("uniinst.ray")
        )
        for p in core
    }
    assert {k: v for k, v in offending.items() if v} == {}

"""No import circles inside ragdec/cache and ragdec/retrieval.

Every ``import`` statement counts, those inside functions too: a lazy import hides a circle
from Python but not from a reader (``backends`` opening ``postgres`` while ``postgres``
took its errors from ``backends`` was one; the errors now live in ``cache/errors.py``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ragdec

ROOT = Path(ragdec.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """The modules (and ``module.name``, which may be a submodule) that ``path`` imports.

    Example: in ragdec/cache/store.py, ``from .errors import CacheFileError`` gives
    {"ragdec.cache.errors", "ragdec.cache.errors.CacheFileError"}.
    """
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan).

    Example: ``circles({"a": {"b"}, "b": {"a"}, "c": {"a"}})`` -> ``[["a", "b"]]``.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(group) > 1:
                found.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_circles_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert circles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("package", ["cache", "retrieval"])
def test_no_import_circle(package):
    paths = {module_name(p): p for p in sorted((ROOT / package).glob("*.py"))}
    graph = {name: (imported(path) & paths.keys()) - {name} for name, path in paths.items()}
    assert circles(graph) == [], "modules that import each other (directly or round a circle)"

"""The package's shape: no import cycle between its parts, a thin entry point, small files.

A part is a sub-package (``lightning_stl.data``) or a top-level module (``lightning_stl.run``).
Every ``import`` of the package's files is read (also those inside functions and under
``TYPE_CHECKING``), so a cycle cannot hide behind a lazy import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_stl"


def part_of(module: str) -> str | None:
    """``lightning_stl.data.streams`` -> ``data``; ``lightning_stl`` itself -> ``None``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "lightning_stl" else None


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """``{part: the other parts it imports}`` from every file of ``package``."""
    graph: dict[str, set[str]] = {}
    for path in sorted(package.rglob("*.py")):
        module = ".".join(path.relative_to(package.parent).with_suffix("").parts)
        source = part_of(module.removesuffix(".__init__"))
        if source is None:
            continue
        graph.setdefault(source, set())
        package_parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's own package, `level - 1` up
                    parent = package_parts[: len(package_parts) - node.level + 1]
                    base = ".".join([*parent, *([base] if base else [])])
                # `from lightning_stl import data` imports lightning_stl.data
                names = [f"{base}.{alias.name}" for alias in node.names] + [base]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            graph[source].update(p for n in names if (p := part_of(n)) not in (None, source))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each part that can reach itself, with the path it takes back (depth-first)."""
    found = []
    for start in sorted(graph):
        stack = [(start, [start])]
        seen: set[str] = set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    found.append([*path, start])
                    stack.clear()
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    return found


def test_no_part_of_the_package_imports_itself_back():
    graph = import_graph()
    assert {"run", "methods", "regularizers", "data", "models", "callbacks"} <= set(graph)
    assert "methods" in graph["run"] or "method_module" in graph["run"]  # the graph is read
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle(tmp_path):
    package = tmp_path / "lightning_stl"
    (package / "a").mkdir(parents=True)
    (package / "a" / "__init__.py").write_text("import lightning_stl.b\n")
    (package / "b.py").write_text("def f():\n    from lightning_stl.a import x\n")
    assert cycles(import_graph(package)) == [["a", "b", "a"], ["b", "a", "b"]]
    (package / "b.py").write_text("from lightning_stl import c\n")
    (package / "c.py").write_text("from .a import x\n")  # relative, lazy or not: read
    assert ["a", "b", "c", "a"] in cycles(import_graph(package))


def test_the_regularizers_never_import_the_methods_or_the_data():
    assert not {"methods", "data", "interpolation", "run"} & import_graph()["regularizers"]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_files_stay_small(path: Path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    limit = 200 if path == PACKAGE / "run.py" else 400
    assert lines <= limit, f"{path.relative_to(PACKAGE)} has {lines} lines (at most {limit})"

"""The house: no import circle anywhere in the tree (neox_jax/, convert/, scripts/; imports inside functions counted
too), the library never imports the command line, and the int8 kernels a leaf."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

FOLDERS = ("neox_jax", "convert", "scripts")
# entry points may import the command line: they are thin wrappers over it
ENTRY_POINTS = ("neox_jax.__main__", "convert.__main__")


def _module_name(f: Path) -> str:
    parts = f.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _files() -> dict[str, Path]:
    return {_module_name(f): f for folder in FOLDERS for f in (ROOT / folder).rglob("*.py")}


def _absolute(node: ast.ImportFrom, mod: str, is_package: bool) -> str:
    """The module an ImportFrom names, relative imports resolved against `mod`."""
    if not node.level:
        return node.module or ""
    base = mod.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports() -> dict[str, set[str]]:
    """module -> the tree's modules it imports anywhere in its body. `from pkg import name` counts as an import of
    pkg.name when that is a module; an import of one's own parent package is no edge (Python runs the parent's
    __init__ first, whatever the child imports)."""
    files = _files()
    graph = {}
    for mod, f in files.items():
        found = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = _absolute(node, mod, f.name == "__init__.py")
                for a in node.names:
                    found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[mod] = {d for d in found if d in files and d != mod and not mod.startswith(d + ".")}
    return graph


def test_the_graph_sees_the_tree():
    graph = _imports()
    assert {"neox_jax.api", "convert.hf", "convert.hub", "neox_jax.bench.generate"} <= set(graph)
    assert "convert.hf" in graph["convert.hub"]  # relative imports are resolved
    assert "neox_jax.store.checkpoint" in graph["neox_jax.api"]


def test_no_import_circle():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(m) :] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


def test_the_library_never_imports_the_command_line():
    graph = _imports()
    offenders = {
        m: sorted(d for d in deps if d == "neox_jax.cli" or d.startswith("neox_jax.cli."))
        for m, deps in graph.items()
        if not (m.startswith(("neox_jax.cli", "scripts")) or m in ENTRY_POINTS)
    }
    assert {m: d for m, d in offenders.items() if d} == {}


def test_the_model_stands_below_everything_else():
    """model/ needs only errors, itself and the sharding rules: nothing that runs, stores or serves it."""
    allowed = ("neox_jax.model", "neox_jax.errors", "neox_jax.parallel.sharding")
    graph = _imports()
    found = {
        m: sorted(d for d in deps if not d.startswith(allowed))
        for m, deps in graph.items()
        if m.startswith("neox_jax.model")
    }
    assert {m: d for m, d in found.items() if d} == {}


def test_int8_kernels_are_a_leaf():
    assert _imports()["neox_jax.model.int8"] == set()

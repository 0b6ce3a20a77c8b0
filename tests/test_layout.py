"""The house: no import circle between neox_jax's modules (counting imports inside functions too), and the int8
kernels a leaf."""

from __future__ import annotations

import ast

from conftest import ROOT


def _imports() -> dict[str, set[str]]:
    """module -> the neox_jax modules it imports anywhere in its body (the package __init__s left out)."""
    graph = {}
    for f in (ROOT / "neox_jax").rglob("*.py"):
        mod = ".".join(f.relative_to(ROOT).with_suffix("").parts)
        if mod.endswith("__init__") or mod.endswith("__main__"):
            continue
        found = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("neox_jax"):
                found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("neox_jax")}
        graph[mod] = found
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


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


def test_int8_kernels_are_a_leaf():
    assert _imports()["neox_jax.model.int8"] == set()

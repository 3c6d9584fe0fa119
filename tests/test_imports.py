"""The package's import graph has no circle (issue 12).

Edges are read from the source with ``ast``, not by importing, so a circle fails here even where the
import order happens to hide it. An edge is a **module-level** import of an nnethics module (inside ``if``
/ ``try`` at module level too; ``if TYPE_CHECKING:`` blocks excluded): importing ``a.b.c`` also executes
the packages ``a.b`` and ``a`` (their ``__init__``), so those count too, except the importer's own
ancestors (already being imported when it runs).

Imports inside functions are not edges of that graph: they run after every module finished importing,
so they cannot meet a half-initialised module (the package uses them to keep torch and nnsight out of
``import nnethics`` and of the render layer). To tell a deferred import that only hides a circle from
one that keeps import time low, a second test builds the graph with the function-level imports too and
requires the model layer (``nnethics.models``) to be acyclic in it as well: nothing there may reach back.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "nnethics"


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if _is_package(importer) else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and ("TYPE_CHECKING" in ast.unparse(test))


def _imports(tree: ast.AST, deferred: bool):
    """Import nodes at module level (and with ``deferred``, inside functions too)."""
    stack = list(ast.iter_child_nodes(tree))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif _is_type_checking(node):
            continue
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and not deferred:
            continue
        else:
            stack.extend(ast.iter_child_nodes(node))


def _targets(importer: str, node: ast.AST) -> set[str]:
    found = set()
    if isinstance(node, ast.Import):
        found = {alias.name for alias in node.names}
    else:
        source = _resolve(importer, node)
        found = {source}
        found |= {f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in MODULES}
    out = set()
    own_ancestors = {".".join(importer.split(".")[:i]) for i in range(1, importer.count(".") + 1)}
    for name in found:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in MODULES and prefix not in own_ancestors and prefix != importer:
                out.add(prefix)
    return out


def graph(deferred: bool = False) -> dict[str, set[str]]:
    edges = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        edges[name] = set().union(*(_targets(name, n) for n in _imports(tree, deferred)))
    return edges


def cycles(edges: dict[str, set[str]], within: str = "") -> list[list[str]]:
    """Every elementary circle found by depth-first search, as module lists (first == last)."""
    found, state, path = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if within and not nxt.startswith(within):
                continue
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state and node.startswith(within):
            visit(node)
    return found


def test_the_graph_is_read_from_the_source():
    edges = graph()
    assert "nnethics.models.handle" in edges["nnethics.models.loading"]
    assert "nnethics.models.remote" in edges["nnethics.models.handle"]  # the package __init__ runs too
    assert "nnethics.models" not in edges["nnethics.models.handle"]  # its own package is already importing


def test_no_module_level_import_circle():
    assert cycles(graph()) == []


def test_no_circle_in_the_model_layer_even_through_deferred_imports():
    assert cycles(graph(deferred=True), within="nnethics.models") == []


def test_a_circle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]

"""The package's shape, checked on its source (issue 12): small modules, short functions, no import circle.

The rules:

* no module in ``nnethics/`` is longer than ``MAX_MODULE_LINES`` (400) lines: split a long module by meaning
  (a concept per module, e.g. ``store/`` parts, provenance, schema, atomic), not by line count;
* no function or method is longer than ``MAX_FUNCTION_LINES`` (60) lines (``end_lineno - lineno + 1`` of its
  ``def`` in the AST, decorators not counted) unless its docstring gives the reason, with a sentence that
  starts with the marker ``Long because`` (e.g. "Long because the trace must stay one remote request");
* the modules of ``nnethics`` import each other without a circle (imports at module level; an import inside
  a function runs later and does not count).

Code that breaks a rule today and that is being changed elsewhere is listed below, with its owner; an entry
that no longer breaks its rule fails the test too, so the lists only shrink.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nnethics"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
MARKER = "Long because"

# Modules over MAX_MODULE_LINES, path relative to nnethics/ -> owner.
LONG_MODULES: dict[str, str] = {}
# Places outside the registry and the analyses that name an analysis, with the reason (the list only shrinks).
NAMING_EXCEPTIONS = {
    # version 1 of the schema is closed: its patching files carry analysis="patching*", a value in old files
    "nnethics/store/schema.py": ["36:patching"],
}
# Functions over MAX_FUNCTION_LINES without a reason, "path:qualified name" -> owner.
LONG_FUNCTIONS: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    return {p.relative_to(PACKAGE).as_posix(): p for p in sorted(PACKAGE.rglob("*.py"))}


def _functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) of every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def long_modules() -> dict[str, int]:
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in _modules().items()}
    return {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES}


def unexplained_long_functions(source: str) -> dict[str, int]:
    """Functions of ``source`` over MAX_FUNCTION_LINES whose docstring does not say why (``Long because``)."""
    out = {}
    for qual, node in _functions(ast.parse(source)):
        n = node.end_lineno - node.lineno + 1
        if n > MAX_FUNCTION_LINES and MARKER not in (ast.get_docstring(node) or ""):
            out[qual] = n
    return out


def long_functions() -> dict[str, int]:
    return {f"{name}:{qual}": n for name, path in _modules().items()
            for qual, n in unexplained_long_functions(path.read_text(encoding="utf-8")).items()}


def _module_name(rel: str) -> str:
    parts = ["nnethics", *rel[:-3].split("/")]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the nnethics modules it imports at module level (``from . import x`` counts as ``pkg.x`` when
    that is a module, else as ``pkg``)."""
    names = {_module_name(rel): path for rel, path in _modules().items()}
    graph: dict[str, set[str]] = {}
    for mod, path in names.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    deps.add(sub if sub in names else target)
        graph[mod] = {d for d in deps if d in names and d != mod}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_module_is_longer_than_400_lines_except_the_listed_ones():
    found = long_modules()
    assert not {k: n for k, n in found.items() if k not in LONG_MODULES}, (
        f"split these by meaning (at most {MAX_MODULE_LINES} lines)")
    assert not [k for k in LONG_MODULES if k not in found], "now short enough: remove them from LONG_MODULES"


def test_no_function_is_longer_than_60_lines_without_saying_why_except_the_listed_ones():
    found = long_functions()
    assert not {k: n for k, n in found.items() if k not in LONG_FUNCTIONS}, (
        f"shorten these (at most {MAX_FUNCTION_LINES} lines) or say why in the docstring ('{MARKER} ...')")
    assert not [k for k in LONG_FUNCTIONS if k not in found], "now short enough: remove them from LONG_FUNCTIONS"


def test_the_package_has_no_import_circle():
    assert import_cycles(import_graph()) == []


@pytest.mark.parametrize("source, expected", [
    ("def f():\n" + "    x = 1\n" * 61, {"f": 62}),
    ('def f():\n    """Long because it must."""\n' + "    x = 1\n" * 61, {}),
    ("class C:\n    def m(self):\n" + "        x = 1\n" * 60, {"C.m": 61}),
    ("def f():\n" + "    x = 1\n" * 59, {}),
])
def test_the_function_rule_counts_def_to_last_line_and_reads_the_marker(source, expected):
    assert unexplained_long_functions(source) == expected


def test_the_cycle_finder_finds_a_circle():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def _counts():
    import importlib.util

    spec = importlib.util.spec_from_file_location("counts", PACKAGE.parent / "scripts" / "counts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_only_the_registry_and_the_analyses_name_an_analysis():
    """Everything else reads the registry (issue 25): a string equal to an analysis' file name, or an import of
    an analysis' package, outside ``nnethics/analyses/`` is a place that must change when an analysis does."""
    counts = _counts()
    assert counts.naming(counts.modules()) == NAMING_EXCEPTIONS
    assert counts.private_imports(counts.modules()) == []


def test_the_naming_count_sees_a_name_and_an_import(tmp_path, monkeypatch):
    counts = _counts()
    (tmp_path / "nnethics" / "analyses").mkdir(parents=True)
    (tmp_path / "nnethics" / "other.py").write_text('"""decisions in a docstring is fine."""\nfrom .analyses.lens '
                                                    'import x\nNAME = "patching_grid"\nTEXT = "decisions, here"\n')
    (tmp_path / "nnethics" / "analyses" / "mine.py").write_text('NAME = "patching"\n')
    monkeypatch.setattr(counts, "ROOT", tmp_path)
    monkeypatch.setattr(counts, "PACKAGE", tmp_path / "nnethics")
    assert counts.naming(counts.modules()) == {"nnethics/other.py": ["2:import analyses.lens", "3:patching_grid"]}


def test_analysis_code_never_imports_the_engine():
    """The engine runs the analyses; an analysis declares and computes and never calls back into its driver. Only
    an analysis' own CLI commands (``command.py``, as ``nnethics/commands``) may use the engine's run."""
    counts = _counts()
    graph = counts.imports(counts.modules())
    back = {m: sorted(d for d in deps if d.startswith("nnethics.engine")) for m, deps in graph.items()
            if m.startswith("nnethics.analyses") and not m.endswith(".command")}
    assert {m: d for m, d in back.items() if d} == {}
    assert any(d.startswith("nnethics.engine") for d in graph["nnethics.analyses.lens.command"])  # the rule sees one

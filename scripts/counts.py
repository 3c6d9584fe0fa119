"""The shape of the run's life and of the analyses, counted on the source (issue 25), plus one run's lock count.

    python scripts/counts.py            # static counts only (seconds)
    python scripts/counts.py --run      # and the lock acquisitions of one `nnethics run` on the built-in model

Each count prints with what it found, so a number can be checked by eye:

* lifecycle drivers: functions that call the chunk loop (``run_in_chunks``);
* places building provenance: calls of the function ``provenance(`` outside ``nnethics/store`` (methods named so
  are not counted: they call it);
* lock sites: calls of ``store_lock(`` outside ``nnethics/store``; with ``--run``, the acquisitions of the model
  folder's lock that one ``nnethics run`` makes (nested holds of the same process not counted as new);
* places naming analyses: string constants equal to a registered analysis or variant name, outside
  ``nnethics/analyses`` and the registry (docstrings and comments excluded), by file;
* private cross-module imports: ``from nnethics.x import _name`` between two different modules;
* import circles: strongly connected components of the import graph, function-level imports included.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nnethics"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["nnethics", *path.relative_to(PACKAGE).with_suffix("").parts]
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _target(mod: str, path: Path, node: ast.ImportFrom) -> str:
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    if not node.level:
        return node.module or ""
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the nnethics modules it imports anywhere (function-level imports included)."""
    graph = {}
    for mod, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom):
                target = _target(mod, path, node)
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    deps.add(sub if sub in mods else target)
        graph[mod] = {d for d in deps if d in mods and d != mod}
    return graph


def private_imports(mods: dict[str, Path]) -> list[str]:
    out = []
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                target = _target(mod, path, node)
                if target.startswith("nnethics") and target != mod:
                    out += [f"{mod} <- {target}.{a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")]
    return out


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def calls(mods: dict[str, Path], name: str, skip: str) -> list[str]:
    """``file:line function`` of each call of ``name(...)`` outside the folder ``skip``."""
    out = []
    for path in mods.values():
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(skip):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name:
                        out.append(f"{rel}:{node.lineno} {fn.name}")
    return sorted(set(out))


def naming(mods: dict[str, Path]) -> dict[str, list[str]]:
    from nnethics.analyses import ANALYSES

    names = set(ANALYSES)
    out: dict[str, list[str]] = defaultdict(list)
    for path in mods.values():
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("nnethics/analyses/"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names \
                    and id(node) not in docs:
                out[rel].append(f"{node.lineno}:{node.value}")
            elif isinstance(node, ast.ImportFrom) and node.module and any(
                    f"analyses.{n}" == node.module.removeprefix("nnethics.").lstrip(".") for n in names):
                out[rel].append(f"{node.lineno}:import {node.module}")
    return dict(out)


def lock_count() -> int:
    """Acquisitions of a model folder's lock (outermost holds) during one ``nnethics run`` on the built-in model."""
    import tempfile

    from click.testing import CliRunner

    from nnethics.cli import cli
    from nnethics.store import lock

    count = [0]
    real = lock.lock_for

    def counting(folder: Path):
        fl = real(folder)
        if not getattr(fl, "_counted", False):
            acquire = fl.acquire

            def counted(*a, **k):
                if not fl.is_locked:
                    count[0] += 1
                return acquire(*a, **k)

            fl.acquire, fl._counted = counted, True
        return fl

    lock.lock_for = counting
    with tempfile.TemporaryDirectory() as store:
        res = CliRunner().invoke(cli, ["run", "--limit", "2", "--analyses", "decisions,patching,heads", "--store", store,
                                       "--no-progress"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
    return count[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="store_true", help="also count the lock acquisitions of one run (loads the model)")
    args = ap.parse_args()
    mods = modules()
    drivers = calls(mods, "run_in_chunks", "nnethics/engine/chunks.py")
    prov = calls(mods, "provenance", "nnethics/store/")
    locks = calls(mods, "store_lock", "nnethics/store/")
    named = naming(mods)
    private = private_imports(mods)
    from test_architecture import NAMING_EXCEPTIONS, import_cycles  # the same Tarjan search (function-level too)

    loops = import_cycles(imports(mods))
    print(f"lifecycle drivers (callers of the chunk loop): {len(drivers)}  {drivers}")
    print(f"places building provenance: {len(prov)}  {prov}")
    print(f"lock sites outside the store: {len(locks)}  {locks}")
    if args.run:
        print(f"lock acquisitions in one `nnethics run --analyses decisions,patching,heads`: {lock_count()}")
    print(f"places naming analyses outside nnethics/analyses: {sum(map(len, named.values()))} in {len(named)} files")
    for rel, hits in sorted(named.items()):
        listed = " (listed in tests/test_architecture.py NAMING_EXCEPTIONS, with its reason)" \
            if NAMING_EXCEPTIONS.get(rel) == hits else ""
        print(f"    {rel}: {', '.join(hits)}{listed}")
    unlisted = sum(len(h) for rel, h in named.items() if NAMING_EXCEPTIONS.get(rel) != h)
    print(f"  of which not listed as an exception: {unlisted}")
    print(f"private cross-module imports: {len(private)}")
    for line in private:
        print(f"    {line}")
    print(f"import circles (function-level imports included): {len(loops)}")
    for comp in loops:
        print(f"    {' <-> '.join(comp)}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Mutation check: do the tests catch deliberate bugs in the numerical code?

Each mutation in ``scripts/mutations.toml`` replaces one exact snippet of one file by a wrong one. For
each, the tracked tree is copied to a temporary folder, the mutation applied there, and the test files it
names run against that copy (this venv's Python, the copy first on ``PYTHONPATH``; the copy's ``nnethics``
is checked to be the one imported). A mutation is *caught* when pytest reports failing tests (exit 1);
a pass, an error or no test selected counts as not caught.

Prints one line per mutation and last ``mutations: N of M caught``; exits 0 only when all are caught.
A snippet that is not found exactly once in its file stops the run before anything runs, so the list
cannot go stale silently when code moves.

    python scripts/mutation_check.py                 # every mutation, 2 at a time
    python scripts/mutation_check.py -j 1 --only lens-kl-reversed,decisions-two-label-softmax
    python scripts/mutation_check.py --list          # ids and descriptions
    python scripts/mutation_check.py --baseline      # first run each selection unmutated: it must pass

Add a mutation by appending a ``[[mutation]]`` table to ``scripts/mutations.toml`` (see its header).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
LIST = ROOT / "scripts" / "mutations.toml"
FIELDS = {"id", "file", "old", "new", "tests", "k", "description"}


@dataclass(frozen=True)
class Mutation:
    id: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    description: str
    k: str = ""
    extra: dict = field(default_factory=dict)


def load(path: Path = LIST) -> list[Mutation]:
    """The mutation list, validated against the current tree (raises ``SystemExit`` with every problem)."""
    raw = tomllib.loads(path.read_text(encoding="utf-8")).get("mutation", [])
    problems, out, seen = [], [], set()
    for i, m in enumerate(raw):
        where = f"{path.name} mutation #{i + 1} ({m.get('id', '?')})"
        missing = {"id", "file", "old", "new", "tests", "description"} - set(m)
        unknown = set(m) - FIELDS
        if missing or unknown:
            problems.append(f"{where}: missing {sorted(missing)} / unknown {sorted(unknown)} fields")
            continue
        if m["id"] in seen:
            problems.append(f"{where}: duplicate id")
        seen.add(m["id"])
        target = ROOT / m["file"]
        if not target.is_file():
            problems.append(f"{where}: no file {m['file']}")
            continue
        n = target.read_text(encoding="utf-8").count(m["old"])
        if n != 1:
            problems.append(f"{where}: `old` found {n} times in {m['file']} (must be exactly once; "
                            "update the snippet to the code as it is now)")
        if m["old"] == m["new"]:
            problems.append(f"{where}: `new` equals `old`")
        for t in m["tests"]:
            if not (ROOT / t).is_file():
                problems.append(f"{where}: no test file {t}")
        out.append(Mutation(m["id"], m["file"], m["old"], m["new"], tuple(m["tests"]), m["description"], m.get("k", "")))
    if problems:
        raise SystemExit("mutation list is out of date:\n  " + "\n  ".join(problems))
    return out


def tracked_files() -> list[str]:
    res = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True)
    return [f for f in res.stdout.decode().split("\0") if f and (ROOT / f).is_file()]


def copy_tree(files: list[str], dest: Path) -> None:
    for f in files:
        target = dest / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, target)


def _env(copy: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), str(copy / "tests")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("NNETHICS_REQUIRE_ALL", None)  # a skip is not a catch either way
    return env


def check_import(copy: Path) -> None:
    """The copy's nnethics (not the editable install's) is the one the tests import."""
    res = subprocess.run([sys.executable, "-c", "import nnethics; print(nnethics.__file__)"], cwd=copy, env=_env(copy),
                         capture_output=True, text=True)
    got = Path(res.stdout.strip() or "?").resolve()
    if copy.resolve() not in got.parents:
        raise SystemExit(f"the copy in {copy} imports nnethics from {got} ({res.stderr.strip()}): mutations would "
                         "not be tested")


def run_tests(m: Mutation, copy: Path, timeout: float) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow", *m.tests]
    if m.k:
        cmd += ["-k", m.k]
    try:
        res = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timed out"
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    return res.returncode, lines[-1] if lines else res.stderr.strip()[-200:]


def apply(m: Mutation, copy: Path) -> None:
    target = copy / m.file
    text = target.read_text(encoding="utf-8")
    assert text.count(m.old) == 1, m.id
    target.write_text(text.replace(m.old, m.new), encoding="utf-8")


def check(m: Mutation, files: list[str], timeout: float, baseline: bool) -> tuple[bool, str]:
    with tempfile.TemporaryDirectory(prefix=f"mutant-{m.id}-") as tmp:
        copy = Path(tmp)
        copy_tree(files, copy)
        check_import(copy)
        if baseline:
            rc, last = run_tests(m, copy, timeout)
            if rc != 0:
                return False, f"UNMUTATED TESTS FAIL (rc {rc}): {last}"
        apply(m, copy)
        t0 = time.perf_counter()
        rc, last = run_tests(m, copy, timeout)
        took = time.perf_counter() - t0
    if rc == 1:
        return True, f"caught      ({took:4.0f}s) {last}"
    if rc == 0:
        return False, f"NOT CAUGHT  ({took:4.0f}s) tests pass: {last}"
    if rc == 5:
        return False, f"NOT CAUGHT  ({took:4.0f}s) no test selected"
    return False, f"NOT CAUGHT  ({took:4.0f}s) pytest error rc {rc}: {last}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-j", "--jobs", type=int, default=2, help="mutations run at once (default 2)")
    ap.add_argument("--only", default="", help="comma-separated mutation ids")
    ap.add_argument("--list", action="store_true", help="print the mutations and exit")
    ap.add_argument("--baseline", action="store_true", help="run each selection unmutated first (it must pass)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per pytest run (default 900)")
    args = ap.parse_args(argv)
    mutations = load()
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = set(wanted) - {m.id for m in mutations}
        if unknown:
            raise SystemExit(f"unknown mutation ids {sorted(unknown)}; see --list")
        mutations = [m for m in mutations if m.id in wanted]
    width = max(len(m.id) for m in mutations)
    if args.list:
        for m in mutations:
            print(f"{m.id:<{width}}  {m.file}: {m.description}")
        return 0
    files = tracked_files()
    caught = 0

    def one(m: Mutation) -> tuple[Mutation, bool, str]:
        return (m, *check(m, files, args.timeout, args.baseline))

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for m, ok, msg in pool.map(one, mutations):
            caught += ok
            print(f"{m.id:<{width}}  {msg}  [{m.description}]", flush=True)
    print(f"mutations: {caught} of {len(mutations)} caught", flush=True)
    return 0 if caught == len(mutations) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Reliability on the file system: symbolic link loops, read-only folders, a full disk (issue "Tests ... and the
reliability cases still open", part 2, item 1).

Every case exits with code 2 and one ``Error: ...`` line naming the file or folder and the fix, before the model
loads where it can, and loses or half-writes nothing already there. Read-only folders are real where this process
may mount (a read-only bind mount of the folder onto itself: root ignores chmod), chmod where it is not root, and
simulated otherwise (EROFS from every open for writing and every mkdir under the folder, which is where each writer
of nnethics fails first). A full disk is simulated by an ENOSPC from the fsync of the Nth file written (where a real
full disk reports it when the page cache fills first), and is real in one test on a tiny tmpfs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PROMPTS
from conftest import error_line as _error_line

import nnethics.store.atomic as atomic
from nnethics.cli import cli


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too), by relative path: what must survive a failed command."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _store(tmp_path: Path) -> Path:
    from synthetic import write_store

    return write_store(tmp_path / "store", analyses=("decisions", "attribution"))


# --- read-only folders ------------------------------------------------------------------------------

def _can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@contextlib.contextmanager
def read_only(folder: Path, monkeypatch) -> Iterator[str]:
    """Make ``folder`` (already filled) read-only for the block; yields how: "mount", "chmod" or "simulated"."""
    if _can_mount() and subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True).returncode == 0:
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True, capture_output=True)
            yield "mount"
        finally:
            if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(folder)], capture_output=True)
        return
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")] if p.is_dir()}
        for p in modes:
            p.chmod(0o555)
        try:
            yield "chmod"
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    with monkeypatch.context() as m:
        _simulate_read_only(folder, m)
        yield "simulated"


def _simulate_read_only(folder: Path, m) -> None:
    real_open, real_mkdir = os.open, os.mkdir
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | getattr(os, "O_TMPFILE", 0)

    def under(path) -> bool:
        return Path(os.fspath(path)).absolute().is_relative_to(folder.absolute())

    def no_open(path, flags, *args, **kwargs):
        if flags & writes and under(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    def no_mkdir(path, *args, **kwargs):
        if under(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    m.setattr(os, "open", no_open)
    m.setattr(os, "mkdir", no_mkdir)


def test_a_read_only_store_that_holds_results_exits_2_and_keeps_every_file(runner, no_model_load, tmp_path, monkeypatch):
    folder = _store(tmp_path)
    assert runner.invoke(cli, ["report", str(folder)]).exit_code == 0  # an earlier report and export are there too
    assert runner.invoke(cli, ["export", str(folder)]).exit_code == 0
    store, before = folder.parent, _snapshot(folder.parent)
    with read_only(store, monkeypatch):
        run = runner.invoke(cli, ["run", "--store", str(store), "--prompts", str(PROMPTS), "--limit", "1"])
        report = runner.invoke(cli, ["report", str(folder)])
        export = runner.invoke(cli, ["export", str(folder)])
    line = _error_line(run)
    assert line.startswith(f"Error: --store {store}: not writable: ") and line.endswith("; pass a folder you can write to")
    line = _error_line(report)
    assert line.startswith(f"Error: cannot write report.html in {folder} (")
    assert line.endswith(f"); write the report elsewhere with `nnethics report {folder} --out FILE`")
    assert _error_line(export).startswith(f"Error: cannot write to {folder / 'export'} (")
    assert _error_line(export).endswith("); pass --out with another folder you can write to (nothing was exported; the "
                                        "files already there are unchanged)")
    assert _snapshot(store) == before  # every result, the old report and the old export, byte for byte


def test_a_read_only_model_folder_stops_the_run_with_exit_2(runner, tiny_model_dir, tmp_path, monkeypatch):
    """The store is writable but the model's folder in it is not: the lock (taken once the model is known) says so."""
    from synthetic import write_store

    from nnethics.models.handle import slug_of

    folder = write_store(tmp_path / "store", slug=slug_of(str(tiny_model_dir)), analyses=("decisions",))
    before = _snapshot(folder)
    with read_only(folder, monkeypatch):
        res = runner.invoke(cli, ["run", "--model", str(tiny_model_dir), "--analyses", "decisions", "--limit", "1",
                                  "--store", str(folder.parent), "--prompts", str(PROMPTS)])
    line = _error_line(res)
    assert str(folder) in line and "pass a --store you can write to" in line, line
    assert _snapshot(folder) == before


@pytest.mark.parametrize("command", ["report", "export"])
def test_out_on_a_read_only_folder_exits_2_naming_it(runner, tmp_path, monkeypatch, command):
    folder = _store(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "keep.txt").write_text("mine")
    out = ro / ("r.html" if command == "report" else "tables")
    with read_only(ro, monkeypatch):
        res = runner.invoke(cli, [command, str(folder), "--out", str(out)])
    line = _error_line(res)
    if command == "report":
        assert line.startswith(f"Error: cannot write r.html in {ro} (")
        assert line.endswith("); pass --out with a file in another folder you can write to")
    else:
        assert line.startswith(f"Error: cannot write to {out} (")
        assert line.endswith("); pass --out with another folder you can write to (nothing was exported; the files "
                             "already there are unchanged)")
    assert _snapshot(ro) == {"keep.txt": b"mine"}


# --- NNETHICS_CACHE -----------------------------------------------------------------------------------

def test_a_cache_that_is_a_file_or_read_only_exits_2_before_the_model_loads(runner, no_model_load, tmp_path,
                                                                              monkeypatch):
    from nnethics.models import builtin

    cache_file = tmp_path / "cache-file"
    cache_file.write_text("not a folder")
    monkeypatch.setenv("NNETHICS_CACHE", str(cache_file))
    args = ["run", "--store", str(tmp_path / "store"), "--prompts", str(PROMPTS), "--limit", "1"]
    assert _error_line(runner.invoke(cli, args)) == (
        f"Error: NNETHICS_CACHE={cache_file}: {cache_file} is a file, not a folder, so the built-in model cannot be "
        "cached there; point NNETHICS_CACHE at a folder you can write to, or unset it")
    monkeypatch.setattr(builtin, "gguf_path", lambda: pytest.fail("de-quantizing began"))
    with pytest.raises(builtin.CacheError, match="is a file, not a folder"):  # the API checks it as early
        builtin.ensure_cached()
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setenv("NNETHICS_CACHE", str(ro / "cache"))
    with read_only(ro, monkeypatch):
        line = _error_line(runner.invoke(cli, args))
    assert line.startswith(f"Error: NNETHICS_CACHE={ro / 'cache'}: not writable (")
    assert line.endswith("), so the built-in model cannot be cached there; point NNETHICS_CACHE at a folder you can "
                         "write to, or unset it")
    assert cache_file.read_text() == "not a folder" and list(ro.iterdir()) == []
    assert not (tmp_path / "store").exists()


# --- a full disk --------------------------------------------------------------------------------------

def _disk_full_at(monkeypatch, n: int, where: Path) -> list[str]:
    """The ``n``-th file written under ``where`` (1-based) hits a full disk at its fsync; returns the names tried."""
    real = atomic._fsync_path
    tried: list[str] = []

    def fsync(path, flags=os.O_RDONLY):
        p = Path(path)
        if p.is_file() and p.absolute().is_relative_to(where.absolute()):
            tried.append(p.name)
            if len(tried) == n:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, flags)

    monkeypatch.setattr(atomic, "_fsync_path", fsync)
    return tried


def test_a_full_disk_while_the_report_is_written_exits_2_and_keeps_the_old_report(runner, tmp_path, monkeypatch):
    folder = _store(tmp_path)
    assert runner.invoke(cli, ["report", str(folder)]).exit_code == 0
    before = _snapshot(folder)
    _disk_full_at(monkeypatch, 1, folder)
    line = _error_line(runner.invoke(cli, ["report", str(folder)]))
    assert line == (f"Error: no space left on device at {folder} while writing report.html; free some space, or write "
                    f"the report elsewhere with `nnethics report {folder} --out FILE`")
    assert _snapshot(folder) == before  # the old report, no temp file


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_a_full_disk_during_an_export_changes_nothing_there(runner, tmp_path, monkeypatch, fmt):
    """All or nothing: an export that runs out of space after some tables leaves the previous export as it was (no
    new table beside old ones, no manifest over a mix), and a complete export replaces it whole."""
    folder = _store(tmp_path)
    out = folder / "export"
    assert runner.invoke(cli, ["export", str(folder), "--format", fmt]).exit_code == 0
    before = _snapshot(folder)
    tried = _disk_full_at(monkeypatch, 3, out)
    line = _error_line(runner.invoke(cli, ["export", str(folder), "--format", "json" if fmt == "csv" else "csv"]))
    assert len(tried) == 3
    assert line.startswith(f"Error: no space left on device at {out}; free some space, or pass --out with another "
                           "folder you can write to (nothing was exported; the files already there are unchanged)")
    assert _snapshot(folder) == before  # no table of the failed export, the old metadata.json; no staging folder
    monkeypatch.undo()
    res = runner.invoke(cli, ["export", str(folder), "--format", "json"])
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "metadata.json").read_text())
    assert all((out / name).exists() for name in meta["tables"]) and not list(out.glob(".*"))


def test_an_export_interrupted_while_moving_its_files_in_leaves_no_manifest(tmp_path, monkeypatch):
    """``metadata.json`` is removed before the new tables move in and moved in last, so it only ever lies beside the
    complete set it describes: a crash half way leaves a folder without it (incomplete, and visibly so)."""
    from nnethics.export import export_store

    folder = _store(tmp_path)
    export_store(folder)
    real, moved = os.replace, []

    def crash_on_third(src, dst):
        if Path(dst).parent == folder / "export" and ".tmp" in str(src):
            moved.append(Path(dst).name)
            if len(moved) == 3:
                raise KeyboardInterrupt  # the process dies while moving the new files in
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        export_store(folder, fmt="json")
    monkeypatch.undo()
    assert not (folder / "export" / "metadata.json").exists()
    assert not list((folder / "export").glob(".*"))  # the staging folder is gone too


def test_a_real_full_disk_during_an_export_leaves_its_folder_empty(runner, tmp_path):
    from test_reliability_inputs import _mount_tmpfs

    folder = _store(tmp_path)
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "8k"):
        pytest.skip("needs root and mount to make a small file system (the simulated tests above cover the rest)")
    try:
        line = _error_line(runner.invoke(cli, ["export", str(folder), "--out", str(disk / "tables")]))
        assert line.startswith(f"Error: no space left on device at {disk / 'tables'}")
        assert [p.name for p in (disk / "tables").iterdir()] == []
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# --- symbolic link loops as --prompts ---------------------------------------------------------------

def _loop(path: Path) -> Path:
    """``path`` -> ``path.other`` -> ``path``: a symbolic link loop at ``path``."""
    other = path.with_name(path.name + ".other")
    os.symlink(other.name, path)
    os.symlink(path.name, other)
    return path


@pytest.mark.parametrize("layout", ["path", "path.jsonl", "in-folder", "seed-file", "seed-files"])
def test_a_symlink_loop_as_prompts_exits_2_before_the_model_loads(runner, no_model_load, tmp_path, layout):
    if layout in ("path", "path.jsonl"):
        loops = [_loop(tmp_path / ("prompts" if layout == "path" else "p.jsonl"))]
        given = loops[0]
    else:
        given = tmp_path / "prompts"
        given.mkdir()
        if layout == "seed-file":
            shutil.copy(PROMPTS / "counterfactual_prompts.json", given)
        names = {"in-folder": ["p.jsonl"], "seed-file": ["base_prompts.json"],
                 "seed-files": ["base_prompts.json", "counterfactual_prompts.json"]}[layout]
        loops = [_loop(given / name) for name in names]  # both seed files loops: still the seed layout, named
    res = runner.invoke(cli, ["run", "--prompts", str(given), "--store", str(tmp_path / "store")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    lines = [f"{loop}: is a symbolic link loop (Too many levels of symbolic links: it points back at itself); point it "
             "at the real file, or pass the file itself to --prompts" for loop in loops]
    if len(loops) == 1:  # one problem: one line
        assert res.output.strip().splitlines() == [f"Error: {lines[0]}"]
    else:
        assert res.output.strip().splitlines()[-len(loops):] == [f"  - {line}" for line in lines]
        assert res.output.count("\n  - ") == len(loops)
    assert not (tmp_path / "store").exists()

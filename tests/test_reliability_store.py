"""Reliability of the store: one writer per model folder, no silent overwrites, no temp file ever read."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner
from conftest import PROMPTS

from nnethics.cli import cli
from nnethics.engine import run_function
from nnethics.prompts import load_prompts
from nnethics.store import PartStore, StoreBusy, StoreConflict, load, provenance, result_path, store_lock, write_atomic

WORKER = Path(__file__).with_name("store_worker.py")


def _worker(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


class _FakeModel:
    slug = store_folder = "fake"

    def provenance(self):
        return {"model_id": "fake/model", "dtype": "float32"}


def _analysis(calls: list[str]):
    def fn(model, pairs):
        calls.extend(p.prompt_id for p in pairs)
        return xr.Dataset({"value": (("prompt",), np.array([len(p.base) for p in pairs], dtype=float))},
                          coords={"prompt": [p.prompt_id for p in pairs]})
    return fn


# --- 1. two runs on one store ---------------------------------------------------------------------

def test_two_writers_and_a_reader_hammer_one_store_without_errors_or_duplicate_work(tmp_path):
    store, logs = tmp_path / "store", [tmp_path / "a.log", tmp_path / "b.log"]
    limits = ["6", "14", "24"]  # each writer extends the same store three times, as two users would
    procs = [_worker("write", str(store), str(log), "same", *limits) for log in logs]
    reader = _worker("read", str(store), str(tmp_path / "stop"))
    outs = [p.communicate(timeout=300) for p in procs]
    (tmp_path / "stop").touch()
    outs.append(reader.communicate(timeout=60))
    procs.append(reader)
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert "Traceback" not in "".join(err for _, err in outs)
    assert int(outs[2][0].split()[-1]) > 0  # the reader really read files while the writers wrote
    computed = [line for log in logs if log.exists() for line in log.read_text().split()]
    ids = load_prompts(PROMPTS).ids()[:24]
    assert sorted(computed) == sorted(ids)  # every prompt computed exactly once across both processes
    ds = load(result_path(store, "fake", "fake"))
    assert list(ds["prompt"].values) == ids and np.isfinite(ds["value"].values).all()
    leftovers = [p.name for p in (store / "fake").rglob("*") if p.is_file() and p.name not in ("fake.nc", ".lock")]
    assert leftovers == []  # no parts, no temp files, no holder note


def test_writers_with_different_options_never_delete_each_others_results(tmp_path):
    store = tmp_path / "store"
    first = _worker("write", str(store), str(tmp_path / "a.log"), "one", "10")
    assert first.wait(timeout=120) == 0, first.stderr.read()
    before = result_path(store, "fake", "fake").read_bytes()
    second = _worker("write", str(store), str(tmp_path / "b.log"), "two", "10")
    _, err = second.communicate(timeout=120)
    assert second.returncode != 0 and "StoreConflict" in err and "o: stored \"one\", this run \"two\"" in err
    assert result_path(store, "fake", "fake").read_bytes() == before
    assert not (tmp_path / "b.log").exists()  # refused before computing anything


def test_a_busy_folder_names_its_holder_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = _worker("hold", str(tmp_path))
    assert holder.stdout.readline().strip() == "holding"
    try:
        with pytest.raises(StoreBusy) as err, store_lock(tmp_path / "fake", timeout=0):
            pass
        msg = str(err.value)
        assert f"pid {holder.pid} on {socket.gethostname()}" in msg and "store_worker.py hold" in msg
        assert "started 20" in msg and "pass another --store" in msg
        t0 = time.monotonic()
        with pytest.raises(StoreBusy, match=r"still in use by pid \d+ .* after 0.5 s"), \
                store_lock(tmp_path / "fake", timeout=0.5, announce=False):
            pass
        assert time.monotonic() - t0 >= 0.5
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with store_lock(tmp_path / "fake", timeout=0):  # the kernel dropped the lock with the process
        assert json.loads((tmp_path / "fake" / ".lock.json").read_text())["pid"] == os.getpid()
    assert not (tmp_path / "fake" / ".lock.json").exists()


def test_a_second_run_waits_for_the_first_and_then_reuses_its_results(tmp_path):
    import threading

    prompts = load_prompts(PROMPTS).subset(limit=4)
    calls: list[str] = []
    run_function("fake", _analysis(calls), _FakeModel(), prompts, str(tmp_path), {}, progress=False)
    holder = _worker("hold", str(tmp_path))
    assert holder.stdout.readline().strip() == "holding"
    timer = threading.Timer(1.0, holder.send_signal, (signal.SIGKILL,))
    timer.start()
    calls.clear()
    t0 = time.monotonic()
    ds = run_function("fake", _analysis(calls), _FakeModel(), prompts, str(tmp_path), {}, progress=False)
    waited = time.monotonic() - t0
    holder.wait()
    assert waited >= 1.0  # it waited for the holder instead of writing beside it
    assert calls == [] and list(ds["prompt"].values) == prompts.ids()  # and found everything already done


def test_waiting_prints_one_line_naming_the_holder(tmp_path):
    holder = _worker("hold", str(tmp_path))
    assert holder.stdout.readline().strip() == "holding"
    script = ("from nnethics.store import store_lock\n"
              f"with store_lock({str(tmp_path / 'fake')!r}, timeout=30):\n    print('got it')\n")
    waiter = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = waiter.stderr.readline()
    assert f"is in use by pid {holder.pid}" in line and "waiting up to 30 s" in line
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    out, _ = waiter.communicate(timeout=60)
    assert waiter.returncode == 0 and out.strip() == "got it"


def test_temp_files_never_match_what_readers_glob(tmp_path):
    parts = PartStore(tmp_path, "fake", "fake", provenance("fake", _FakeModel(), None, {}))
    # What a writer killed mid-write leaves behind, under the names write_atomic uses:
    import tempfile

    from nnethics.store import TMP_SUFFIX, tmp_prefix

    parts.dir.mkdir(parents=True)
    fd, stale = tempfile.mkstemp(dir=parts.dir, prefix=tmp_prefix(parts.dir / "000000.nc"), suffix=TMP_SUFFIX)
    os.write(fd, b"half a file")
    os.close(fd)
    fd, stale_final = tempfile.mkstemp(dir=parts.final.parent, prefix=tmp_prefix(parts.final), suffix=TMP_SUFFIX)
    os.close(fd)
    assert not list(parts.dir.glob("*.nc")) and not list(parts.final.parent.glob("*.nc"))
    parts.check()  # under the lock, a run removes what killed writers left
    assert not Path(stale).exists() and not Path(stale_final).exists()


# --- 2. a rerun with other options --------------------------------------------------------------

def test_a_rerun_with_other_options_refuses_and_keeps_the_stored_file_byte_for_byte(tmp_path):
    prompts = load_prompts(PROMPTS)
    run_function("fake", _analysis([]), _FakeModel(), prompts.subset(limit=9), str(tmp_path), {"chat": None},
                 progress=False)
    final = result_path(tmp_path, "fake", "fake")
    before = final.read_bytes()
    calls: list[str] = []
    with pytest.raises(StoreConflict) as err:
        run_function("fake", _analysis(calls), _FakeModel(), prompts.subset(limit=1), str(tmp_path), {"chat": False},
                     progress=False)
    assert str(err.value) == (f"{final} holds results computed with other options (chat: stored null, this run false); "
                              "rerun with --overwrite to replace them, or pass another --store to keep both")
    assert calls == [] and final.read_bytes() == before
    ds = run_function("fake", _analysis(calls), _FakeModel(), prompts.subset(limit=1), str(tmp_path), {"chat": False},
                      progress=False, overwrite=True)
    assert calls == prompts.ids()[:1] and load(final).sizes["prompt"] == 1 == ds.sizes["prompt"]


def test_other_models_dtypes_and_prompt_files_are_named_in_the_refusal(tmp_path):
    prompts = load_prompts(PROMPTS).subset(limit=2)
    run_function("fake", _analysis([]), _FakeModel(), prompts, str(tmp_path), {}, progress=False)

    class Half(_FakeModel):
        def provenance(self):
            return {"model_id": "fake/model", "dtype": "bfloat16"}

    edited = type(prompts)(prompts.pairs, prompts.name, "f" * 64, prompts.labels, prompts.files)
    with pytest.raises(StoreConflict, match=r"dtype: stored 'float32', this run 'bfloat16'; prompt set sha256: stored "
                                            r"\w{12}, this run ffffffffffff \(the prompt file changed\)"):
        run_function("fake", _analysis([]), Half(), edited, str(tmp_path), {}, progress=False)


def test_an_unreadable_result_is_moved_aside_recomputed_and_reported(tmp_path, capsys):
    prompts = load_prompts(PROMPTS).subset(limit=3)
    final = result_path(tmp_path, "fake", "fake")
    final.parent.mkdir(parents=True)
    final.write_bytes(b"\x89HDF\r\n\x1a\n this is not a complete file")
    calls: list[str] = []
    run_function("fake", _analysis(calls), _FakeModel(), prompts, str(tmp_path), {}, progress=False)
    err = capsys.readouterr().err
    aside = [p for p in final.parent.iterdir() if p.name.startswith("fake.nc.unreadable-")]
    assert len(aside) == 1 and aside[0].read_bytes().endswith(b"not a complete file")
    assert f"warning: {final} cannot be read (" in err and f"moved it to {aside[0].name} and computing it again" in err
    assert calls == prompts.ids() and load(final).sizes["prompt"] == 3


def test_an_unreadable_part_is_reported_and_recomputed(tmp_path, capsys):
    prompts = load_prompts(PROMPTS).subset(limit=4)
    parts = PartStore(tmp_path, "fake", "fake", provenance("fake", _FakeModel(), prompts, {"labels": ["1", "2"]}))
    parts.write_part(_analysis([])(None, prompts.pairs[:2]))
    (parts.dir / "000001.nc").write_bytes(b"garbage")
    calls: list[str] = []
    run_function("fake", _analysis(calls), _FakeModel(), prompts, str(tmp_path), {"labels": ["1", "2"]},
                 batch_size=2, progress=False)
    assert calls == prompts.ids()[2:]
    assert f"{parts.dir / '000001.nc'} cannot be read" in capsys.readouterr().err


def test_cli_rerun_with_no_chat_exits_2_and_keeps_the_nine_prompt_file(tiny_model_dir, tmp_path):
    runner = CliRunner()
    base = ["run", "--model", str(tiny_model_dir), "--analyses", "decisions", "--store", str(tmp_path)]
    res = runner.invoke(cli, [*base, "--limit", "9"])
    assert res.exit_code == 0, res.output
    final = next(tmp_path.glob("*/decisions.nc"))
    res = runner.invoke(cli, [*base, "--limit", "1", "--no-chat"])
    assert res.exit_code == 2
    assert res.output.splitlines()[-1] == (
        f"Error: {final} holds results computed with other options (chat: stored null, this run false); rerun with "
        "--overwrite to replace them, or pass another --store to keep both")
    assert load(final).sizes["prompt"] == 9
    res = runner.invoke(cli, [*base, "--limit", "12"])  # extending under the same options still works
    assert res.exit_code == 0, res.output
    assert load(final).sizes["prompt"] == 12
    res = runner.invoke(cli, [*base, "--limit", "1", "--no-chat", "--overwrite"])
    assert res.exit_code == 0, res.output
    assert load(final).sizes["prompt"] == 1


def test_a_rerun_with_the_same_options_keeps_finalized_files(tiny_model_dir, tmp_path):
    """Analyses with a finalize step rewrite their file; the rewrite must keep the fingerprint, or reruns would refuse."""
    runner = CliRunner()
    args = ["run", "--model", str(tiny_model_dir), "--analyses", "decisions,attribution", "--store", str(tmp_path),
            "--limit", "2"]
    for _ in range(2):
        res = runner.invoke(cli, args)
        assert res.exit_code == 0, res.output


def test_write_atomic_says_no_space_left_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = write_atomic(xr.Dataset({"a": ("x", np.arange(3.0))}), tmp_path / "x.nc")
    before = path.read_bytes()

    def full(self, *args, **kwargs):
        raise RuntimeError("NetCDF: HDF error")  # what netCDF4 raises on a full disk: no errno

    monkeypatch.setattr(xr.Dataset, "to_netcdf", full)
    import shutil

    from nnethics.store import StoreError

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(StoreError, match=rf"^no space left on device at {tmp_path} while writing x.nc; free some "
                                         "space or pass another --store"):
        write_atomic(xr.Dataset({"a": ("x", np.arange(1000.0))}), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["x.nc"]


def test_the_holder_note_never_records_a_token(tmp_path, monkeypatch):
    secret = "hf_HolderNoteSecret123456789"
    monkeypatch.setattr(sys, "argv", ["nnethics", "run", "--token", secret, "--store", str(tmp_path)])
    with store_lock(tmp_path / "m", timeout=0):
        note = (tmp_path / "m" / ".lock.json").read_text()
    assert secret not in note and json.loads(note)["command"] == f"nnethics run --token *** --store {tmp_path}"


def test_report_warns_when_files_of_one_folder_were_computed_with_different_settings(tiny_model_dir, tmp_path):
    runner = CliRunner()
    base = ["run", "--model", str(tiny_model_dir), "--store", str(tmp_path), "--limit", "2"]
    assert runner.invoke(cli, [*base, "--analyses", "decisions"]).exit_code == 0
    res = runner.invoke(cli, [*base, "--analyses", "attribution", "--no-chat"])
    assert res.exit_code == 0, res.output
    folder = next(tmp_path.iterdir())
    line = (f"warning: {folder}: chat differs between files (attribution: false, decisions: null); the report "
            "compares them side by side (rerun the odd one out with --overwrite to make them match)")
    assert line in res.stderr.splitlines()
    res = runner.invoke(cli, ["report", str(folder)])
    assert res.exit_code == 0 and line in res.stderr.splitlines()

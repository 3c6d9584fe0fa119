"""Fault injection: ``kill -9`` a real ``nnethics run`` at 10 random points, resume, and get exactly what an
uninterrupted run gets (issue 13). Also checks that no kill leaves a stale lock (``--lock-timeout 0``)."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import xarray as xr

from nnethics.store import load

ANALYSES = ("decisions", "attribution")
N_PROMPTS = 16
KILLS = 10


def _command(model_dir: Path, store: Path) -> list[str]:
    return [sys.executable, "-m", "nnethics.cli", "run", "--model", str(model_dir), "--analyses", ",".join(ANALYSES),
            "--limit", str(N_PROMPTS), "--batch-size", "1", "--store", str(store), "--no-progress", "--lock-timeout", "0"]


def _progress(folder: Path) -> int:
    """Finished chunks on disk: parts of runs in progress plus the prompts of consolidated files."""
    done = 0
    for name in ANALYSES:
        if (folder / f"{name}.nc").exists():
            done += N_PROMPTS
        elif (folder / ".parts" / name).is_dir():
            done += len(list((folder / ".parts" / name).glob("*.nc")))
    return done


@pytest.mark.slow
def test_kill_9_at_ten_random_points_then_resume_equals_an_uninterrupted_run(tiny_model_dir, tmp_path):
    reference = subprocess.run(_command(tiny_model_dir, tmp_path / "ref"), capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr
    ref_folder = next((tmp_path / "ref").iterdir())

    store = tmp_path / "killed"
    folder = store / ref_folder.name
    total = N_PROMPTS * len(ANALYSES)
    rng = random.Random(13)
    # Kill when a random amount of work is on disk, plus a random delay, so kills land anywhere: mid-chunk, mid-write,
    # during consolidation, during the report (the last target: everything computed).
    targets = sorted(rng.sample(range(1, total), KILLS - 1)) + [total]
    log = []
    for target in targets:
        proc = subprocess.Popen(_command(tiny_model_dir, store), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        while proc.poll() is None and _progress(folder) < target:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.4))
        finished = proc.poll() is not None
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        assert finished is False or proc.returncode == 0, err  # a run that ended before its kill ended cleanly
        assert "Error" not in err and "Traceback" not in err, err  # (no stale lock: --lock-timeout 0 would say so)
        log.append((target, _progress(folder), finished))
    assert sum(not finished for _, _, finished in log) >= KILLS // 2, log  # most kills really interrupted a run

    resumed = subprocess.run(_command(tiny_model_dir, store), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    for name in ANALYSES:
        got, want = load(folder / f"{name}.nc"), load(ref_folder / f"{name}.nc")
        xr.testing.assert_equal(got, want)  # every prompt present, every value bit-identical
        assert {k: v for k, v in got.attrs.items() if k != "created"} == \
               {k: v for k, v in want.attrs.items() if k != "created"}
    leftovers = [p for p in folder.rglob("*") if p.is_file() and p.suffix in (".tmp",) or ".parts" in p.parts]
    assert leftovers == []
    assert (folder / "report.html").exists()

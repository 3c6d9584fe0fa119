"""Progress: one mechanism (tqdm) that also tells a log file (stderr not a terminal) how far a run is and when it
ends, and a rerun says how many prompts it skips as already done."""

from __future__ import annotations

import io
import re

import numpy as np
import xarray as xr
from conftest import PROMPTS

import nnethics.progress
from nnethics.engine import run_function
from nnethics.progress import progress_bar
from nnethics.prompts import load_prompts

LINE = re.compile(r"^fake \[fake\]: (\d+)/(\d+) prompts \[\d\d:\d\d<(\d\d:\d\d|\?), .+prompts/s\]$")


class _FakeModel:
    slug = store_folder = "fake"

    def provenance(self):
        return {"model_id": "fake/model", "dtype": "float32"}


def _fn(model, pairs):
    return xr.Dataset({"value": (("prompt",), np.array([len(p.base) for p in pairs], dtype=float))},
                      coords={"prompt": [p.prompt_id for p in pairs]})


def test_a_log_file_gets_whole_lines_with_count_and_eta():
    log = io.StringIO()  # not a terminal, as a file, CI or nohup
    with progress_bar(10, "fake [fake]", show=True, file=log, interval=0) as bar:
        for _ in range(10):
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert all(LINE.match(line) for line in lines), lines
    counts = [int(LINE.match(line).group(1)) for line in lines]
    assert counts[0] == 0 and counts[-1] == 10 and counts == sorted(counts) and len(counts) >= 3
    assert LINE.match(lines[1]).group(3) != "?"  # an ETA once the rate is known


def test_a_log_file_is_not_flooded():
    log = io.StringIO()
    with progress_bar(1000, "fake [fake]", show=True, file=log, interval=3600) as bar:
        for _ in range(1000):
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("fake [fake]: 0/1000") and lines[1].startswith("fake [fake]: 1000/1000")


def test_hidden_unless_asked_when_not_a_terminal():
    log = io.StringIO()
    with progress_bar(3, "x", file=log) as bar:
        bar.update(3)
    assert log.getvalue() == ""


def test_runner_progress_to_a_log_and_a_rerun_says_what_it_skips(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(nnethics.progress, "LOG_INTERVAL", 0.0)
    prompts = load_prompts(PROMPTS)
    run_function("fake", _fn, _FakeModel(), prompts.subset(limit=4), str(tmp_path), {}, batch_size=2, progress=True)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fake [fake]")]
    counts = [LINE.match(line).group(1) for line in lines]
    assert counts[:3] == ["0", "2", "4"] and set(counts[3:]) <= {"4"}, err  # the closing line: overall rate
    assert "skipping" not in err
    run_function("fake", _fn, _FakeModel(), prompts.subset(limit=6), str(tmp_path), {}, batch_size=2, progress=False)
    err = capsys.readouterr().err
    assert f"fake [fake]: skipping 4 of 6 prompts already done in {tmp_path / 'fake'}" in err

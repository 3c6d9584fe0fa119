"""``nnethics steer`` and ``nnethics run --analyses ...,steer`` from the command line: bad input gets exit 2 and one
line naming the flag (before the model loads where the input alone rules it out), nothing stored is touched, and
a finished file is left as it is by a rerun."""

from __future__ import annotations

import hashlib

import pytest
import xarray as xr
from click.testing import CliRunner

import nnethics as ne

from nnethics.cli import cli

SMALL = ["--folds", "2", "--null-seeds", "2", "--alphas", "-1,1", "--layers", "0-1"]


def _invoke(args, model_dir, store):
    return CliRunner().invoke(cli, [*args, "--model", str(model_dir), "--store", str(store), "--no-progress"])


@pytest.mark.parametrize("args, flag, message", [
    (["--alphas", ""], "--alphas", "must not be empty"),
    (["--alphas", "nan"], "--alphas", "finite"),
    (["--alphas", "1,inf"], "--alphas", "finite"),
    (["--alphas", "0"], "--alphas", "non-zero"),
    (["--alphas", "1,x"], "--alphas", "not a number"),
    (["--kinds", "content,ethics"], "--kinds", "'ethics' is not one of content, caa, position"),
    (["--kinds", ""], "--kinds", "must not be empty"),
    (["--folds", "1"], "--folds", "1"),
    (["--null-seeds", "1"], "--null-seeds", "1"),
    (["--null-seeds", "65"], "--null-seeds", "65"),
    (["--alphas", "-1,1e308"], "--alphas", "must be <= 100"),
    (["--alphas", "-101"], "--alphas", "must be >= -100"),
    (["--limit", "3", "--folds", "2"], "--folds", "3 pairs in 2 folds leave fewer than 2 training pairs"),
    (["--limit", "2"], "--folds", "2 pairs: even one pair per fold leaves fewer than 2 training pairs"),
    (["--layers", "3-1"], "--layers", "empty range"),
])
def test_bad_input_is_one_line_before_the_model_loads(tiny_model_dir, tmp_path, args, flag, message):
    res = _invoke(["steer", "--limit", "4", *args], tiny_model_dir, tmp_path)
    assert res.exit_code == 2, res.output
    lines = [x for x in res.output.splitlines() if x.strip() and not x.startswith(("Usage:", "Try "))]
    assert len(lines) == 1 and flag in lines[0] and message in lines[0], res.output
    assert "loading model" not in res.output
    assert not list(tmp_path.rglob("*.nc"))


def test_a_layer_the_model_lacks_is_one_line_and_touches_nothing(tiny_model_dir, tmp_path):
    res = _invoke(["steer", "--limit", "4", *SMALL], tiny_model_dir, tmp_path)
    assert res.exit_code == 0, res.output
    path = next(tmp_path.rglob("steer.nc"))
    before = hashlib.md5(path.read_bytes()).hexdigest()
    res = _invoke(["steer", "--limit", "4", *SMALL[:-1], "0,7", "--overwrite"], tiny_model_dir, tmp_path)
    assert res.exit_code == 2 and "--layers: layer 7 does not exist: the model has layers 0-2" in res.output, \
        res.output
    assert hashlib.md5(path.read_bytes()).hexdigest() == before


def test_a_rerun_leaves_the_finished_file_and_run_fuses_steer(tiny_model_dir, tmp_path):
    res = _invoke(["steer", "--limit", "4", *SMALL], tiny_model_dir, tmp_path)
    assert res.exit_code == 0, res.output
    path = next(tmp_path.rglob("steer.nc"))
    before = ne.load(path).load()
    again = _invoke(["steer", "--limit", "4", *SMALL], tiny_model_dir, tmp_path)
    assert again.exit_code == 0, again.output
    after = ne.load(path)
    assert "skipping 4 of 4 prompts already done" in again.output
    xr.testing.assert_identical(before.assign_attrs(created=0), after.assign_attrs(created=0))  # values and attrs
    assert "4 pairs in 2 folds; layers 0-1 (given (--layers))" in again.output
    other = tmp_path / "run"
    res = _invoke(["run", "--limit", "3", "--analyses", "decisions,patching,steer"], tiny_model_dir, other)
    assert res.exit_code == 0, res.output
    assert {p.stem for p in other.rglob("*.nc")} == {"decisions", "patching", "steer"}
    assert "steer: " in res.output and "3 pairs in 3 folds;" in res.output  # 5 folds asked, leave-one-out


def test_export_writes_the_steer_tables(tiny_model_dir, tmp_path):
    import pandas as pd

    res = _invoke(["steer", "--limit", "4", *SMALL], tiny_model_dir, tmp_path)
    assert res.exit_code == 0, res.output
    folder = next(p.parent for p in tmp_path.rglob("steer.nc"))
    res = CliRunner().invoke(cli, ["export", str(folder)])
    assert res.exit_code == 0, res.output
    ds = ne.load(folder / "steer.nc")
    cells = pd.read_csv(folder / "export" / "steer.csv")
    rows = pd.read_csv(folder / "export" / "steer_rows.csv")
    assert len(cells) == ds.sizes["layer"] * ds.sizes["direction_kind"] * ds.sizes["alpha"]
    assert len(rows) == len(cells) * ds.sizes["prompt"] * 2
    one = cells[(cells["layer"] == 1) & (cells["direction_kind"] == "content") & (cells["alpha"] == 1.0)]
    assert float(one["mean_preference_change"].iloc[0]) == pytest.approx(
        float(ds["mean_preference_change"].sel(layer=1, direction_kind="content", alpha=1.0)), rel=1e-6)


def test_the_alpha_grid_is_one_sorted_grid_however_it_is_given():
    from nnethics.analyses.steer import SteerOptions

    assert SteerOptions(alphas=(1, -0.5, 1.0, 0)).alphas == (-0.5, 0.0, 1.0)
    assert SteerOptions(alphas=(1, -0.5)) == SteerOptions(alphas=(-0.5, 1.0))  # the same options, one fingerprint
    assert SteerOptions(kinds=("caa", "content", "caa")).kinds == ("caa", "content")  # a coordinate: each once


def test_a_crash_in_the_complete_pass_keeps_the_chunks_and_a_rerun_finishes(tiny_model_dir, tmp_path, monkeypatch):
    """The grid fails (a dropped connection, say): the chunks' parts stay, nothing is written, and the same command
    again does only the complete pass, giving the file an uninterrupted run gives."""
    from nnethics.analyses.steer import engine

    whole = _invoke(["steer", "--limit", "4", *SMALL], tiny_model_dir, tmp_path / "whole")
    assert whole.exit_code == 0, whole.output
    real = engine.grid_session
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("dropped")
        return real(*args)

    monkeypatch.setattr(engine, "grid_session", flaky)
    store = tmp_path / "crash"
    first = _invoke(["steer", "--limit", "4", *SMALL], tiny_model_dir, store)
    assert first.exit_code != 0 and not list(store.rglob("steer.nc"))
    assert list(store.rglob("*.nc"))  # the chunks' parts
    again = _invoke(["steer", "--limit", "4", *SMALL], tiny_model_dir, store)
    assert again.exit_code == 0, again.output
    assert "skipping 4 of 4 prompts already done" in again.output
    a, b = ne.load(next(store.rglob("steer.nc"))), ne.load(next((tmp_path / "whole").rglob("steer.nc")))
    xr.testing.assert_identical(a.assign_attrs(created=0), b.assign_attrs(created=0))

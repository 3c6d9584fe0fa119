"""Refactors keep results to the last bit.

``tests/data/regression/`` holds a small store that the CLI wrote at commit a93aeb5 (before the
architecture change: one declared Analysis per technique, one execution seam) on the shipped prompts with
the built-in model::

    nnethics run --limit 3 --store tests/data/regression
    nnethics patch --limit 1 --positions grid --layers 0,29 --components resid --store tests/data/regression
    nnethics patch --limit 2 --corruption noise --noise-samples 2 --window 3 --layers 0-5,27-29 \
        --store tests/data/regression

This test runs the same commands with today's code and compares every data variable and coordinate of
the old files with the new ones, bit for bit (NaN equal to NaN), and the stored verdict text. New
variables and attrs may appear; a variable that was renamed is looked up under its new name (RENAMED).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

from nnethics.cli import cli

OLD = Path(__file__).parent / "data" / "regression" / "smollm2-135m-instruct"
COMMANDS = [
    ["run", "--limit", "3", "--atp"],  # AtP is off by default on the last-position path since the fused run
    ["patch", "--limit", "1", "--positions", "grid", "--layers", "0,29", "--components", "resid"],
    ["patch", "--limit", "2", "--corruption", "noise", "--noise-samples", "2", "--window", "3",
     "--layers", "0-5,27-29"],
]
# (file, old name) -> new name, for quantities renamed so that one quantity has one name across files.
RENAMED = {("lens", "option_logit"): "label_logit", ("lens", "option_prob"): "label_prob"}
FILES = sorted(p.stem for p in OLD.glob("*.nc"))


@pytest.fixture(scope="module")
def new_store(tmp_path_factory, builtin_dir) -> Path:
    store = tmp_path_factory.mktemp("regression")
    runner = CliRunner()
    for args in COMMANDS:
        result = runner.invoke(cli, [*args, "--store", str(store), "--no-progress"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return store / OLD.name


def test_the_committed_store_is_complete():
    assert FILES == ["attribution", "decisions", "lens", "patching", "patching_grid", "patching_noise"]


def _same(a: xr.DataArray, b: xr.DataArray) -> bool:
    if a.dims != b.dims or a.shape != b.shape:
        return False
    x, y = a.values, b.values
    if x.dtype.kind in "fc":
        return x.dtype == y.dtype and np.array_equal(x, y, equal_nan=True)
    return np.array_equal(x.astype(str) if x.dtype.kind in "OUS" else x, y.astype(str) if y.dtype.kind in "OUS" else y)


@pytest.mark.slow
@pytest.mark.parametrize("name", FILES)
def test_results_equal_the_store_written_before_the_refactor(new_store, name):
    with xr.open_dataset(OLD / f"{name}.nc") as old, xr.open_dataset(new_store / f"{name}.nc") as new:
        old, new = old.load(), new.load()
    different, missing = [], []
    for var in [*old.data_vars, *old.coords]:
        ours = RENAMED.get((name, var), var)
        ours = ours if ours in new.variables else var
        if ours not in new.variables:
            missing.append(var)
        elif not _same(old[var], new[ours]):
            different.append(var)
    assert not missing, f"{name}.nc lost {missing}"
    assert not different, f"{name}.nc changed {different}"
    if "verdict" in old.attrs:
        assert new.attrs["verdict"] == old.attrs["verdict"]

"""The engine refactor (issue 25) keeps every stored result to the last bit.

``tests/data/regression_engine/`` holds two small stores that the CLI wrote at commit fc87485, the last commit
before the run's life moved into :mod:`nnethics.engine` (three drivers then: ``runner``, ``fused``, ``pipeline``),
with the built-in model and 2 torch threads::

    nnethics run --limit 3 --batch-size 2 --analyses decisions,patching,attribution,lens,heads,cloze \\
        --store tests/data/regression_engine/run
    nnethics run --limit 2 --batch-size 2 --framings binding --analyses decisions,attribution \\
        --store tests/data/regression_engine/framings

Chunks of 2 pairs over 3 pairs make a short last chunk; heads has its ``complete`` pass and cloze runs alone,
so every path of the old drivers wrote one of these files. This test runs the same commands with today's code
and compares every file: every data variable and coordinate bit for bit (NaN equal to NaN), and every attribute
but ``created`` (provenance, its fingerprint and the verdict text included).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner
from test_regression import _same  # bit for bit, NaN equal to NaN

from nnethics.cli import cli

OLD = Path(__file__).parent / "data" / "regression_engine"
COMMANDS = {
    "run": ["run", "--limit", "3", "--batch-size", "2", "--analyses",
            "decisions,patching,attribution,lens,heads,cloze"],
    "framings": ["run", "--limit", "2", "--batch-size", "2", "--framings", "binding", "--analyses",
                 "decisions,attribution"],
}
FILES = sorted(p.relative_to(OLD).as_posix() for p in OLD.rglob("*.nc"))
THREADS = 2  # torch's intra-op threads when the stores were written (other counts give other last bits)


def test_the_committed_stores_are_complete():
    model = "smollm2-135m-instruct"
    run = [f"run/{model}/{n}.nc" for n in ("attribution", "cloze", "decisions", "heads", "lens", "patching")]
    framings = [f"framings/{model}/{n}" for n in ("cloze.nc", "framings.nc", *(
        f"framings/ethical.12.{o}/{a}.nc" for o in ("fwd", "swap") for a in ("attribution", "decisions")))]
    assert FILES == sorted(run + framings)


@pytest.fixture(scope="module")
def new_stores(tmp_path_factory, builtin_dir) -> Path:
    import torch

    root = tmp_path_factory.mktemp("regression_engine")
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        for store, args in COMMANDS.items():
            result = CliRunner().invoke(cli, [*args, "--store", str(root / store), "--no-progress"],
                                        catch_exceptions=False)
            assert result.exit_code == 0, result.output
    finally:
        torch.set_num_threads(before)
    return root


def _attrs(attrs: dict) -> dict:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in attrs.items() if k != "created"}


@pytest.mark.slow
@pytest.mark.parametrize("name", FILES)
def test_every_file_equals_the_store_written_before_the_engine(new_stores, name):
    with xr.open_dataset(OLD / name) as old, xr.open_dataset(new_stores / name) as new:
        old, new = old.load(), new.load()
    assert sorted(new.variables) == sorted(old.variables), name
    different = [v for v in old.variables if not _same(old[v], new[v])]
    assert not different, f"{name} changed {different}"
    assert _attrs(new.attrs) == _attrs(old.attrs)
    changed = [v for v in old.variables if _attrs(old[v].attrs) != _attrs(new[v].attrs)]
    assert not changed, f"{name}: the attributes of {changed} changed"

"""The Python API (``ne.analyze``) returns exactly the Dataset the CLI writes, and the README's schema agrees with it.

Attrs: every attr is compared except ``created``, the wall-clock time provenance was taken (the CLI's run and the
API's call happen at different seconds). ``fingerprint`` is compared: it is a hash of the provenance fields that
decide reuse (model, prompt set, options, labels), none of them a store path, so ``ne.analyze`` sets the very value
the CLI file holds. Both runs use the same chunks (``--batch-size 2`` / ``batch_size=2``): a batched forward's
floats depend on what else is in the batch (padding), so the API chunks like the CLI to be equal bit for bit.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import PROMPTS

import nnethics as ne
from nnethics.analyses import ANALYSES, default_names
from nnethics.analyses.heads import HeadsOptions
from nnethics.analyses.steer import SteerOptions
from nnethics.cli import cli

LIMIT, BATCH = 3, 2
README = Path(__file__).resolve().parents[1] / "README.md"
VARIANT = ("patching_grid", ["patch", "--positions", "grid", "--layers", "0-1"], dict(layers=(0, 1)))
STEER = (["steer", "--folds", "3", "--null-seeds", "2", "--alphas", "-1,0,1", "--layers", "0-1"],
         dict(folds=3, null_seeds=2, alphas=(-1.0, 0.0, 1.0), layers=(0, 1)))
DIFFERING_ATTRS = {"created"}


@pytest.fixture(scope="module")
def cli_files(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Every default analysis by ``nnethics run``, and one patching variant by its own command, in one store."""
    store = tmp_path_factory.mktemp("api-store")
    common = ["--model", str(tiny_model_dir), "--limit", str(LIMIT), "--store", str(store), "--no-progress",
              "--batch-size", str(BATCH)]
    for args in (["run", "--atp"], VARIANT[1], ["heads", "--top-heads", "3"], STEER[0]):  # --atp: the README's patching table
        res = CliRunner().invoke(cli, [*args, *common])
        assert res.exit_code == 0, res.output
    return {p.stem: p for p in store.glob("*/*.nc")}


@pytest.fixture(scope="module")
def api_results(tiny_model_dir) -> dict:
    model = ne.load_model(str(tiny_model_dir))
    prompts = ne.load_prompts(PROMPTS).subset(limit=LIMIT)
    out = ne.analyze(model, prompts, batch_size=BATCH, patching=ne.PatchingOptions(atp=True))
    out.update(ne.analyze(model, prompts, [VARIANT[0]], batch_size=BATCH,
                          **{VARIANT[0]: ne.PatchingOptions(**VARIANT[2])}))
    out.update(ne.analyze(model, prompts, ["heads"], batch_size=BATCH, heads=HeadsOptions(top_heads=3)))  # complete
    out.update(ne.analyze(model, prompts, ["steer"], batch_size=BATCH, steer=SteerOptions(**STEER[1])))
    return out


def _same(a, b) -> bool:
    if a.dtype.kind in "fc":
        return a.dtype == b.dtype and np.array_equal(a.values, b.values, equal_nan=True)
    return a.dtype == b.dtype and np.array_equal(a.values, b.values)


@pytest.mark.parametrize("name", [*default_names(), VARIANT[0], "heads", "steer"])
def test_analyze_returns_the_dataset_the_cli_writes(name, cli_files, api_results):
    assert name in cli_files, sorted(cli_files)
    stored, ours = ne.load(cli_files[name]), api_results[name]
    assert sorted(ours.variables) == sorted(stored.variables)
    assert dict(ours.sizes) == dict(stored.sizes)
    unequal = [v for v in stored.variables if not _same(stored[v], ours[v])]
    assert not unequal, f"{name}: values differ in {unequal}"
    var_attrs = [v for v in stored.variables if {k: str(x) for k, x in stored[v].attrs.items()}
                 != {k: str(x) for k, x in ours[v].attrs.items()}]
    assert not var_attrs, f"{name}: variable attrs differ in {var_attrs}"
    keys = set(stored.attrs) | set(ours.attrs)
    differ = {k for k in keys if str(stored.attrs.get(k)) != str(ours.attrs.get(k))}
    assert differ == DIFFERING_ATTRS, {k: (stored.attrs.get(k), ours.attrs.get(k)) for k in differ}
    assert ours.attrs["analysis"] == name and "prompt_set_sha256" in ours.attrs


def test_analyze_takes_pairs_with_their_sha256(tiny_models, prompt_set):
    model = tiny_models("llama")
    pairs = list(prompt_set.pairs[:2])
    ds = ne.analyze(model, pairs, ["decisions"])["decisions"]
    again = ne.analyze(model, pairs[::-1], ["decisions"])["decisions"]
    assert ds.attrs["prompt_set"] == "pairs" and len(ds.attrs["prompt_set_sha256"]) == 64
    assert again.attrs["prompt_set_sha256"] != ds.attrs["prompt_set_sha256"]  # the pairs, in order, are hashed
    assert ds.attrs["fingerprint"] != again.attrs["fingerprint"]


def test_analyze_refuses_options_it_would_not_honour(tiny_models, prompt_set):
    model, prompts = tiny_models("llama"), prompt_set.subset(limit=1)
    with pytest.raises(ValueError, match="patching_grid"):  # grid positions write patching_grid, not patching
        ne.analyze(model, prompts, ["patching"], patching=ne.PatchingOptions(positions="grid"))
    with pytest.raises(ValueError, match="not among the analyses"):
        ne.analyze(model, prompts, ["decisions"], patching=ne.PatchingOptions())
    with pytest.raises(TypeError, match="PatchingOptions"):
        ne.analyze(model, prompts, ["patching"], patching=ne.LensOptions())


# ----------------------------------------------------------------------------------------------
# the README's schema

def _sections() -> dict[str, str]:
    """``{file stem: text}`` of each ``### `<stem>.nc` `` section of the README."""
    text = README.read_text()
    out = {}
    for m in re.finditer(r"^### `(\w+)\.nc`.*?$(.*?)(?=^##)", text, re.M | re.S):
        out[m.group(1)] = m.group(2)
    return out


def _table_names(section: str) -> list[str]:
    """The variables named in the first column of the section's tables."""
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return [n for row in rows for n in re.findall(r"`([\w*]+)`", row)]


def _mentioned(section: str) -> list[str]:
    return re.findall(r"`([\w*]+)", section)


@pytest.mark.parametrize("name", [*default_names(), "steer"])
def test_readme_schema_agrees_with_the_dataset(name, api_results):
    sections = _sections()
    assert name in sections, f"README has no section for {name}.nc"
    ds, section = api_results[name], sections[name]
    names = set(ds.variables)
    absent = [n for n in _table_names(section) if not fnmatch.filter(names, n)]
    assert not absent, f"README's {name}.nc table names variables the file does not have: {absent}"
    patterns = _mentioned(section)
    unmentioned = [v for v in ds.data_vars if not any(fnmatch.fnmatchcase(str(v), p) for p in patterns)]
    assert not unmentioned, f"README's {name}.nc section does not mention: {unmentioned}"


def test_every_default_analysis_has_a_readme_section():
    assert set(default_names()) <= set(_sections()), sorted(set(default_names()) - set(_sections()))
    assert all(name in ANALYSES for name in _sections())

"""Runs across framings: the store layout, the framing coordinate and attrs, CLI = API, and the inputs refused
before the model loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner
from conftest import PROMPTS

import nnethics as ne
from nnethics import framings as F
from nnethics.cli import cli

LIMIT, BATCH = 3, 2
CHOSEN = "ethical.12.fwd,moralchoice.AB.rev,first_person.colour.fwd,ethical.12.swap"


@pytest.fixture(scope="module")
def framed_store(tiny_model_dir, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("framed")
    res = CliRunner().invoke(cli, ["run", "--model", str(tiny_model_dir), "--limit", str(LIMIT), "--store", str(store),
                                   "--no-progress", "--batch-size", str(BATCH), "--analyses", "decisions",
                                   "--framings", CHOSEN])
    assert res.exit_code == 0, res.output
    return store / tiny_model_dir.name.lower()


def test_layout_and_framing_coordinate(framed_store):
    for fid in CHOSEN.split(","):
        path = framed_store / "framings" / fid / "decisions.nc"
        assert path.exists(), sorted(framed_store.rglob("*.nc"))
        ds = xr.load_dataset(path)
        assert str(ds["framing"].values) == fid and ds.attrs["framing"] == fid
        template, labels, order = fid.split(".")
        assert ds.attrs["framing_template"] == template and ds.attrs["framing_order"] == order
        assert ds.attrs["framing_labels"] == ",".join(F.LABEL_SETS[labels])
        assert list(ds["option"].values) == list(F.LABEL_SETS[labels])
        assert ds.attrs["counterfactual_kind"] == ("label" if order == "swap" else "content")
    assert (framed_store / "framings.nc").exists() and (framed_store / "cloze.nc").exists()
    # the model folder's own files are not written by a framed run
    assert not (framed_store / "decisions.nc").exists()
    # concatenating along the framing coordinate works as the README shows
    both = xr.concat([xr.load_dataset(framed_store / "framings" / f / "decisions.nc").drop_vars(
        ["option", "label_token_id", "label_token"]) for f in ("ethical.12.fwd", "ethical.12.swap")], dim="framing")
    assert both.sizes["framing"] == 2


def test_the_default_framing_is_the_prompts_own_text_bit_for_bit(framed_store, tiny_model_dir, tmp_path):
    """ethical.12.fwd renders the shipped prompts byte for byte, so its decisions equal a run on the files' text."""
    res = CliRunner().invoke(cli, ["run", "--model", str(tiny_model_dir), "--limit", str(LIMIT), "--store",
                                   str(tmp_path), "--no-progress", "--batch-size", str(BATCH), "--analyses", "decisions"])
    assert res.exit_code == 0, res.output
    own = xr.load_dataset(tmp_path / tiny_model_dir.name.lower() / "decisions.nc")
    framed = xr.load_dataset(framed_store / "framings" / "ethical.12.fwd" / "decisions.nc")
    for var in own.data_vars:
        np.testing.assert_array_equal(own[var].values, framed[var].values, err_msg=var)
    assert own.attrs["verdict"] == framed.attrs["verdict"]


def test_label_swap_changes_only_the_labels_beside_the_options(framed_store):
    fwd = xr.load_dataset(framed_store / "framings" / "ethical.12.fwd" / "decisions.nc")
    swap = xr.load_dataset(framed_store / "framings" / "ethical.12.swap" / "decisions.nc")
    # the base side is the same prompt; the label swap's cf keeps the ethical option's place, so its label flips
    np.testing.assert_array_equal(fwd["logit_diff"].sel(side="base").values, swap["logit_diff"].sel(side="base").values)
    base_eth = swap["ethical_option"].sel(side="base").values
    cf_eth = swap["ethical_option"].sel(side="cf").values
    assert all({a, b} == {"1", "2"} for a, b in zip(base_eth, cf_eth))
    texts = swap["prompt_text"].values
    for base, cf in texts:
        assert len(base) == len(cf) and sum(x != y for x, y in zip(base, cf)) == 2


def test_api_equals_cli(framed_store, tiny_model_dir):
    model = ne.load_model(str(tiny_model_dir))
    prompts = ne.load_prompts(PROMPTS).subset(limit=LIMIT)
    got = ne.analyze(model, prompts, ["decisions"], batch_size=BATCH, framings=CHOSEN)
    expected = {f"framings/{f}/decisions" for f in CHOSEN.split(",")} | {"cloze", "framings"}
    assert set(got) == expected
    for key, ours in got.items():
        stored = ne.load(framed_store / f"{key}.nc")
        assert sorted(ours.variables) == sorted(stored.variables), key
        for v in stored.variables:
            a, b = stored[v].values, ours[v].values
            same = np.array_equal(a, b, equal_nan=True) if a.dtype.kind in "fc" else np.array_equal(a, b)
            assert same, f"{key}: {v} differs"
        differ = {k for k in set(stored.attrs) | set(ours.attrs) if str(stored.attrs.get(k)) != str(ours.attrs.get(k))}
        assert differ <= {"created"}, {k: (stored.attrs.get(k), ours.attrs.get(k)) for k in differ}



def _run(args, tmp_path):
    return CliRunner().invoke(cli, ["run", "--limit", "2", "--store", str(tmp_path / "store"), "--no-progress", *args])


@pytest.mark.parametrize("args, needle", [
    (["--framings", "ethical.99.fwd"], "--framings: 'ethical.99.fwd' names no framing"),
    (["--framings", "nosuch"], "'nosuch' names no framing"),
    (["--framings", " , "], "--framings is empty"),
    (["--templates", "t.json"], "--templates: given without --framings"),
])
def test_bad_framings_exit_2_before_the_model_loads(args, needle, tmp_path, no_model_load, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("t.json").write_text("{}")
    (tmp_path / "prompts").symlink_to(PROMPTS)
    res = _run(args, tmp_path)
    assert res.exit_code == 2, res.output
    assert needle in res.output and res.output.count("\n") == 1, res.output
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.nc"))


def test_a_template_missing_a_placeholder_exits_2(tmp_path, no_model_load):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"mine": "{scenario}\n{label_1}) {option_1}\nAnswer:"}))
    res = _run(["--prompts", str(PROMPTS), "--framings", "mine.12.fwd", "--templates", str(path)], tmp_path)
    assert res.exit_code == 2, res.output
    assert "lacks the placeholder(s) {option_2}, {label_2}" in res.output and str(path) in res.output


def test_a_custom_template_runs(tmp_path, tiny_model_dir):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"mine": "{scenario}\n{label_1}) {option_1}\n{label_2}) {option_2}\nAnswer:"}))
    res = _run(["--prompts", str(PROMPTS), "--model", str(tiny_model_dir), "--analyses", "decisions", "--framings",
                "mine.AB.rev", "--templates", str(path), "--no-chat"], tmp_path)
    assert res.exit_code == 0, res.output
    ds = xr.load_dataset(next((tmp_path / "store").rglob("mine.AB.rev/decisions.nc")))
    assert ds["prompt_text"].values[0, 0].rstrip().endswith("Answer:")
    assert "B) " in ds["prompt_text"].values[0, 0] and ds.attrs["framing_template"] == "mine"


def test_free_text_pairs_only_have_their_own_framing(tmp_path, no_model_load):
    path = tmp_path / "free.jsonl"
    rec = {"prompt_id": "x", "base": {"prompt": "Pick one. 1 or 2? Answer:", "ethical_option": "1"},
           "counterfactual": {"prompt": "Pick one! 1 or 2? Answer:", "ethical_option": "2"}}
    path.write_text(json.dumps(rec) + "\n")
    res = _run(["--prompts", str(path), "--framings", "all"], tmp_path)
    assert res.exit_code == 2, res.output
    assert "none of the 1 pairs" in res.output and "only their own framing" in res.output


def test_labels_that_split_are_refused_with_the_split(tokenizer):
    f = F.Framing("ethical", F.TEMPLATES["ethical"], "odd", ("1", "zzqx"), "fwd")
    with pytest.raises(F.FramingError) as e:
        F.check_labels([f], tokenizer, lambda fr: ["Some text.\nAnswer:"])
    msg = str(e.value)
    assert "--framings ethical.odd.fwd" in msg and "' zzqx' -> [" in msg and "not single next tokens" in msg


# ------------------------------------------------------------------------------------------------ rendering

def _pair():
    return ne.load_prompts(PROMPTS).pairs[0]  # harm_001: the ethical option is the base's option 2


def test_rendering_by_hand():
    p = _pair()
    d = p.dilemma
    assert d.ethical == 1 and p.base_ethical == "2"
    rev = F.select("acceptable.AB.rev")[0].render(p)
    assert rev.base == (f"{d.scenario}\nWhat should be done?\n(B) {d.options[0]}\n(A) {d.options[1]}\n"
                        "Which choice is more acceptable? Answer with A or B.\nAnswer:")
    assert (rev.base_ethical, rev.cf_ethical) == ("A", "B")  # option 2 (ethical) carries A in rev
    assert rev.cf.index(d.options[1]) < rev.cf.index(d.options[0])  # the content swap on cf
    swap = F.select("moralchoice.12.swap")[0].render(p)
    assert (swap.base_ethical, swap.cf_ethical) == ("2", "1")
    assert swap.cf.index(d.options[0]) < swap.cf.index(d.options[1])  # options stay where they are
    assert f"\n2. {d.options[0]}\n1. {d.options[1]}\n" in swap.cf
    fwd = F.select("first_person.colour.fwd")[0].render(p)
    assert (fwd.base_ethical, fwd.cf_ethical) == ("blue", "red")
    assert fwd.base.startswith("Imagine you are in this situation. " + d.scenario)


def test_selection_names():
    assert [f.id for f in F.select("default")] == ["ethical.12.fwd"]
    allf = F.select("all")
    assert len(allf) == len(F.TEMPLATES) * len(F.LABEL_SETS) * 2 == 24
    assert {f.order for f in allf} == {"fwd", "rev"}
    assert [f.id for f in F.select("binding")] == ["ethical.12.fwd", "ethical.12.swap"]
    assert [f.id for f in F.select("moralchoice.*.rev, moralchoice.AB.rev")] == [
        "moralchoice.12.rev", "moralchoice.AB.rev", "moralchoice.colour.rev"]


def test_parse_refuses_inconsistent_pairs():
    from nnethics.prompts.dilemma import parse_pair

    p = _pair()
    assert parse_pair(p.base, p.cf, "2", "1", ("1", "2")) == p.dilemma
    assert parse_pair(p.base, p.cf, "2", "2", ("1", "2")) is None  # the cf's ethical label does not follow
    assert parse_pair(p.base, p.base, "2", "1", ("1", "2")) is None  # options not swapped
    assert parse_pair(p.base, p.cf.replace("A nurse", "A doctor"), "2", "1", ("1", "2")) is None
    assert parse_pair(p.base, p.cf, "2", "1", ("A", "B")) is None


def test_binding_run_writes_binding_nc_as_the_api_does(tiny_model_dir, tmp_path):
    """--framings binding with patching: binding.nc beside framings.nc, the same Dataset as ne.analyze's."""
    res = CliRunner().invoke(cli, ["run", "--model", str(tiny_model_dir), "--limit", "3", "--store", str(tmp_path),
                                   "--no-progress", "--batch-size", "2", "--analyses", "decisions,patching",
                                   "--framings", "binding"])
    assert res.exit_code == 0, res.output
    folder = tmp_path / tiny_model_dir.name.lower()
    stored = ne.load(folder / "binding.nc")
    assert stored.attrs["content_framing"] == "ethical.12.fwd" and stored.attrs["label_framing"] == "ethical.12.swap"
    assert f"binding: {folder / 'binding.nc'}" in res.output
    model = ne.load_model(str(tiny_model_dir))
    got = ne.analyze(model, ne.load_prompts(PROMPTS).subset(limit=3), ["decisions", "patching"], batch_size=2,
                     framings="binding")
    ours = got["binding"]
    for v in stored.variables:
        np.testing.assert_array_equal(stored[v].values, ours[v].values, err_msg=v)
    assert stored.attrs["binding"] == ours.attrs["binding"]


def test_load_framings_stacks_every_framing(framed_store):
    ds = ne.load_framings(framed_store)
    assert list(ds["framing"].values) == sorted(CHOSEN.split(","))
    assert list(ds["option"].values) == ["a", "b"]
    for fid in CHOSEN.split(","):
        one = xr.load_dataset(framed_store / "framings" / fid / "decisions.nc")
        got = ds.sel(framing=fid)
        np.testing.assert_array_equal(got["logit_diff"].values, one["logit_diff"].values)
        assert str(got["framing_labels"].values) == one.attrs["framing_labels"]
        n = one.sizes["token"]
        np.testing.assert_array_equal(got["input_ids"].values[..., :n], one["input_ids"].values)
        assert (got["input_ids"].values[..., n:] == -1).all()  # padded as the files pad: -1, not 0
        assert (got["token_text"].values[..., n:] == "").all()
    assert ds.sizes["token"] == max(xr.load_dataset(p).sizes["token"]
                                    for p in framed_store.glob("framings/*/decisions.nc"))
    with pytest.raises(FileNotFoundError, match="no framing folder holds cloze.nc"):
        ne.load_framings(framed_store, "cloze")

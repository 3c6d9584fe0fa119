"""Reliability of meaning: inputs that ran but meant something else, or said nothing (issue "Tests ... and the
reliability cases still open", part 2, item 2).

A missing ``NNETHICS_CONFIG`` file, someone else's NetCDF named like a result, a truncated file in ``compare``, ids
and labels written as numbers, a counterfactual identical to its base but with the other ethical option, a folder
holding two prompt layouts, an empty ``--store``: each is refused (code 2, one line naming it and the fix, before
the model loads) or said on stderr.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from conftest import PROMPTS
from conftest import error_line as _error_line

from nnethics.cli import cli
from nnethics.models.secrets import ConfigError, load_model_config
from nnethics.prompts import PromptError, load_prompts
from nnethics.store import write_atomic

SAME = "Should you help? 1) yes 2) no. Answer:"



def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _pair(pid, base=SAME, cf="Should you help? 1) no 2) yes. Answer:", eb="1", ec="2"):
    return {"prompt_id": pid, "category": "c", "base": {"prompt": base, "ethical_option": eb},
            "counterfactual": {"prompt": cf, "ethical_option": ec}}


def _seed(folder: Path, base_ids: list, cf_ids: list) -> Path:
    """A seed-layout folder of the shipped prompts' first records, with the given prompt_id values."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, ids in (("base_prompts.json", base_ids), ("counterfactual_prompts.json", cf_ids)):
        records = json.loads((PROMPTS / name).read_text())[:len(ids)]
        for rec, pid in zip(records, ids):
            rec["prompt_id"] = pid
        (folder / name).write_text(json.dumps(records))
    return folder


def _foreign(path: Path) -> None:
    write_atomic(xr.Dataset({"t": ("x", np.arange(3.0))}, attrs={"title": "someone else's"}), path)


# --- NNETHICS_CONFIG naming a missing file ------------------------------------------------------------

def test_a_missing_nnethics_config_file_is_named_not_sent_to_the_hub(runner, no_model_load, tmp_path, monkeypatch):
    cfg = tmp_path / "no-such" / "models.json"
    monkeypatch.setenv("NNETHICS_CONFIG", str(cfg))
    line = (f"Error: NNETHICS_CONFIG={cfg}: no such file; create it, fix the path, or unset NNETHICS_CONFIG to use "
            "config/models.json")
    res = runner.invoke(cli, ["run", "--model", "mykey", "--store", str(tmp_path / "store"), "--prompts", str(PROMPTS)])
    assert _error_line(res) == line
    assert "loading model" not in res.output and not (tmp_path / "store").exists()
    assert _error_line(runner.invoke(cli, ["tokens", "--model", "mykey", "--prompts", str(PROMPTS)])) == line
    assert _error_line(runner.invoke(cli, ["models"])) == line
    with pytest.raises(ConfigError):
        load_model_config()
    assert load_model_config(cfg) == {}  # a path given in code: missing means none configured, as before
    monkeypatch.delenv("NNETHICS_CONFIG")
    monkeypatch.chdir(tmp_path)
    assert load_model_config() == {}  # the default config/models.json may be missing


# --- someone else's NetCDF named like a result --------------------------------------------------------

def test_report_on_a_foreign_netcdf_says_not_an_nnethics_result_as_export_does(runner, tmp_path):
    from synthetic import write_store

    folder = write_store(tmp_path, analyses=("decisions", "attribution"))
    _foreign(folder / "attribution.nc")
    res = runner.invoke(cli, ["report", str(folder)])
    assert res.exit_code == 0, res.output
    assert res.stderr == (f"warning: {folder / 'attribution.nc'} is not an nnethics 'attribution' result (its "
                          f"'analysis' attribute is None); the report leaves it out; move it out of {folder} or "
                          "recompute it with `nnethics run`\n")  # and no "model_id differs" over its empty attrs
    assert "attribution.nc: not an nnethics " in (folder / "report.html").read_text()  # in its "skipped" list
    export = _error_line(runner.invoke(cli, ["export", str(folder)]))
    assert "attribution.nc: not an nnethics 'attribution' result (its 'analysis' attribute is None)" in export
    (folder / "decisions.nc").unlink()
    line = _error_line(runner.invoke(cli, ["report", str(folder)]))
    assert line == (f"Error: {folder}: no result files to report (attribution.nc: not an nnethics 'attribution' result "
                    f"(its 'analysis' attribute is None)); move those files out of {folder} or recompute them with "
                    "`nnethics run`")


def test_compare_warns_about_a_truncated_or_foreign_file_as_report_does(runner, tmp_path):
    from synthetic import write_store

    a = write_store(tmp_path, slug="a", analyses=("decisions", "attribution"))
    b = write_store(tmp_path, slug="b", analyses=("decisions", "attribution"))
    _foreign(a / "attribution.nc")
    (b / "attribution.nc").write_bytes(b"\x89HDF\r\n\x1a\ntruncated")
    res = runner.invoke(cli, ["compare", str(a), str(b), "--out", str(tmp_path / "c.html")])
    assert res.exit_code == 0, res.output
    lines = res.stderr.splitlines()
    assert lines[0] == (f"warning: {a / 'attribution.nc'} is not an nnethics 'attribution' result (its 'analysis' "
                        f"attribute is None); the comparison leaves it out; move it out of {a} or recompute it with "
                        "`nnethics run`")
    assert lines[1].startswith(f"warning: {b / 'attribution.nc'} cannot be read (")
    assert lines[1].endswith("); the comparison leaves it out; recompute it with `nnethics run` or remove it")
    assert len(lines) == 2 and (tmp_path / "c.html").exists()


# --- ids and labels written as numbers ----------------------------------------------------------------

def test_a_number_id_in_one_seed_file_and_a_string_in_the_other_is_refused(runner, no_model_load, tmp_path):
    """JSON tells 5 from "5": a pair matched across that difference would be a guess, so both records are named."""
    folder = _seed(tmp_path / "p", ["a", 5], ["a", "5"])
    with pytest.raises(PromptError) as err:
        load_prompts(folder)
    assert err.value.problems == [
        f"{folder / 'counterfactual_prompts.json'} record 1: prompt_id \"5\" is not {folder / 'base_prompts.json'} "
        "record 1's prompt_id 5 (a number and a string); write it the same way in both files, e.g. \"5\""]
    res = runner.invoke(cli, ["run", "--prompts", str(folder), "--store", str(tmp_path / "store")])
    assert _error_line(res) == f"Error: {err.value.problems[0]}"


def test_number_ids_and_labels_are_read_as_their_text(tmp_path):
    """Documented: a prompt_id or ethical_option written as a number is its text (5 is "5", 1 is "1") when the
    two files agree, in the seed layout and in a .jsonl file."""
    folder = _seed(tmp_path / "p", [5, 6], [5, 6])
    assert load_prompts(folder).ids() == ["5", "6"]
    f = _jsonl(tmp_path / "p.jsonl", [_pair(7, eb=1, ec=2)])
    ps = load_prompts(f)
    assert ps.ids() == ["7"] and (ps.pairs[0].base_ethical, ps.pairs[0].cf_ethical) == ("1", "2")
    with pytest.raises(PromptError, match="duplicate prompt_id '7'"):  # 7 and "7" in one file are one id
        load_prompts(_jsonl(tmp_path / "q.jsonl", [_pair(7), _pair("7")]))


# --- a counterfactual identical to its base whose ethical option flips ---------------------------------

def test_an_identical_counterfactual_with_the_other_ethical_option_is_warned_about(runner, tmp_path):
    f = _jsonl(tmp_path / "p.jsonl", [_pair("fine"), _pair("flip", cf=SAME, eb="1", ec="2")])
    ps = load_prompts(f)
    assert len(ps) == 2
    assert ps.warnings == (("flip", f"{f}: prompt_id 'flip': the counterfactual is identical to the base prompt but "
                                    "its ethical_option is '2' where the base's is '1': one text with two ethical "
                                    "answers; swap the options in the counterfactual's text"),)
    res = runner.invoke(cli, ["prompts", "check", str(f)])
    assert res.exit_code == 0 and res.stderr == f"warning: {ps.warnings[0][1]}\n"


# --- a folder holding two prompt layouts --------------------------------------------------------------

@pytest.mark.parametrize("other", ["extra.jsonl", "moral.csv"])
def test_a_folder_with_the_seed_files_and_another_prompt_file_says_which_it_read(runner, tmp_path, other):
    folder = tmp_path / "p"
    folder.mkdir()
    for name in ("base_prompts.json", "counterfactual_prompts.json"):
        shutil.copy(PROMPTS / name, folder)
    (folder / other).write_text(json.dumps(_pair("x")) + "\n" if other.endswith(".jsonl") else "scenario_id\n")
    note = (f"{folder}: read base_prompts.json + counterfactual_prompts.json (the seed layout); the folder also holds "
            f"{other}, not read (pass --prompts {folder / other} to read it instead)")
    ps = load_prompts(folder)
    assert ps.ids() == load_prompts(PROMPTS / "base_prompts.json").ids()
    assert ps.warnings == (("", note),) and ps.subset(limit=1).warnings == (("", note),)  # about the input, not a pair
    res = runner.invoke(cli, ["prompts", "check", str(folder)])
    assert res.exit_code == 0 and res.stderr == f"note: {note}\n"
    (folder / "base_prompts.json").unlink()
    (folder / "counterfactual_prompts.json").unlink()
    if other.endswith(".jsonl"):
        assert load_prompts(folder).warnings == ()  # one layout only: nothing to say


# --- an empty --store ---------------------------------------------------------------------------------

def test_an_empty_store_is_refused_instead_of_writing_into_the_current_folder(runner, no_model_load, tmp_path,
                                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(cli, ["run", "--store", "", "--prompts", str(PROMPTS), "--limit", "1"])
    assert _error_line(res) == "Error: --store '': is empty; pass a folder name like store (it is created if missing)"
    res = runner.invoke(cli, ["decisions", "--store", " ", "--prompts", str(PROMPTS), "--limit", "1"])
    assert _error_line(res) == "Error: --store ' ': is empty; pass a folder name like store (it is created if missing)"
    assert list(tmp_path.iterdir()) == []

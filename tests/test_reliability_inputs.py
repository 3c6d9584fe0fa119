"""Reliability: every bad input exits 2 with one line naming the thing and the fix, before the model loads.

Areas 3 (context length), 4 (tracebacks where a message belongs) and 5 (validation gaps) of issue 13.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from conftest import PROMPTS
from conftest import error_line as _error_line

from nnethics.cli import cli
from nnethics.export import export_store
from nnethics.models.secrets import ConfigError, load_model_config
from nnethics.prompts import PromptError, load_prompts
from nnethics.store import load, write_atomic

SECRET = "hf_ConfigTokenNeverShown123456"



def _jsonl(path: Path, records: list[dict], bom: bool = False) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


def _pair(pid, base="Should you help? 1) yes 2) no. Answer:", cf="Should you help? 1) no 2) yes. Answer:", eb="1", ec="2"):
    return {"prompt_id": pid, "category": "c", "base": {"prompt": base, "ethical_option": eb},
            "counterfactual": {"prompt": cf, "ethical_option": ec}}


# --- 3. prompts longer than the model can read ----------------------------------------------------

def test_a_prompt_longer_than_the_context_exits_2_before_any_forward(runner, tiny_model_dir, tmp_path, monkeypatch):
    import nnethics.engine.run

    def no_forward(*args, **kwargs):
        raise AssertionError("an analysis ran")

    monkeypatch.setattr(nnethics.engine.run, "execute", no_forward)
    long = "Should you help? " * 300 + "1) yes 2) no. Answer:"
    prompts = _jsonl(tmp_path / "p.jsonl", [_pair("short"), _pair("too_long", cf=long, ec="2")])
    res = runner.invoke(cli, ["run", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--analyses", "decisions",
                              "--store", str(tmp_path / "store")])
    line = _error_line(res)
    assert line.startswith("Error: prompt_id 'too_long' (counterfactual): ")  # one problem: one line
    assert line.endswith("tokens as the model reads it (chat template included), but the model reads at most 512 "
                         "(max_position_embeddings in its config); shorten the prompt or remove the pair")
    n = int(line.split(": ")[2].split()[0])
    assert n > 512
    assert not list((tmp_path / "store").rglob("*.nc"))


@pytest.mark.builtin
def test_a_22k_token_prompt_is_refused_for_smollm2_at_once(builtin_model, tmp_path):
    import time

    from nnethics.engine import make_context

    prompts = load_prompts(_jsonl(tmp_path / "p.jsonl", [_pair("huge", base="word " * 22000 + "Answer:")]))
    t0 = time.monotonic()
    with pytest.raises(PromptError, match=r"prompt_id 'huge' \(base\): 22\d\d\d tokens as the model reads it .* at most "
                                          r"8192 \(max_position_embeddings in its config\)"):
        make_context(builtin_model, prompts)
    assert time.monotonic() - t0 < 30


# --- 4. tracebacks where a message belongs ----------------------------------------------------

@pytest.mark.parametrize("device, expected", [
    ("foo", "Error: --device 'foo' is not a device name; use cpu, cuda, cuda:N or mps"),
    ("cuda", "Error: --device cuda: CUDA is not available on this machine"),
    ("cuda:7", "Error: --device cuda:7: "),
])
def test_a_missing_device_exits_2_before_the_model_loads(runner, no_model_load, tmp_path, device, expected):
    import torch

    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has the device")
    res = runner.invoke(cli, ["run", "--device", device, "--store", str(tmp_path / "store"), "--limit", "1"])
    assert _error_line(res).startswith(expected)
    assert not (tmp_path / "store").exists()


def test_a_store_that_is_a_file_exits_2(runner, no_model_load, tmp_path):
    f = tmp_path / "results"
    f.write_text("not a folder")
    res = runner.invoke(cli, ["run", "--store", str(f), "--limit", "1"])
    assert _error_line(res) == f"Error: --store {f}: is a file, not a folder; pass a folder (it is created if missing)"
    res = runner.invoke(cli, ["run", "--store", str(f / "sub"), "--limit", "1"])
    assert _error_line(res) == (f"Error: --store {f / 'sub'}: {f} is a file, so the folder cannot be created there; "
                                "pass another --store")
    assert f.read_text() == "not a folder"


def test_a_read_only_store_exits_2(runner, no_model_load, tmp_path):
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        target = ro / "store"
    elif Path("/sys/kernel").is_dir():
        target = Path("/sys/nnethics-store")  # root may write anywhere but sysfs
    else:
        pytest.skip("no read-only location available")
    res = runner.invoke(cli, ["run", "--store", str(target), "--limit", "1"])
    line = _error_line(res)
    assert line.startswith(f"Error: --store {target}: not writable (its parent {target.parent} is not writable, so it "
                           "cannot be created): ")
    assert line.endswith("; pass a folder you can write to")


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_disk_exits_2_naming_the_place_and_keeps_finished_parts(tiny_model_dir, tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "160k"):
        pytest.skip("needs root and mount to make a small file system (the unit test in test_reliability_store covers "
                    "the message)")
    # In a subprocess: HDF5 keeps a failed file's descriptor until the process exits, which would keep the mount busy.
    args = [sys.executable, "-m", "nnethics.cli", "run", "--model", str(tiny_model_dir), "--analyses", "decisions",
            "--limit", "12", "--batch-size", "1", "--store", str(disk / "store")]
    try:
        res = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert res.returncode == 2, res.stderr
        line = res.stderr.strip().splitlines()[-1]
        folder = next((disk / "store").iterdir())
        assert line.startswith(f"Error: no space left on device at {folder}")
        assert line.endswith("; free some space or pass another --store (finished parts are kept: rerun the same "
                             "command to resume)")
        parts = sorted((folder / ".parts" / "decisions").glob("*.nc"))
        assert parts and all(load(p).sizes["prompt"] == 1 for p in parts)  # what finished is intact
        assert not list(folder.rglob("*.tmp"))
        subprocess.run(["mount", "-o", "remount,size=20m", str(disk)], check=True)
        res = subprocess.run(args, capture_output=True, text=True, timeout=300)  # space freed: the same command resumes
        assert res.returncode == 0, res.stderr
        assert load(folder / "decisions.nc").sizes["prompt"] == 12
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_export_of_a_corrupt_or_foreign_file_exits_2(runner, tmp_path):
    from synthetic import write_store

    folder = write_store(tmp_path, analyses=("decisions",))
    (folder / "decisions.nc").write_bytes(b"\x89HDF\r\n\x1a\ntruncated")
    res = runner.invoke(cli, ["export", str(folder)])
    line = _error_line(res)
    assert line.startswith(f"Error: {folder / 'decisions.nc'}: not a readable NetCDF file (")
    assert line.endswith("); recompute it with `nnethics run` or move it out of the folder, then export again")
    write_atomic(xr.Dataset({"t": ("x", np.arange(3.0))}, attrs={"title": "someone else's"}), folder / "decisions.nc")
    res = runner.invoke(cli, ["export", str(folder)])
    assert _error_line(res) == (f"Error: {folder / 'decisions.nc'}: not an nnethics 'decisions' result (its 'analysis' "
                                f"attribute is None); move it out of {folder} or recompute it with `nnethics run`")
    write_atomic(xr.Dataset({"t": ("x", np.arange(3.0))}, attrs={"analysis": "decisions"}), folder / "decisions.nc")
    res = runner.invoke(cli, ["export", str(folder)])
    assert _error_line(res).startswith(f"Error: {folder / 'decisions.nc'}: lacks what the decisions table needs (")


def test_prompts_check_on_non_utf8_jsonl_exits_2_naming_the_line(runner, tmp_path):
    good = json.dumps(_pair("a"))
    f = tmp_path / "p.jsonl"
    f.write_bytes(good.encode() + b"\n" + good.replace('"a"', '"caf\xe9"').encode("latin-1") + b"\n")
    res = runner.invoke(cli, ["prompts", "check", str(f)])
    assert _error_line(res).startswith(f"Error: {f} line 2: not UTF-8 text (invalid continuation byte at byte ")
    assert res.output.strip().endswith("); save the file as UTF-8")


def test_a_non_utf8_models_config_exits_2(runner, tmp_path, monkeypatch, no_model_load):
    cfg = tmp_path / "models.json"
    cfg.write_bytes('{"m": {"name": "org/caf\xe9"}}'.encode("latin-1"))
    monkeypatch.setenv("NNETHICS_CONFIG", str(cfg))
    res = runner.invoke(cli, ["models"])
    assert _error_line(res) == (f"Error: {cfg}: not UTF-8 text (invalid continuation byte at byte 23); save the file "
                                "as UTF-8")


def test_report_on_a_store_with_an_unreadable_file_says_so_on_stderr(runner, tmp_path):
    from synthetic import write_store

    folder = write_store(tmp_path, analyses=("decisions", "attribution"))
    (folder / "attribution.nc").write_bytes(b"garbage")
    res = runner.invoke(cli, ["report", str(folder)])
    assert res.exit_code == 0, res.output
    assert res.stderr.startswith(f"warning: {folder / 'attribution.nc'} cannot be read (")
    assert "the report leaves it out; recompute it with `nnethics run` or remove it" in res.stderr
    assert (folder / "report.html").exists()


# --- 5. validation gaps ----------------------------------------------------------------------

@pytest.mark.parametrize("entry, message", [
    ({"name": "org/x", "remote": "no"},
     "entry 'm': 'remote' must be true, false or a server URL like \"https://api.ndif.us\" (JSON true/false, not a "
     "string), got \"no\""),
    ({"name": "org/x", "dtype": "fp8"}, "entry 'm': 'dtype' must be one of \"auto\", \"float32\", \"bfloat16\", "
                                        "\"float16\", got \"fp8\""),
    ({"name": "org/x", "revision": 3}, "entry 'm': 'revision' must be a branch, tag or commit, as a string, got 3"),
    ({"name": 7}, "entry 'm': 'name' must be a hub id (org/name), a local model folder or a .gguf file, as a string, got 7"),
    ({"name": "org/x", "token": ["hf_x"]}, "entry 'm': 'token' must be a string (better: leave it out and set HF_TOKEN), "
                                           "got a list"),
    ({"name": "org/x", "remot": True}, "entry 'm': unknown field 'remot' (allowed: name, token, revision, dtype, remote)"),
])
def test_models_config_fields_are_type_checked_naming_file_and_key(tmp_path, entry, message):
    cfg = tmp_path / "models.json"
    cfg.write_text(json.dumps({"m": entry}))
    with pytest.raises(ConfigError) as err:
        load_model_config(cfg)
    assert str(err.value) == f"{cfg}: {message}; fix it in {cfg}"


def test_models_config_accepts_booleans_urls_and_a_bom_and_never_echoes_a_token(tmp_path):
    cfg = tmp_path / "models.json"
    cfg.write_bytes(b"\xef\xbb\xbf" + json.dumps({
        "a": {"name": "org/a", "remote": True, "dtype": "bfloat16", "revision": "main", "token": SECRET},
        "b": {"name": "org/b", "remote": "https://my-ndif.example:5001"},
        "c": {"name": "org/c", "remote": False}}).encode())
    models = load_model_config(cfg)
    assert [models[k].remote for k in "abc"] == [True, "https://my-ndif.example:5001", False]
    assert SECRET not in repr(models)
    cfg.write_text(json.dumps({"a": {"name": "org/a", "token": SECRET, "remote": "yes"}}))
    with pytest.raises(ConfigError) as err:
        load_model_config(cfg)
    assert SECRET not in str(err.value)


@pytest.mark.parametrize("pid, shown", [(["a", "b"], '["a", "b"]'), (None, "null"), ("", '""'), ({"x": 1}, '{"x": 1}')])
def test_a_jsonl_prompt_id_must_be_a_non_empty_string(tmp_path, pid, shown):
    f = _jsonl(tmp_path / "p.jsonl", [_pair("ok"), _pair(pid)])
    with pytest.raises(PromptError) as err:
        load_prompts(f)
    assert err.value.problems == [f"{f} line 2: prompt_id must be a non-empty string, got {shown}; give every pair a "
                                  "unique id like \"harm_001\""]


def test_a_seed_prompt_id_that_is_null_or_a_list_is_refused(tmp_path):
    base = json.loads((PROMPTS / "base_prompts.json").read_text())[:2]
    cf = json.loads((PROMPTS / "counterfactual_prompts.json").read_text())[:2]
    base[1]["prompt_id"] = ["x"]
    (tmp_path / "base_prompts.json").write_text(json.dumps(base))
    (tmp_path / "counterfactual_prompts.json").write_text(json.dumps(cf))
    with pytest.raises(PromptError, match=r"record 1 \(prompt_id \['x'\]\): prompt_id must be a non-empty string, "
                                          r"got \[\"x\"\]"):
        load_prompts(tmp_path)


def test_an_identical_counterfactual_with_the_same_option_is_warned_about(runner, tmp_path):
    same = "Should you help? 1) yes 2) no. Answer:"
    f = _jsonl(tmp_path / "p.jsonl", [_pair("fine"), _pair("same", base=same, cf=same, eb="1", ec="1")])
    ps = load_prompts(f)
    assert len(ps) == 2 and [pid for pid, _ in ps.warnings] == ["same"]
    assert ps.subset(limit=1).warnings == ()  # a warning belongs to its pair
    res = runner.invoke(cli, ["prompts", "check", str(f)])
    assert res.exit_code == 0
    assert res.stderr == (f"warning: {f}: prompt_id 'same': the counterfactual is identical to the base prompt with the "
                          "same ethical_option '1', so it cannot move the decision; swap the options in the "
                          "counterfactual\n")
    swapped = _jsonl(tmp_path / "q.jsonl", [_pair("x", base=same, cf=same, eb="1", ec="2")])
    assert "same ethical_option" not in load_prompts(swapped).warnings[0][1]  # same text, other option: another
    # problem, with its own warning (tests/test_reliability_semantics.py)


def test_a_utf8_bom_is_accepted_in_both_layouts(tmp_path):
    f = _jsonl(tmp_path / "p.jsonl", [_pair("a"), _pair("b")], bom=True)
    assert load_prompts(f).ids() == ["a", "b"]
    for name in ("base_prompts.json", "counterfactual_prompts.json"):
        (tmp_path / "seed" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "seed" / name).write_bytes(b"\xef\xbb\xbf" + (PROMPTS / name).read_bytes())
    assert load_prompts(tmp_path / "seed").ids() == load_prompts(PROMPTS).ids()


def test_csv_export_neutralises_formula_cells_and_json_keeps_them(tmp_path):
    from synthetic import decisions

    ds = decisions(n_prompts=6)
    ids = ["=HYPERLINK(\"http://x\")", "+1+2", "-3", "@SUM(A1)", "\tTAB", "plain"]
    ds = ds.assign_coords(prompt=ids)
    if "category" in ds:
        ds["category"] = ("prompt", np.array(["=cmd|' /C calc'!A0"] * 6))
    write_atomic(ds, tmp_path / "m" / "decisions.nc")
    csv = next(p for p in export_store(tmp_path / "m") if p.name == "decisions.csv")
    import pandas as pd

    table = pd.read_csv(csv, keep_default_na=False)
    assert sorted(set(table["prompt_id"])) == sorted(["'" + i for i in ids[:5]] + ["plain"])
    if "category" in table:
        assert set(table["category"]) == {"'=cmd|' /C calc'!A0"}
    assert np.issubdtype(table["logit_diff"].dtype, np.floating)  # numbers stay numbers (negatives included)
    records = json.loads(next(p for p in export_store(tmp_path / "m", fmt="json")
                              if p.name == "decisions.json").read_text())
    assert {r["prompt_id"] for r in records} == set(ids)

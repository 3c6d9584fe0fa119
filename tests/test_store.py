"""NetCDF store: round trip, atomic writes, resumable runs, provenance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from conftest import PROMPTS

from nnethics.engine import run_function
from nnethics.prompts import load_prompts
from nnethics.store import (
    SCHEMA_VERSION,
    PartStore,
    StoreConflict,
    load,
    provenance,
    result_files,
    result_path,
    schema_version,
    write_atomic,
)
from nnethics.store.variables import describe


def _sample() -> xr.Dataset:
    rng = np.random.default_rng(0)
    return xr.Dataset(
        {
            "effect": (("prompt", "layer", "component"), rng.normal(size=(3, 4, 3)).astype(np.float32)),
            "top_token": (("prompt", "k"), np.array([["Ġthe", "🙂"], ["naïve", "中文"], ["line\nbreak", ""]], dtype=str)),
            "flag": (("prompt",), np.array([True, False, True])),
            "ids": (("prompt", "k"), np.array([[1, -1], [2, 3], [4, 5]], dtype=np.int32)),
        },
        coords={"prompt": ["a", "b", "c"], "layer": np.arange(4), "component": ["resid", "attn", "mlp"]},
        attrs={"analysis": "test", "options": json.dumps({"x": 1}), "n": 3, "f": 1.5},
    )


def test_round_trip_is_identical(tmp_path):
    ds = _sample()
    path = write_atomic(ds, tmp_path / "m" / "x.nc")
    xr.testing.assert_identical(describe(ds), load(path))  # as written, plus long_name/units/Conventions (CF)
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["x.nc"]  # no temp file left behind
    assert path.stat().st_mode & 0o044  # readable by group/others like any file written under a normal umask


def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path):
    path = write_atomic(_sample(), tmp_path / "x.nc")
    bad = _sample().assign_attrs(bad={"a": 1})  # NetCDF rejects dict attrs
    with pytest.raises(TypeError):
        write_atomic(bad, path)
    xr.testing.assert_identical(load(path), describe(_sample()))
    assert [p.name for p in tmp_path.iterdir()] == ["x.nc"]


def test_provenance_attrs_are_netcdf_safe():
    attrs = provenance("decisions", options={"layers": [1, 2], "flag": True, "none": None})
    assert all(isinstance(v, (str, int, float)) for v in attrs.values())
    assert json.loads(attrs["options"]) == {"flag": True, "layers": [1, 2], "none": None}


def test_every_file_declares_its_schema_version():
    assert provenance("decisions")["schema_version"] == SCHEMA_VERSION == 2


def test_load_reads_a_version_1_file_in_the_current_schema(tmp_path):
    """A lens file from before schema_version: its option_logit/option_prob come back as label_logit/label_prob,
    values untouched; a current file comes back as written."""
    v1 = xr.Dataset({"option_logit": (("prompt", "option"), np.array([[1.5, -2.0]], dtype=np.float32)),
                     "option_prob": (("prompt", "option"), np.array([[0.9, 0.1]], dtype=np.float32))},
                    coords={"prompt": ["a"], "option": ["1", "2"]}, attrs={"analysis": "lens"})
    back = load(write_atomic(v1, tmp_path / "lens.nc"))
    assert schema_version(back) == 1 and set(back.data_vars) == {"label_logit", "label_prob"}
    np.testing.assert_array_equal(back["label_logit"].values, v1["option_logit"].values)
    current = _sample().assign_attrs(schema_version=SCHEMA_VERSION)
    xr.testing.assert_identical(load(write_atomic(current, tmp_path / "x.nc")), describe(current))


def test_result_files_lists_consolidated_results_only(tmp_path):
    folder = tmp_path / "m"
    for name in ("patching", "decisions"):
        write_atomic(_sample(), folder / f"{name}.nc")
    (folder / ".parts" / "lens").mkdir(parents=True)
    write_atomic(_sample(), folder / ".parts" / "lens" / "000000.nc")
    (folder / ".patching.nc.abc.tmp").write_bytes(b"half")
    (folder / "lens.nc.unreadable-20260101T000000Z").write_bytes(b"junk")
    (folder / "report.html").write_text("x")
    assert result_files(folder) == {"decisions": folder / "decisions.nc", "patching": folder / "patching.nc"}
    assert result_files(tmp_path / "missing") == {}


def _fake_analysis(calls):
    def fn(model, pairs):
        calls.extend(p.prompt_id for p in pairs)
        n = len(pairs)
        return xr.Dataset(
            {"value": (("prompt", "layer"), np.array([[hash(p.prompt_id) % 97 + j for j in range(3)] for p in pairs], dtype=float))},
            coords={"prompt": [p.prompt_id for p in pairs], "layer": np.arange(3)},
        ) if n else None
    return fn


class _FakeModel:
    slug = store_folder = "fake"

    def provenance(self):
        return {"model_id": "fake/model", "dtype": "float32"}


def test_resume_after_interrupted_run(tmp_path):
    prompts = load_prompts(PROMPTS).subset(limit=7)
    calls: list[str] = []
    inner = _fake_analysis(calls)
    state = {"chunks": 0}

    def crashing(model, pairs):
        state["chunks"] += 1
        if state["chunks"] == 3:
            raise KeyboardInterrupt  # the process dies mid-run
        return inner(model, pairs)

    with pytest.raises(KeyboardInterrupt):
        run_function("fake", crashing, _FakeModel(), prompts, str(tmp_path), {"o": 1}, batch_size=2, progress=False)
    assert not result_path(tmp_path, "fake", "fake").exists()
    assert sorted(calls) == sorted(prompts.ids()[:4])  # two chunks finished and were kept

    calls.clear()
    ds = run_function("fake", inner, _FakeModel(), prompts, str(tmp_path), {"o": 1}, batch_size=2, progress=False)
    assert calls == prompts.ids()[4:]  # only the unfinished prompts ran again
    assert list(ds["prompt"].values) == prompts.ids()
    calls.clear()
    fresh = run_function("fake", inner, _FakeModel(), prompts, str(tmp_path / "fresh"), {"o": 1}, batch_size=3, progress=False)
    np.testing.assert_array_equal(ds["value"].values, fresh["value"].values)
    assert not (tmp_path / "fake" / ".parts").exists()


def test_parts_from_other_options_are_not_reused(tmp_path):
    prompts = load_prompts(PROMPTS).subset(limit=4)
    calls: list[str] = []
    parts = PartStore(tmp_path, "fake", "fake", provenance("fake", _FakeModel(), prompts, {"o": 1}))
    parts.write_part(_fake_analysis([])(None, prompts.pairs[:2]))
    with pytest.raises(StoreConflict, match=r"interrupted run with other options \(o: stored 1, this run 2\)"):
        run_function("fake", _fake_analysis(calls), _FakeModel(), prompts, str(tmp_path), {"o": 2}, batch_size=4,
                     progress=False)
    assert calls == [] and len(parts.load_parts()) == 1  # refused before computing or deleting anything
    run_function("fake", _fake_analysis(calls), _FakeModel(), prompts, str(tmp_path), {"o": 2}, batch_size=4,
                 progress=False, overwrite=True)
    assert calls == prompts.ids()  # different options, --overwrite: everything recomputed


def test_out_of_memory_halves_the_batch_without_losing_work(tmp_path):
    import torch

    prompts = load_prompts(PROMPTS).subset(limit=6)
    calls: list[str] = []
    inner = _fake_analysis(calls)
    sizes = []

    def picky(model, pairs):
        sizes.append(len(pairs))
        if len(pairs) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return inner(model, pairs)

    ds = run_function("fake", picky, _FakeModel(), prompts, str(tmp_path), {}, batch_size=8, progress=False)
    assert sizes[:3] == [6, 4, 2] and list(ds["prompt"].values) == prompts.ids()


def test_out_of_memory_retries_resume_at_the_first_unfinished_pair_and_end_with_the_original_error(tmp_path):
    """The halving (nnethics.models.errors.halving) resumes at the first unfinished pair and ends with the real error."""
    import torch

    prompts = load_prompts(PROMPTS).subset(limit=6)
    calls: list[str] = []
    inner = _fake_analysis(calls)
    seen: list[list[str]] = []

    def late_oom(model, pairs):  # the second chunk runs out of memory once: the first is not redone
        seen.append([p.prompt_id for p in pairs])
        if len(seen) == 2:
            raise RuntimeError("CUDA error: out of memory")  # is_oom's, not accelerate's wording
        return inner(model, pairs)

    ds = run_function("fake", late_oom, _FakeModel(), prompts, str(tmp_path / "a"), {}, batch_size=4, progress=False)
    ids = prompts.ids()
    assert seen == [ids[:4], ids[4:6], ids[4:6]] and calls == ids  # retried at size 2 from pair 5
    assert list(ds["prompt"].values) == ids

    def always_oom(model, pairs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError, match="CUDA out of memory"):  # not accelerate's "reached zero"
        run_function("fake", always_oom, _FakeModel(), prompts, str(tmp_path / "b"), {}, batch_size=2, progress=False)
    tries: list[int] = []

    def cudnn(model, pairs):  # accelerate would shrink the batch on this; it is no OOM, so it is raised
        tries.append(len(pairs))
        raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED.")

    with pytest.raises(RuntimeError, match="cuDNN"):
        run_function("fake", cudnn, _FakeModel(), prompts, str(tmp_path / "c"), {}, batch_size=4, progress=False)
    assert tries == [4]


def test_completed_run_is_reused_and_extended(tmp_path):
    prompts = load_prompts(PROMPTS)
    calls: list[str] = []
    fn = _fake_analysis(calls)
    run_function("fake", fn, _FakeModel(), prompts.subset(limit=3), str(tmp_path), {"o": 1}, batch_size=2, progress=False)
    calls.clear()
    # same prompt set file, more pairs requested: only the new ones are computed
    ds = run_function("fake", fn, _FakeModel(), prompts.subset(limit=5), str(tmp_path), {"o": 1}, batch_size=2, progress=False)
    assert calls == prompts.ids()[3:5]
    assert list(ds["prompt"].values) == prompts.ids()[:5]
    assert "fingerprint" in load(result_path(tmp_path, "fake", "fake")).attrs


def test_a_smaller_rerun_never_drops_stored_prompts(tmp_path):
    prompts = load_prompts(PROMPTS)
    fn = _fake_analysis([])
    run_function("fake", fn, _FakeModel(), prompts.subset(limit=4), str(tmp_path), {"o": 1}, batch_size=2, progress=False)
    ds = run_function("fake", fn, _FakeModel(), prompts.subset(limit=2), str(tmp_path), {"o": 1}, batch_size=2, progress=False)
    assert list(ds["prompt"].values) == prompts.ids()[:4]


def test_consolidation_keeps_longer_strings_of_later_parts(tmp_path):
    """A part read back from disk carries its string width in its encoding; it must not truncate later parts."""
    prompts = load_prompts(PROMPTS)
    pairs = [prompts.pairs[0], prompts.pairs[30], prompts.pairs[31]]  # ids of 8, then 9-10 characters
    assert len({len(p.prompt_id) for p in pairs}) > 1
    sub = type(prompts)(tuple(pairs), prompts.name, prompts.sha256, prompts.labels, prompts.files)

    def fn(model, chunk):
        return xr.Dataset(
            {"text": (("prompt",), np.array([p.cf for p in chunk], dtype=str)),
             "category": (("prompt",), np.array([p.category * 3 for p in chunk], dtype=str))},
            coords={"prompt": [p.prompt_id for p in chunk]},
        )

    ds = run_function("fake", fn, _FakeModel(), sub, str(tmp_path), {}, batch_size=1, progress=False)
    stored = load(result_path(tmp_path, "fake", "fake"))
    assert list(stored["prompt"].values) == [p.prompt_id for p in pairs] == list(ds["prompt"].values)
    assert list(stored["text"].values) == [p.cf for p in pairs]
    assert list(stored["category"].values) == [p.category * 3 for p in pairs]


# A real process, really killed: SIGKILL (no clean-up, no exception handlers) at a chosen point of a run.
_KILLER = r'''
import os, signal, sys, types
from nnethics.cli import main
from nnethics.store import parts

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

at = os.environ.get("KILL_AT", "")
if at == "first_part":  # right after the first part is on disk
    write_part = parts.PartStore.write_part
    def after_write(self, ds):
        path = write_part(self, ds)
        die()
        return path
    parts.PartStore.write_part = after_write
elif at == "cleanup":  # the consolidated file is written, the parts are not yet removed
    parts.shutil = types.SimpleNamespace(rmtree=die)
sys.argv = ["nnethics", *sys.argv[1:]]
main()
'''


@pytest.mark.slow  # five CLI processes: about a minute
def test_sigkilled_runs_resume_to_the_same_result(tiny_model_dir, tmp_path):
    """``nnethics run`` killed with SIGKILL after its first part, and between writing the consolidated file
    and removing the parts, then rerun, stores exactly what an uninterrupted run stores."""
    import os
    import subprocess
    import sys

    script = tmp_path / "killer.py"
    script.write_text(_KILLER)

    def run(store, kill_at=""):
        args = [sys.executable, str(script), "run", "--model", str(tiny_model_dir), "--analyses", "decisions,patching",
                "--limit", "3", "--batch-size", "1", "--store", str(store), "--no-progress"]
        env = {**os.environ, "KILL_AT": kill_at}
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)

    slug = tiny_model_dir.name
    fresh = run(tmp_path / "fresh")
    assert fresh.returncode == 0, fresh.stderr

    for kill_at in ("first_part", "cleanup"):
        store = tmp_path / kill_at
        killed = run(store, kill_at)
        assert killed.returncode == -9, (killed.returncode, killed.stderr)
        parts = list((store / slug / ".parts" / "decisions").glob("*.nc"))
        if kill_at == "first_part":
            assert len(parts) == 1 and not (store / slug / "decisions.nc").exists()
        else:
            assert len(parts) == 3 and (store / slug / "decisions.nc").exists()
        again = run(store)
        assert again.returncode == 0, again.stderr
        assert not (store / slug / ".parts").exists()
        for name in ("decisions", "patching"):
            want, got = load(tmp_path / "fresh" / slug / f"{name}.nc"), load(store / slug / f"{name}.nc")
            for ds in (want, got):  # the only attr that may differ: when it was written
                ds.attrs.pop("created", None)
            xr.testing.assert_identical(got, want)


def test_the_one_atomic_writer_keeps_the_old_file_when_the_write_fails(tmp_path):
    """``write_via_temp`` is behind results, reports, exports and lenses: a failing writer leaves the old file
    and no temp file; a finished one replaces it, readable like any file."""
    from nnethics.store import write_via_temp

    path = tmp_path / "params.safetensors"
    path.write_bytes(b"old")

    def fails(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_via_temp(path, fails)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["params.safetensors"]
    write_via_temp(path, lambda tmp: Path(tmp).write_bytes(b"new"))
    assert path.read_bytes() == b"new" and path.stat().st_mode & 0o044
    assert [p.name for p in tmp_path.iterdir()] == ["params.safetensors"]


def test_chunks_of_different_token_lengths_are_padded_with_missing_values():
    """Prompts of two chunks tokenize to different lengths: the shorter chunk's token axis is padded with -1 (ids),
    "" (token text) and NaN (floats), never with a value that is a real token or number."""
    from nnethics.store.parts import combine

    def chunk(ids: list[str], width: int) -> xr.Dataset:
        n = len(ids)
        return xr.Dataset({"input_ids": (("prompt", "token"), np.arange(n * width, dtype=np.int32).reshape(n, width)),
                           "token_text": (("prompt", "token"), np.full((n, width), "a")),
                           "score": (("prompt", "token"), np.ones((n, width)))}, coords={"prompt": ids})

    ds = combine([chunk(["p0"], 2), chunk(["p1"], 4)], order=["p1", "p0"])
    assert ds["prompt"].values.tolist() == ["p1", "p0"]
    short = ds.sel(prompt="p0")
    assert short["input_ids"].values.tolist() == [0, 1, -1, -1]
    assert short["token_text"].values.tolist() == ["a", "a", "", ""]
    assert np.isnan(short["score"].values[2:]).all() and (short["score"].values[:2] == 1).all()


# Every setting that decides whether stored work is reused, written out here (not read from FINGERPRINT_KEYS, so a
# key dropped there is not dropped here too): its value in the stored run, in this run, and how the refusal names it.
REUSE_SETTINGS = {
    "analysis": ("decisions", "lens", "analysis: stored 'decisions', this run 'lens'"),
    "model_id": ("org/model", "org/other", "model_id: stored 'org/model', this run 'org/other'"),
    "model_revision": ("abc123", "def456", "model_revision: stored 'abc123', this run 'def456'"),
    "dtype": ("float32", "bfloat16", "dtype: stored 'float32', this run 'bfloat16'"),
    "quantization": ("", "4bit", "quantization: stored '', this run '4bit'"),
    "prompt_set_sha256": ("a" * 64, "b" * 64, "prompt set sha256: stored aaaaaaaaaaaa, this run bbbbbbbbbbbb"),
    "options": ('{"o": 1}', '{"o": 2}', "o: stored 1, this run 2"),
    "labels": ('["1", "2"]', '["A", "B"]', "labels: stored '[\"1\", \"2\"]', this run '[\"A\", \"B\"]'"),
}


def _stored_run(tmp_path, changes: dict) -> tuple[PartStore, PartStore]:
    """A finished result and one finished part of a run with every REUSE_SETTINGS value, and a PartStore for a
    run that differs from it in ``changes`` only."""
    attrs = {k: v[0] for k, v in REUSE_SETTINGS.items()} | {"created": "2024-01-01T00:00:00+00:00",
                                                            "nnethics_version": "0.1.0"}
    stored = PartStore(tmp_path, "fake", "fake", attrs)
    stored.write_part(_sample())
    stored.consolidate()
    stored.write_part(_sample().assign_coords(prompt=["d", "e", "f"]))
    return stored, PartStore(tmp_path, "fake", "fake", {**attrs, **changes})


@pytest.mark.parametrize("key", list(REUSE_SETTINGS))
def test_each_setting_alone_keeps_stored_work_from_being_reused(tmp_path, key):
    """One setting changed at a time: the result and the parts are not reused, and the refusal names that setting."""
    from nnethics.store import fingerprint

    stored, ours = _stored_run(tmp_path, {key: REUSE_SETTINGS[key][1]})
    assert ours.key != stored.key == fingerprint(stored.attrs)
    assert ours.previous() is None and ours.load_parts() == [] and ours.done_ids() == set()
    with pytest.raises(StoreConflict) as err:
        ours.check()
    said = [name for name, (_, _, words) in REUSE_SETTINGS.items() if words in str(err.value)]
    assert said == [key], str(err.value)  # that setting, and no other


def test_settings_that_do_not_change_results_keep_stored_work_reusable(tmp_path):
    stored, ours = _stored_run(tmp_path, {"created": "2025-06-01T12:00:00+00:00", "nnethics_version": "0.2.0"})
    assert ours.key == stored.key
    ours.check()  # no conflict
    assert ours.previous() is not None and ours.done_ids() == {"a", "b", "c", "d", "e", "f"}

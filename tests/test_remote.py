"""Remote (NDIF) runs against the loopback server in tests/ndif_server.py, or the real NDIF server (``make test-ndif``).

The server runs in a child process that cannot import nnethics (like the real NDIF) and serves the
tiny Llama of ``tiny_model_dir`` under the hub id ``org/tiny-llama`` (and a tiny GPT-2 for the
``rename=`` aliases). The client builds its weightless model from the folder's config and tokenizer;
``_ID_CACHE`` maps the folder to the hub id offline. The CLI tests run the real ``nnethics run --remote``
with ``NDIF_HOST`` pointing at the server.

Every test runs against both servers except those marked ``imitation``: they need what only the imitation has (fault
switches to drop, delay or fail a request, byte counters on the server's side, and key checks: without Postgres the
real server accepts any key). ``make test-ndif`` runs this file against the real server (``NNETHICS_NDIF=real``,
those deselected); tests/test_ndif_real.py holds what only the real server can show.
"""

from __future__ import annotations

import pickle

import ndif_real
import pytest
import torch
import xarray as xr
from click.testing import CliRunner
from conftest import PROMPTS, bytecode_fallbacks
from ndif_server import NdifServer, ServerProcess

from nnethics.cli import cli
from nnethics.models import load_model
from nnethics.models.remote import ENV_BACKOFF, ENV_RETRIES, ENV_TIMEOUT, STATS, register_nnethics, resolve_host
from nnethics.store import PARTS

KEY = "ndif-test-key-6f1c0a9e"  # must never show up in output, errors or payloads
LLAMA, GPT2 = "org/tiny-llama", "org/tiny-gpt2"
MAX_KB_PER_PAIR = 16.0


@pytest.fixture(scope="module")
def served(request, tiny_model_dir, gpt2_dir, tmp_path_factory):
    """The imitation (tests/ndif_server.py) by default; the real NDIF server under ``make test-ndif``."""
    if ndif_real.wanted():
        real = request.getfixturevalue("real_ndif")
        real.serve(LLAMA, tiny_model_dir)
        real.serve(GPT2, gpt2_dir)
        yield real
        return
    log = tmp_path_factory.mktemp("ndif") / "server.log"
    proc = ServerProcess({LLAMA: tiny_model_dir, GPT2: gpt2_dir}, api_key=KEY, log=log, max_seconds=1800)
    yield proc
    proc.stop()


@pytest.fixture()
def server(served, tiny_model_dir, gpt2_dir, monkeypatch):
    from nnsight.modeling.huggingface import _ID_CACHE

    _ID_CACHE[str(tiny_model_dir)] = LLAMA
    _ID_CACHE[str(gpt2_dir)] = GPT2
    served.clear_faults()
    monkeypatch.setenv("NDIF_HOST", served.url)
    monkeypatch.setenv("NDIF_API_KEY", KEY)
    monkeypatch.setenv(ENV_BACKOFF, "0.05")
    STATS.reset()
    return served


def _run(store, model_dir, *extra, remote=True):
    args = ["run", "--model", str(model_dir), "--prompts", str(PROMPTS), "--store", str(store), "--no-progress",
            *(["--remote"] if remote else []), *extra]
    return CliRunner().invoke(cli, args)


def _message(res) -> str:
    """What the user sees: the output, plus the error if the CLI let it propagate (CliRunner keeps it)."""
    return res.output + (str(res.exception) if res.exception is not None else "")


def _assert_same(local: xr.Dataset, remote: xr.Dataset) -> None:
    xr.testing.assert_allclose(local, remote, rtol=1e-4, atol=1e-5)


def _assert_same_decisions(local: xr.Dataset, remote: xr.Dataset) -> None:
    """Decisions equal at the default tolerances; the verdict's differences of nearly equal logit differences
    (a few 1e-5 logits on tiny models) in absolute logits."""
    from nnethics.verdict import PAIR_DESCRIPTIONS

    derived = [v for v in local.data_vars if v in PAIR_DESCRIPTIONS or "group" in local[v].dims]
    xr.testing.assert_allclose(local.drop_vars(derived), remote.drop_vars(derived))
    xr.testing.assert_allclose(local[derived], remote[derived], rtol=1e-4, atol=1e-5)


def test_loopback_server_lacks_nnethics_so_nnethics_ships_by_value(server, tiny_model_dir):
    from cloudpickle.cloudpickle import _PICKLE_BY_VALUE_MODULES
    from nnsight.intervention.backends.remote import RemoteBackend, RemoteError

    assert server.snapshot()["nnethics_importable"] is False
    handle = load_model(str(tiny_model_dir), remote=True)
    ids = torch.tensor([[1, 2, 3]])
    _PICKLE_BY_VALUE_MODULES.discard("nnethics")  # the trace refers to the handle: pickled by reference now
    try:
        plain = RemoteBackend(handle.lm.to_model_key(), host=server.url, api_key=KEY)
        plain.display.enabled = False
        with pytest.raises(RemoteError, match="No module named 'nnethics"):
            with torch.no_grad(), handle.lm.trace(ids, backend=plain):
                out = handle.layer(0).output[:, -1].clone().save()
    finally:
        register_nnethics()
    with torch.no_grad(), handle.trace(ids):
        out = handle.layer(0).output[:, -1].clone().save()
    local = load_model(str(tiny_model_dir))
    with torch.no_grad(), local.trace(ids):
        want = local.layer(0).output[:, -1].clone().save()
    torch.testing.assert_close(out, want)
    assert not out.requires_grad  # the server runs with autograd on; results come back detached


def test_remote_handle_is_weightless_and_keeps_secrets_local(server, tiny_model_dir):
    from nnsight.schema.request import RequestModel
    from nnsight.tracing.backend import Backend

    hf_token = "hf_NotARealTokenButShaped1234"
    handle = load_model(str(tiny_model_dir), remote=True, token=hf_token)
    assert (handle.device, handle.dtype, handle.remote, handle.name) == ("ndif", "float32", True, LLAMA)
    assert handle.lm.to_model_key().startswith("nnsight.modeling.transformers.TransformersModel:")
    assert all(p.device.type == "meta" for p in handle.lm._module.parameters())
    with pytest.raises(Exception, match="runs on NDIF and has no local weights"):
        with handle.lm.trace(torch.tensor([[1, 2]])):  # no remote=: would need local weights
            handle.lm.lm_head.output.save()

    class Capture(Backend):
        def __call__(self, tracer):
            register_nnethics()
            self.blob = RequestModel.serialize(tracer, compress=False)

    cap = Capture()
    with torch.no_grad(), handle.lm.trace(torch.tensor([[1, 2]]), backend=cap):
        handle.lm.lm_head.output[:, -1].clone().save()
    assert hf_token.encode() not in cap.blob and KEY.encode() not in cap.blob
    assert b"NdifModel" not in cap.blob  # the model travels as a plain TransformersModel
    assert b"def provenance(self)" in cap.blob  # nnethics code ships by value (source)
    restored = pickle.loads(pickle.dumps(handle.adapter))
    assert restored == handle.adapter


def test_host_comes_from_ndif_host_at_load_time(monkeypatch):
    monkeypatch.setenv("NDIF_HOST", "http://127.0.0.1:9/")
    assert resolve_host(True) == "http://127.0.0.1:9"
    assert resolve_host("https://example.org") == "https://example.org"
    with pytest.raises(Exception, match="must start with http"):
        resolve_host("example.org")


def test_public_ndif_without_a_key_is_a_clear_bad_input(monkeypatch, tiny_model_dir):
    monkeypatch.delenv("NDIF_HOST", raising=False)
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    import nnsight.schema.config as cfg

    monkeypatch.setattr(cfg.CONFIG.API, "APIKEY", None)
    monkeypatch.setattr(cfg.CONFIG.API, "HOST", "https://api.ndif.us")
    res = CliRunner().invoke(cli, ["tokens", "--model", "meta-llama/Llama-3.1-70B-Instruct", "--remote", "--limit", "1"])
    assert res.exit_code == 2 and "set NDIF_API_KEY" in res.output


def _compare_runs(server, model_dir, tmp_path, *extra, same=None, max_kb=MAX_KB_PER_PAIR, per_chunk=1,
                  requests=None) -> set[str]:
    """Run the CLI locally and on the server; check every stored analysis matches and the request
    and byte counts (client and server agree; ``per_chunk`` requests per chunk, or ``requests`` in all; KB per
    pair). Returns the analyses."""
    limit, batch = 4, 2
    chunks = limit // batch
    args = ("--limit", str(limit), "--batch-size", str(batch), *extra)
    res = _run(tmp_path / "local", model_dir, *args, remote=False)
    assert res.exit_code == 0, _message(res)
    before = server.snapshot()
    res = _run(tmp_path / "remote", model_dir, *args)
    assert res.exit_code == 0, _message(res)
    after = server.snapshot()
    assert KEY not in res.output
    local_files = sorted((tmp_path / "local").glob("*/*.nc"))
    for f in local_files:
        (remote_file,) = (tmp_path / "remote").glob(f"*/{f.name}")
        with xr.open_dataset(f) as a, xr.open_dataset(remote_file) as b:
            (same or _assert_same)(a.load(), b.load())
            assert b.attrs["device"] == "ndif" and b.attrs["remote"] == "ndif"
    total = STATS.totals()
    assert total["requests"] == after["requests"] - before["requests"] == total["attempts"]  # the server's count
    if "bytes_in" in after:  # the imitation counts bytes; the real server does not say
        assert total["bytes_sent"] == after["bytes_in"] - before["bytes_in"]
    print()
    # requests are labelled with the analysis name from the registry (the runner's STATS.scope); the analyses
    # that share one trace per chunk (nnethics.engine.trace) send ONE request per chunk, labelled "a+b+..."
    stems = {f.stem for f in local_files}
    for label in STATS.labels():
        names = label.split("+")
        assert set(names) <= stems, label
        t = STATS.totals(label)
        per_pair = (t["bytes_sent"] + t["bytes_received"]) / 1024 / limit / len(names)
        print(f"{label}: {t['requests']} requests for {chunks} chunks of {batch} pairs in {len(names)} analyses, "
              f"{t['bytes_sent'] / limit / 1024:.2f} KB up + {t['bytes_received'] / limit / 1024:.2f} KB down per pair")
        assert t["requests"] == (per_chunk * chunks if requests is None else requests), label  # one per chunk
        assert per_pair <= max_kb, (label, per_pair)
    assert sum(STATS.totals(label)["requests"] for label in STATS.labels() if "decisions" in label.split("+")) in (
        0, chunks)
    return {f.stem for f in local_files}


def test_cli_remote_decisions_and_attribution_match_local(server, tiny_model_dir, tmp_path):
    assert _compare_runs(server, tiny_model_dir, tmp_path, "--analyses", "decisions,attribution") == {
        "decisions", "attribution"}


def test_cli_remote_heads_matches_local(server, tiny_model_dir, tmp_path):
    """heads through the loopback NDIF server: one request per chunk (prefix, patched blocks, AtP, DLA and the
    attention of the chunk's candidate heads in one session); once finalize has chosen the top heads, the
    complete pass takes their attention from the candidates (no request: here every head is a candidate, 2 x 8
    top heads > 3 x 4); the same file as locally. Its budget is still twice the others': what goes up is most of
    it (the chunk's session, ~14 KB per pair at 2 pairs a chunk); what comes down is ~9 KB."""
    assert _compare_runs(server, tiny_model_dir, tmp_path, "--analyses", "decisions,heads", per_chunk=1,
                         max_kb=2 * MAX_KB_PER_PAIR) == {"decisions", "heads"}


def test_cli_remote_heads_falls_back_where_the_candidates_miss(server, tiny_model_dir, tmp_path, monkeypatch):
    """Chunks whose candidates miss a top head (forced: one candidate each) get the heads they miss from the
    complete pass' fallback: one more request for all of them, the same file as locally."""
    from test_heads import _miss

    calls = _miss(monkeypatch)
    assert _compare_runs(server, tiny_model_dir, tmp_path, "--analyses", "heads", requests=3,
                         max_kb=2 * MAX_KB_PER_PAIR) == {"heads"}
    assert len(calls) == 4  # two chunks locally, two remotely
    with xr.open_dataset(next((tmp_path / "remote").glob("*/heads.nc"))) as ds:
        assert ds["attention"].attrs["fallback_prompts"] == 4


def test_a_fused_remote_run_is_one_request_per_chunk_and_no_more_bytes(server, tiny_model_dir, tmp_path):
    """decisions + attribution + lens through one shared trace: one request per chunk, and no more bytes per
    pair than the three analyses run one by one."""
    args = ("--limit", "4", "--batch-size", "2")
    res = _run(tmp_path / "fused", tiny_model_dir, *args, "--analyses", "decisions,attribution,lens")
    assert res.exit_code == 0, _message(res)
    fused = STATS.totals()
    assert STATS.labels() == ["decisions+attribution+lens"] and fused["requests"] == 2
    separate = {"requests": 0, "bytes_sent": 0, "bytes_received": 0}
    for name in ("decisions", "attribution", "lens"):
        res = _run(tmp_path / name, tiny_model_dir, *args, "--analyses", name)  # the CLI resets STATS per run
        assert res.exit_code == 0, _message(res)
        separate = {k: v + STATS.totals()[k] for k, v in separate.items()}
    assert separate["requests"] == 6
    print(f"\nfused: {fused['bytes_sent'] / 4 / 1024:.2f} KB up + {fused['bytes_received'] / 4 / 1024:.2f} KB down "
          f"per pair; separate: {separate['bytes_sent'] / 4 / 1024:.2f} + {separate['bytes_received'] / 4 / 1024:.2f}")
    assert fused["bytes_sent"] <= separate["bytes_sent"]
    assert fused["bytes_received"] <= separate["bytes_received"] * 1.02  # the same results, one envelope


@pytest.mark.slow
def test_cli_remote_run_of_every_analysis_matches_local(server, tiny_model_dir, tmp_path):
    from nnethics.analyses import default_names

    assert _compare_runs(server, tiny_model_dir, tmp_path) >= set(default_names())


def test_gpt2_aliases_work_remotely(server, gpt2_dir):
    from nnethics.engine import baseline_decisions
    from nnethics.prompts import load_prompts

    pairs = load_prompts(PROMPTS).pairs[:3]
    remote = load_model(str(gpt2_dir), remote=True)
    assert remote.layer(0).path == "model.transformer.h.0"
    _assert_same_decisions(baseline_decisions(load_model(str(gpt2_dir)), pairs), baseline_decisions(remote, pairs))
    assert STATS.totals()["requests"] == 1


def test_session_is_one_request(server, tiny_model_dir):
    handle = load_model(str(tiny_model_dir), remote=True)
    a, b = torch.tensor([[5, 6, 7]]), torch.tensor([[8, 9, 10]])
    last = handle.n_layers - 1
    with torch.no_grad(), handle.lm.session(remote=handle.remote):
        with handle.lm.trace(a):
            h = handle.layer(last).output[:, -1].clone()
        with handle.lm.trace(b):
            handle.layer(last).output[:, -1] = h
            patched = handle.lm.lm_head.output[:, -1, :4].clone().save()
    with torch.no_grad(), handle.trace(a):
        clean = handle.lm.lm_head.output[:, -1, :4].clone().save()
    torch.testing.assert_close(patched, clean, atol=1e-5, rtol=1e-5)  # the last layer's residual decides the logits
    assert STATS.totals()["requests"] == 2


def _patch_last_layer(model, a, b):
    """Two traces that feed each other, written once for every transport (the handle decides)."""
    last = model.n_layers - 1
    with model.trace(a):
        h = model.layer(last).output[:, -1].clone().save()  # saved: locally it is a plain call, no session
    with model.trace(b):
        model.layer(last).output[:, -1] = h
        patched = model.lm.lm_head.output[:, -1, :4].clone().save()
    return patched


def test_handle_session_is_one_request_labelled_by_its_scope(server, tiny_model_dir):
    handle = load_model(str(tiny_model_dir), remote=True)
    local = load_model(str(tiny_model_dir))
    a, b = torch.tensor([[5, 6, 7]]), torch.tensor([[8, 9, 10]])
    with torch.no_grad(), STATS.scope("mine"):
        patched = handle.session(_patch_last_layer, a, b)
    with torch.no_grad():
        here = local.session(_patch_last_layer, a, b)
        dry = local.using(remote="local").session(_patch_last_layer, a, b)
        with handle.trace(a):
            clean = handle.lm.lm_head.output[:, -1, :4].clone().save()
    torch.testing.assert_close(patched, clean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(patched, here, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dry, here)
    # and against plain transformers, outside nnsight (the three above share nnethics' code path): the last
    # layer's last-position output decides the last logits alone, so patching in a's gives a's own last logits
    with torch.no_grad():
        plain = local.lm._module(a).logits[:, -1, :4]
    torch.testing.assert_close(patched, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dry, plain, atol=1e-5, rtol=1e-5)
    assert STATS.totals("mine")["requests"] == 1 and STATS.totals("api")["requests"] == 1  # unscoped: "api"
    assert STATS.totals()["requests"] == 2
    with pytest.raises(TypeError, match="handle.using"):
        handle.trace(a, remote=False)


def test_non_blocking_submit_then_poll(server, tiny_model_dir):
    import time

    handle = load_model(str(tiny_model_dir), remote=True)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad(), handle.lm.trace(ids, remote=server.url, blocking=False) as tracer:
        out = handle.lm.lm_head.output[:, -1, :3].clone().save()  # noqa: F841 - bound names come back
    backend = tracer.backend
    assert backend.job_id
    for _ in range(200):
        result = backend()
        if result is not None:
            break
        time.sleep(0.05)
    with torch.no_grad(), handle.trace(ids):
        want = handle.lm.lm_head.output[:, -1, :3].clone().save()
    (got,) = result.values()
    torch.testing.assert_close(got.detach(), want)


@pytest.mark.imitation
def test_server_error_is_not_retried_and_finished_chunks_resume(server, tiny_model_dir, tmp_path):
    args = ("--analyses", "decisions", "--limit", "4", "--batch-size", "2")
    server.inject("error", times=1, after=1)  # the second chunk fails
    before = server.snapshot()["requests"]
    res = _run(tmp_path / "remote", tiny_model_dir, *args)
    assert res.exit_code != 0
    msg = _message(res)
    assert "the code inside the trace failed there" in msg, msg
    assert server.url in msg and "not retried" in msg and "InjectedFault" in msg and KEY not in msg
    assert server.snapshot()["requests"] - before == 2  # one per chunk, no retry
    (line,) = [x for x in res.output.splitlines() if x.startswith("Error:")]  # one line, the last: chunk and cause
    assert res.output.strip().endswith(line) and "decisions [tiny-llama]: NDIF at" in line, res.output
    assert "pairs 3-4 of the 4 to run" in line and "InjectedFault: the loopback server was told to fail" in line
    (slug,) = [p.name for p in (tmp_path / "remote").iterdir()]
    log = (tmp_path / "remote" / slug / "errors.log").read_text()  # the server's words, whole, in the store's log
    assert log.startswith("--- ") and "pairs 3-4 of the 4 to run" in log and "InjectedFault" in log
    assert str(tmp_path / "remote" / slug / "errors.log") in line
    assert len(list((tmp_path / "remote" / slug / PARTS / "decisions").glob("*.nc"))) == 1
    before = server.snapshot()["requests"]
    res = _run(tmp_path / "remote", tiny_model_dir, *args)
    assert res.exit_code == 0, _message(res)
    assert server.snapshot()["requests"] - before == 1  # only the unfinished chunk
    local = _run(tmp_path / "local", tiny_model_dir, *args, remote=False)
    assert local.exit_code == 0, _message(local)
    with xr.open_dataset(next((tmp_path / "local").glob("*/decisions.nc"))) as a, \
            xr.open_dataset(tmp_path / "remote" / slug / "decisions.nc") as b:
        _assert_same_decisions(a.load(), b.load())


@pytest.mark.imitation
def test_dropped_connection_is_retried(server, tiny_model_dir, tmp_path):
    server.inject("drop", times=1)
    before = server.snapshot()
    res = _run(tmp_path / "remote", tiny_model_dir, "--analyses", "decisions", "--limit", "4", "--batch-size", "2")
    assert res.exit_code == 0, _message(res)
    after = server.snapshot()
    assert after["dropped"] - before["dropped"] == 1
    assert after["requests"] - before["requests"] == 3  # as the server saw them: 2 chunks, one sent twice
    assert STATS.totals() | {"bytes_sent": 0, "bytes_received": 0} == {
        "requests": 2, "attempts": 3, "failed": 0, "bytes_sent": 0, "bytes_received": 0}


@pytest.mark.imitation
def test_timeout_is_retried_then_reported(server, tiny_model_dir, tmp_path, monkeypatch):
    # 3 s of silence, not 1: on a loaded 2-core machine an undelayed answer can take over a second
    monkeypatch.setenv(ENV_TIMEOUT, "3")
    monkeypatch.setenv(ENV_RETRIES, "2")
    args = ("--analyses", "decisions", "--limit", "2", "--batch-size", "2")
    before = server.snapshot()
    server.inject("delay", times=1, seconds=8)
    res = _run(tmp_path / "ok", tiny_model_dir, *args)
    assert res.exit_code == 0, _message(res)
    assert STATS.totals()["attempts"] == 2
    seen = server.snapshot()  # counted by the server itself, not derived from the retry settings
    assert (seen["requests"] - before["requests"], seen["delayed"] - before["delayed"]) == (2, 1)
    server.inject("delay", times=3, seconds=8)
    res = _run(tmp_path / "fail", tiny_model_dir, *args)
    assert res.exit_code != 0
    after = server.snapshot()
    # retries=2: one attempt and two more, so exactly 3 requests reached the server, every one of them delayed
    assert (after["requests"] - seen["requests"], after["delayed"] - seen["delayed"]) == (3, 3)
    msg = _message(res)
    assert "sent nothing for 3 s on each of 3 attempts" in msg and server.url in msg and KEY not in msg
    assert "rerun the same command to resume" in msg


@pytest.mark.imitation
def test_wrong_key_is_rejected_without_retry_or_echo(server, tiny_model_dir, tmp_path, monkeypatch):
    wrong = "ndif-wrong-key-31415926"
    monkeypatch.setenv("NDIF_API_KEY", wrong)
    res = _run(tmp_path / "remote", tiny_model_dir, "--analyses", "decisions", "--limit", "2")
    assert res.exit_code != 0
    msg = _message(res)
    assert "rejected the API key" in msg and "NDIF_API_KEY" in msg and wrong not in msg and server.url in msg
    assert STATS.totals()["attempts"] == 1


@pytest.mark.imitation
def test_in_process_server_and_large_results_by_url(tiny_model_dir, monkeypatch):
    """The in-process mode (blocking unpickler only) with every result staged for download."""
    from nnsight.modeling.huggingface import _ID_CACHE

    from nnethics.engine import baseline_decisions
    from nnethics.prompts import load_prompts

    _ID_CACHE[str(tiny_model_dir)] = LLAMA
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    srv = NdifServer({LLAMA: tiny_model_dir}, inline_limit=0)
    url = srv.start()
    try:
        STATS.reset()
        pairs = load_prompts(PROMPTS).pairs[:2]
        remote = baseline_decisions(load_model(str(tiny_model_dir), remote=url), pairs)
        _assert_same_decisions(baseline_decisions(load_model(str(tiny_model_dir)), pairs), remote)
        (record,) = STATS.records
        assert record.result_bytes > 0 and record.status == "completed" and record.host == url
        assert srv.snapshot()["completed"] == 1
    finally:
        srv.stop()


@pytest.mark.imitation
def test_error_types_from_the_api(server, tiny_model_dir):
    from nnethics.engine import baseline_decisions
    from nnethics.models.remote import RemoteExecutionError
    from nnethics.prompts import load_prompts

    handle = load_model(str(tiny_model_dir), remote=True)
    server.inject("error", times=1)
    with pytest.raises(RemoteExecutionError, match="not retried") as info:
        baseline_decisions(handle, load_prompts(PROMPTS).pairs[:1])
    assert info.value.host == server.url and not info.value.retried


def test_server_out_of_memory_makes_the_runner_halve_the_batch():
    from nnethics.models.errors import is_oom
    from nnethics.models.remote import NdifBackend, RemoteExecutionError, RemoteOutOfMemoryError

    backend = NdifBackend("nnsight.modeling.transformers.TransformersModel:{}", "http://127.0.0.1:9")
    oom = backend._execution_error("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    bug = backend._execution_error("IndexError: index 7 is out of bounds")
    assert isinstance(oom, RemoteOutOfMemoryError) and is_oom(oom)
    assert isinstance(bug, RemoteExecutionError) and not is_oom(bug) and "not retried" in str(bug)
    assert bug.cause == "IndexError: index 7 is out of bounds" and bug.detail.startswith("IndexError")


def test_what_the_real_server_says_is_classified():
    """NDIF's own ERROR descriptions (ndif 0.1.2): the model's actor unreachable is retried like a dropped connection;
    a model it could not start is a refused request (exit 3), not a bug in the traced code."""
    from nnethics.models.remote import NdifBackend, RemoteExecutionError, RemoteRequestError
    from nnethics.models.remote.backend import is_unavailable

    gone = "Error submitting request to model deployment. Please try again later. Sorry for the inconvenience."
    assert is_unavailable(gone) and is_unavailable("  " + gone)
    assert not is_unavailable("ValueError: Error submitting request to model deployment.")  # a traceback's words
    key = 'nnsight.modeling.transformers.TransformersModel:{"repo_id": "org/x", "revision": null}'
    backend = NdifBackend(key, "http://127.0.0.1:9")
    for text in ("Error provisioning model. Please try again later.", "Error starting model. Please try again later.",
                 "Could not deploy this model. Remotable.describe_checkpoint() got an unexpected keyword argument"):
        err = backend._execution_error(text)
        assert isinstance(err, RemoteRequestError) and not isinstance(err, RemoteExecutionError)
        assert "could not start the model org/x" in str(err) and err.cause == text
    assert isinstance(backend._execution_error("Traceback ...\nKeyError: 'Error starting model.'"), RemoteExecutionError)


@pytest.mark.slow
@pytest.mark.parametrize("command", [("attribute",), ("patch",), ("lens", "run")])
def test_analysis_commands_run_remotely(server, tiny_model_dir, tmp_path, command):
    args = [*command, "--model", str(tiny_model_dir), "--prompts", str(PROMPTS), "--limit", "2", "--batch-size", "2",
            "--no-progress"]
    local = CliRunner().invoke(cli, [*args, "--store", str(tmp_path / "local")])
    assert local.exit_code == 0, _message(local)
    remote = CliRunner().invoke(cli, [*args, "--store", str(tmp_path / "remote"), "--remote"])
    assert remote.exit_code == 0, _message(remote)
    assert STATS.totals()["requests"] >= 1 and STATS.totals()["failed"] == 0
    files = sorted((tmp_path / "local").glob("*/*.nc"))
    assert files
    for f in files:
        (other,) = (tmp_path / "remote").glob(f"*/{f.name}")
        with xr.open_dataset(f) as a, xr.open_dataset(other) as b:
            _assert_same(a.load(), b.load())


def test_attribution_bytes_per_prompt(server, tiny_model_dir, tmp_path):
    """Attribution is one request per chunk and brings back numbers per prompt, not vectors.

    The tiny Llama (3 layers, 4 heads, float32, 2 labels) returns 248 bytes of numbers per prompt
    (``wire_bytes``): 19 float64 (scale, embed, 3 x attn/mlp and the label logits per option) and 24
    float32 heads. Each request also carries a fixed cost (status frames and the result container),
    measured here with a trace that saves one number. The old code brought back 12 float32 vectors of
    d=64 per prompt (about 3 KB) and made one more request for the readout weights.
    """
    from nnethics.analyses.attribution import AttributionOptions
    from nnethics.analyses.attribution.trace import wire_bytes
    from nnethics.engine import Run, make_context
    from nnethics.prompts import load_prompts

    handle = load_model(str(tiny_model_dir), remote=True)
    with torch.no_grad(), handle.trace(torch.tensor([[1, 2]])):
        handle.lm.lm_head.output[:, -1, :1].clone().save()
    fixed = STATS.totals()["bytes_received"]
    prompts = load_prompts(PROMPTS).subset(limit=4)
    chunks, rows = 2, 2 * len(prompts.pairs)
    print()
    for heads in (True, False):
        STATS.reset()
        ctx = make_context(handle, prompts)
        with Run(handle, tmp_path / str(heads), batch_size=2, progress=False) as run:
            run.one("attribution", prompts, ctx, AttributionOptions(heads=heads))
        t = STATS.totals("attribution")
        assert t["requests"] == t["attempts"] == chunks == STATS.totals()["requests"]  # one request per chunk
        numbers = sum(wire_bytes(handle.n_layers, handle.n_heads, 2, heads=heads).values())
        per_prompt = (t["bytes_received"] - chunks * fixed) / rows
        print(f"attribution heads={heads}: {t['requests']} requests, {t['bytes_received'] / rows:.0f} B down per prompt "
              f"({per_prompt:.0f} B above the fixed {fixed} B per request; {numbers} B of numbers), "
              f"{t['bytes_sent'] / rows:.0f} B up per prompt")
        # the numbers plus the container's per-tensor records (11 entries, ~60 B each) shared by a chunk's 4 rows
        assert per_prompt <= numbers + 11 * 64 / 4, per_prompt


@pytest.mark.parametrize("corruption", ["counterfactual", "noise"])
def test_patching_is_one_request_per_chunk_on_the_kv_path(server, tiny_model_dir, tmp_path, corruption):
    """The prefix forward, every patched row and the AtP forward + backward of a chunk run in one
    session on the server: one request per chunk, the prefix cache never travels, and the results
    (KV path on both sides) equal a local run's, also when a dropped connection makes a chunk retry."""
    args = ["patch", "--model", str(tiny_model_dir), "--prompts", str(PROMPTS), "--limit", "4", "--batch-size", "2",
            "--corruption", corruption, "--no-progress"]
    local = CliRunner().invoke(cli, [*args, "--store", str(tmp_path / "local")])
    assert local.exit_code == 0, _message(local)
    STATS.reset()
    drop = corruption == "noise" and not ndif_real.wanted()  # the real server has no fault switch
    if drop:
        server.inject("drop", times=1, after=1)  # the second chunk's session is retried whole
    remote = CliRunner().invoke(cli, [*args, "--store", str(tmp_path / "remote"), "--remote"])
    assert remote.exit_code == 0, _message(remote)
    (f,) = (tmp_path / "local").glob("*/*.nc")
    (g,) = (tmp_path / "remote").glob(f"*/{f.name}")
    with xr.open_dataset(f) as a, xr.open_dataset(g) as b:
        assert set(b["forward_path"].values) == {"kv_cache"}
        _assert_same(a.load(), b.load())
    t = STATS.totals(f.stem)  # the analysis name: patching or patching_noise
    assert t["requests"] == 2 == STATS.totals()["requests"] and t["attempts"] == 2 + drop, STATS.report(4)
    if drop:
        return
    per_pair = (t["bytes_sent"] + t["bytes_received"]) / 1024 / 4
    print(f"\npatching ({corruption}): {t['requests']} requests for 2 chunks of 2 pairs, "
          f"{t['bytes_sent'] / 4 / 1024:.2f} KB up + {t['bytes_received'] / 4 / 1024:.2f} KB down per pair")
    assert per_pair <= MAX_KB_PER_PAIR, per_pair


# Gini and top-5 share of |patched - base| over layers: on this weakly initialised model the all-position
# patch moves the LD by 1e-5..1e-3, so float32 differences of 1e-7 between the server's and the local
# forward move these ratios by up to 4e-4 relative. Everything else keeps _assert_same's tolerance.
ILL_CONDITIONED = ("gini_coefficient", "top5_concentration")


def _same_but_ill_conditioned(local: xr.Dataset, remote: xr.Dataset) -> None:
    names = [v for v in ILL_CONDITIONED if v in local]
    _assert_same(local.drop_vars(names), remote.drop_vars(names))
    for v in names:
        xr.testing.assert_allclose(local[v], remote[v], rtol=2e-3, atol=1e-5)


@pytest.mark.slow
def test_cli_remote_patching_variants_and_lens_match_local(server, tiny_model_dir, tmp_path):
    """The position grid, all-position and noise-grid patching and the logit lens: remote == local."""
    got = _compare_runs(server, tiny_model_dir, tmp_path, "--analyses",
                        "patching_grid,patching_all,patching_noise_grid,lens", same=_same_but_ill_conditioned)
    assert got == {"patching_grid", "patching_all", "patching_noise_grid", "lens"}
    for name in ("patching_grid", "patching_all", "patching_noise_grid"):
        with xr.open_dataset(next((tmp_path / "remote").glob(f"*/{name}.nc"))) as ds:
            assert bool(ds["patched_logit_diff"].notnull().any()), name  # not a comparison of two all-NaN files


def test_cli_remote_tuned_lens_matches_local(server, tiny_model_dir, tmp_path):
    """A tuned lens asked for remotely (residuals down, translated here, decoded up again) gives the local lens.nc."""
    from nnethics.analyses.lens.lenses import TunedLens

    model = load_model(str(tiny_model_dir))
    lens = TunedLens.from_model(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lens.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    # a weightless remote model has no unembedding to hash: the lens is matched by the served model's id
    lens.config.base_model_name_or_path = LLAMA
    folder = lens.save(tmp_path / "lens")
    args = ["lens", "run", "--model", str(tiny_model_dir), "--prompts", str(PROMPTS), "--limit", "2", "--batch-size", "2",
            "--tuned-lens", str(folder), "--no-progress"]
    local = CliRunner().invoke(cli, [*args, "--store", str(tmp_path / "local")])
    assert local.exit_code == 0, _message(local)
    remote = CliRunner().invoke(cli, [*args, "--store", str(tmp_path / "remote"), "--remote"])
    assert remote.exit_code == 0, _message(remote)
    assert STATS.totals()["requests"] >= 1 and STATS.totals()["failed"] == 0
    (a_file,) = (tmp_path / "local").glob("*/lens.nc")
    (b_file,) = (tmp_path / "remote").glob("*/lens.nc")
    with xr.open_dataset(a_file) as a, xr.open_dataset(b_file) as b:
        assert a["lens"].values.tolist() == b["lens"].values.tolist() == ["logit", "tuned"]
        assert not bool((a["label_logit"].sel(lens="tuned") == a["label_logit"].sel(lens="logit")).all())
        _assert_same(a.load(), b.load())


def test_no_nnethics_function_travels_as_bytecode(server, tiny_model_dir, tmp_path, monkeypatch):
    """Bytecode belongs to one Python; the real NDIF server runs another (3.12). Every nnethics function a run sends
    travels as source (nnsight's pickler), and every dataclass is rebuilt there (:mod:`nnethics.models.remote.
    portable`): nothing of nnethics reaches cloudpickle's bytecode reducer, whichever analysis runs."""
    seen = bytecode_fallbacks(monkeypatch)
    res = _run(tmp_path, tiny_model_dir, "--limit", "2", "--batch-size", "2", "--analyses",
               "decisions,attribution,lens,patching,patching_noise,heads,cloze")
    assert res.exit_code == 0, _message(res)
    assert STATS.totals()["requests"] >= 3
    assert [s for s in seen if s.startswith("nnethics")] == [], sorted(set(seen))


def test_per_request_sends_several_chunks_in_one_request_and_stores_each(server, tiny_model_dir, tmp_path):
    """--per-request 2: 4 chunks in 2 requests (the server's count); each chunk its own part; the files equal those
    of one chunk per request to the last bit (the same chunks, each with its own padding and trace)."""
    args = ("--analyses", "decisions,attribution,lens,patching", "--limit", "7", "--batch-size", "2")
    one = _run(tmp_path / "one", tiny_model_dir, *args)
    assert one.exit_code == 0, _message(one)
    before = server.snapshot()["requests"]
    res = _run(tmp_path / "two", tiny_model_dir, *args, "--per-request", "2")
    assert res.exit_code == 0, _message(res)
    assert server.snapshot()["requests"] - before == 2 == STATS.totals()["requests"]  # chunks of 2+2, then 2+1
    for f in sorted((tmp_path / "one").glob("*/*.nc")):
        (g,) = (tmp_path / "two").glob(f"*/{f.name}")
        with xr.open_dataset(f) as a, xr.open_dataset(g) as b:
            xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())
            assert {k: v for k, v in a.attrs.items() if k != "created"} == \
                {k: v for k, v in b.attrs.items() if k != "created"}  # --per-request is no option of the result


@pytest.mark.imitation
def test_per_request_keeps_finished_requests_when_one_fails(server, tiny_model_dir, tmp_path):
    """A failed request loses only its own chunks: the rerun sends the rest."""
    args = ("--analyses", "decisions", "--limit", "8", "--batch-size", "2", "--per-request", "2")
    server.inject("error", times=1, after=1)  # the second request (chunks 3 and 4) fails
    res = _run(tmp_path / "remote", tiny_model_dir, *args)
    assert res.exit_code == 1 and "pairs 5-8 of the 8 to run" in _message(res), _message(res)
    (folder,) = (tmp_path / "remote").iterdir()
    assert len(list((folder / PARTS / "decisions").glob("*.nc"))) == 2  # the first request's two chunks
    before = server.snapshot()["requests"]
    assert _run(tmp_path / "remote", tiny_model_dir, *args).exit_code == 0
    assert server.snapshot()["requests"] - before == 1


def test_per_request_through_the_api_equals_the_cli_chunks(server, tiny_model_dir):
    import nnethics as ne

    handle = load_model(str(tiny_model_dir), remote=True)
    pairs = ne.load_prompts(PROMPTS).pairs[:5]
    one = ne.analyze(handle, pairs, ["decisions", "lens"], batch_size=2)
    assert STATS.totals()["requests"] == 3
    STATS.reset()
    three = ne.analyze(handle, pairs, ["decisions", "lens"], batch_size=2, per_request=3)
    assert STATS.totals()["requests"] == 1
    for name in one:
        xr.testing.assert_identical(one[name].drop_attrs(), three[name].drop_attrs())
    with pytest.raises(ValueError, match="per_request must be at least 1"):
        ne.analyze(handle, pairs, ["decisions"], per_request=0)


def test_the_servers_statuses_reach_the_progress_display(server, tiny_model_dir, tmp_path):
    """While a request waits in the server's queue the bar says so, also in a log (stderr not a terminal)."""
    res = _run(tmp_path / "remote", tiny_model_dir, "--analyses", "decisions", "--limit", "2", "--progress")
    assert res.exit_code == 0, _message(res)
    queued = [line for line in res.output.splitlines() if "NDIF queued" in line]
    assert queued and "Added to Queue at position" in queued[0], res.output
    assert queued[0].startswith("decisions [tiny-llama]: 0/2 prompts"), queued


def test_cli_remote_steer_matches_local(server, tiny_model_dir, tmp_path):
    """steer through the loopback NDIF server: its chunk pass rides in the shared trace's request (decisions+steer,
    one per chunk: the states, resid patching and the answer-token rows), its complete pass is one request per
    chunk (the fold directions and states go up, only LD, KL and label-is-top per row come back); the same file as
    locally."""
    assert _compare_runs(server, tiny_model_dir, tmp_path, "--analyses", "decisions,steer",
                         max_kb=3 * MAX_KB_PER_PAIR) == {"decisions", "steer"}

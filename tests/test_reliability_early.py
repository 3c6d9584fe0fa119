"""Reliability: a busy store folder and a rerun with conflicting options are reported before the model loads, and a
remote request that never gets through exits with its own code (3).

The store folder follows from the model spec (``nnethics.models.loading.store_slug``, the loaded handle's ``slug``
without loading), so the lock is tried and the stored files' options compared first; what only the loaded model
decides (its id, revision, dtype; a tuned lens) is still compared after the load.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import click
import pytest
from click.testing import CliRunner
from conftest import PROMPTS
from conftest import error_line as _error_line

import nnethics.models
from nnethics.cli import cli
from nnethics.commands.common import REMOTE_EXIT_CODE, friendly
from nnethics.models.loading import store_slug
from nnethics.store import PARTS


def _hold(folder) -> subprocess.Popen:
    """Another process that holds ``folder``'s writer lock until it is killed."""
    script = textwrap.dedent(f"""
        import time
        from nnethics.store import store_lock
        with store_lock({str(folder)!r}, timeout=0):
            print("holding", flush=True)
            time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding", proc.stderr.read()
    return proc


# --- the folder, from the spec --------------------------------------------------------------------

def test_the_store_folder_is_known_from_the_spec(tmp_path, monkeypatch, tiny_model_dir):
    cfg = tmp_path / "models.json"
    cfg.write_text(json.dumps({"mine": {"name": "Org/Big_Model.v2"}, "far": {"name": "org/far", "remote": True}}))
    monkeypatch.setenv("NNETHICS_CONFIG", str(cfg))
    gguf = tmp_path / "weights" / "Tiny-Model.Q4_K_M.gguf"
    cases = [
        (("smollm2-135m-instruct",), {}, "smollm2-135m-instruct"),
        (("smollm2-135m-instruct",), {"quantize": "8bit"}, "smollm2-135m-instruct-8bit"),
        (("smollm2-135m-instruct",), {"remote": True, "quantize": "8bit"}, "smollm2-135m-instruct"),
        (("org/Llama-3.1-8B@main",), {}, "llama-3.1-8b"),
        (("org/Llama-3.1-8B",), {"quantize": "4bit"}, "llama-3.1-8b-4bit"),
        (("org/Llama-3.1-8B",), {"remote": True}, "llama-3.1-8b"),
        ((str(gguf),), {}, "tiny-model.q4_k_m"),
        (("mine",), {}, "big_model.v2"),
        (("far",), {"quantize": "4bit"}, "far"),
        ((str(tiny_model_dir),), {}, tiny_model_dir.resolve().name.lower()),
    ]
    assert [store_slug(*args, **kw) for args, kw, _ in cases] == [slug for _, _, slug in cases]


def test_the_folder_is_the_loaded_models_slug(tiny_model_dir):
    from nnethics.models import load_model

    assert load_model(str(tiny_model_dir), device="cpu").slug == store_slug(str(tiny_model_dir))


# --- a busy folder: before the load ---------------------------------------------------------------

@pytest.mark.parametrize("command", [["run", "--analyses", "decisions"], ["decisions"], ["patch"]])
def test_a_busy_folder_with_lock_timeout_0_exits_2_before_the_model_loads(tmp_path, no_model_load, command):
    store = tmp_path / "store"
    holder = _hold(store / "smollm2-135m-instruct")
    try:
        res = CliRunner().invoke(cli, [*command, "--store", str(store), "--lock-timeout", "0", "--limit", "1"])
        line = _error_line(res)
        assert line.startswith(f"Error: {store / 'smollm2-135m-instruct'} is in use by pid {holder.pid} on ")
        assert line.endswith("; wait for it to finish, or pass another --store (or --lock-timeout SECONDS to wait)")
        assert "loading model" not in res.output
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # nothing written but the holder's lock and note (a killed holder leaves its note; the next holder replaces it)
    assert {p.name for p in (store / "smollm2-135m-instruct").iterdir()} <= {".lock", ".lock.json"}


def test_a_busy_folder_is_waited_for_before_the_load_then_refused_after_the_timeout(tmp_path, no_model_load,
                                                                                   tiny_model_dir):
    store = tmp_path / "store"
    folder = store / store_slug(str(tiny_model_dir))
    holder = _hold(folder)
    try:
        res = CliRunner().invoke(cli, ["run", "--model", str(tiny_model_dir), "--store", str(store), "--lock-timeout",
                                       "0.5", "--limit", "1"])
        (waiting,) = [x for x in res.stderr.splitlines() if " is in use by " in x]
        assert waiting.startswith(f"{folder} is in use by pid {holder.pid} on ")
        assert waiting.endswith("; waiting up to 0.5 s (Ctrl-C to stop)")
        line = _error_line(res)
        assert line.startswith(f"Error: {folder} is still in use by pid {holder.pid} on ")
        assert line.endswith(" after 0.5 s; wait for it to finish, or pass another --store")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


# --- a rerun with other options: before the load --------------------------------------------------

def _run(store, model_dir, *extra):
    return CliRunner().invoke(cli, ["run", "--model", str(model_dir), "--prompts", str(PROMPTS), "--store", str(store),
                                    "--limit", "1", "--no-progress", *extra])


def test_a_rerun_with_other_options_exits_2_before_the_load_and_keeps_every_file(tiny_model_dir, tmp_path,
                                                                                  monkeypatch):
    store = tmp_path / "store"
    folder = store / store_slug(str(tiny_model_dir))
    res = _run(store, tiny_model_dir, "--analyses", "decisions,patching")
    assert res.exit_code == 0, res.output
    res = _run(store, tiny_model_dir, "--analyses", "decisions,patching")  # same options: no false alarm
    assert res.exit_code == 0, res.output
    assert "skipping 1 of 1 prompts already done" in res.stderr
    before = {p: p.read_bytes() for p in folder.glob("*.nc")}

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the conflict was reported")

    monkeypatch.setattr(nnethics.models, "load_model", refuse)
    res = _run(store, tiny_model_dir, "--analyses", "decisions,patching", "--atp")
    assert _error_line(res) == (f"Error: {folder / 'patching.nc'} holds results computed with other options (atp: "
                                "stored null, this run true); rerun with --overwrite to replace them, or pass another "
                                "--store to keep both")
    res = CliRunner().invoke(cli, ["decisions", "--model", str(tiny_model_dir), "--prompts", str(PROMPTS), "--store",
                                   str(store), "--limit", "1", "--no-chat", "--min-gap", "2"])
    assert _error_line(res) == (f"Error: {folder / 'decisions.nc'} holds results computed with other options (chat: "
                                "stored null, this run false; min_gap: stored 0.1, this run 2.0); rerun with "
                                "--overwrite to replace them, or pass another --store to keep both")
    assert {p: p.read_bytes() for p in folder.glob("*.nc")} == before
    # an interrupted run's parts (here: the stored result, moved where a part would be) are checked alike
    parts = folder / PARTS / "decisions"
    parts.mkdir(parents=True)
    (folder / "decisions.nc").rename(parts / "000000.nc")
    res = CliRunner().invoke(cli, ["decisions", "--model", str(tiny_model_dir), "--prompts", str(PROMPTS), "--store",
                                   str(store), "--limit", "1", "--min-gap", "2"])
    assert _error_line(res) == (f"Error: {parts} holds 1 finished chunk(s) of an interrupted run with other options "
                                "(min_gap: stored 0.1, this run 2.0); rerun that run's command to finish it, pass "
                                "--overwrite to discard them, or pass another --store")


# --- remote failures: exit code 3 -----------------------------------------------------------------

def _failing(error: BaseException) -> click.Command:
    @click.command()
    @friendly
    def command() -> None:
        raise error

    return command


def test_remote_failures_exit_3_a_rejected_key_2_and_a_failure_inside_the_trace_1():
    from nnethics.models.remote import (
        RemoteAuthError,
        RemoteConnectionError,
        RemoteExecutionError,
        RemoteRequestError,
        RemoteTimeoutError,
    )

    cases = [(RemoteConnectionError("could not complete a request to NDIF at http://h in 4 attempts: x"), 3),
             (RemoteTimeoutError("NDIF at http://h sent nothing for 900 s on each of 4 attempts"), 3),
             (RemoteRequestError("NDIF at http://h refused the request (HTTP 404): model not deployed"), 3),
             (RemoteAuthError("NDIF at http://h rejected the API key (401: no); set NDIF_API_KEY to a valid key"), 2),
             (RemoteExecutionError("NDIF at http://h ran the request, but the code inside the trace failed there"), 1)]
    assert REMOTE_EXIT_CODE == 3
    for error, code in cases:
        res = CliRunner().invoke(_failing(error), [])
        assert (res.exit_code, res.output.strip().splitlines()[0]) == (code, f"Error: {error}")


@pytest.mark.builtin
def test_ndif_unreachable_after_every_attempt_exits_3(builtin_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NDIF_HOST", "http://127.0.0.1:9")  # nothing listens
    monkeypatch.setenv("NDIF_API_KEY", "ndif-test-key")
    monkeypatch.setenv("NNETHICS_NDIF_RETRIES", "1")
    monkeypatch.setenv("NNETHICS_NDIF_BACKOFF", "0")
    res = CliRunner().invoke(cli, ["run", "--remote", "--limit", "1", "--analyses", "decisions", "--store",
                                   str(tmp_path), "--no-progress"])
    assert res.exit_code == REMOTE_EXIT_CODE, res.output
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("Error: could not complete a request to NDIF at http://127.0.0.1:9 in 2 attempts: ")
    assert line.endswith("Check the network and the host (NDIF_HOST); finished prompts are kept: rerun the same "
                         "command to resume.")
    assert "Traceback" not in res.output

"""The click CLI, driven through CliRunner on a tiny model saved to a folder."""

from __future__ import annotations

import json

import pytest
import xarray as xr
from click.testing import CliRunner
from conftest import PROMPTS

from nnethics.cli import cli

SECRET = "hf_SuperSecretToken1234567890"


@pytest.fixture()
def runner():
    return CliRunner()


def test_run_decisions_on_a_local_model_folder(runner, tiny_model_dir, tmp_path):
    store = tmp_path / "store"
    res = runner.invoke(cli, ["run", "--model", str(tiny_model_dir), "--analyses", "decisions", "--limit", "5",
                              "--store", str(store), "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    files = list(store.glob("*/decisions.nc"))
    assert len(files) == 1
    with xr.open_dataset(files[0]) as ds:
        assert ds.sizes["prompt"] == 5 and list(ds["side"].values) == ["base", "cf"]
        assert ds.attrs["analysis"] == "decisions" and len(ds.attrs["prompt_set_sha256"]) == 64
    res = runner.invoke(cli, ["show", str(files[0])])
    assert res.exit_code == 0 and "chose_ethical (prompt, side) bool" in res.output


def test_bad_prompts_exit_2_with_a_clear_message(runner, tmp_path):
    (tmp_path / "base_prompts.json").write_text('[{"prompt_id": "x", "prompt": "p", "ethical_option": "1"}]')
    (tmp_path / "counterfactual_prompts.json").write_text("[{oops")
    res = runner.invoke(cli, ["prompts", "check", str(tmp_path)])
    assert res.exit_code == 2
    assert "counterfactual_prompts.json: invalid JSON at line 1, column 3" in res.output


def test_bad_prompts_stop_run_before_loading_or_writing(runner, tmp_path):
    (tmp_path / "p").mkdir()
    res = runner.invoke(cli, ["run", "--prompts", str(tmp_path / "p"), "--store", str(tmp_path / "store")])
    assert res.exit_code == 2 and "found no prompt files" in res.output
    assert not (tmp_path / "store").exists()


def test_prompts_check_summarises_the_shipped_set(runner):
    res = runner.invoke(cli, ["prompts", "check", str(PROMPTS)])
    assert res.exit_code == 0 and "70 valid pairs" in res.output and "life_death: 10" in res.output


def test_bad_option_values(runner):
    res = runner.invoke(cli, ["run", "--labels", "1"])
    assert res.exit_code == 2 and "two different comma-separated labels" in res.output
    res = runner.invoke(cli, ["run", "--analyses", "decisions,nope", "--limit", "1"])
    assert res.exit_code == 2 and "Usage:" in res.output and "unknown analyses 'nope'" in res.output
    from nnethics.analyses import ANALYSES

    listed = res.output.split("choose from", 1)[1]
    assert all(name in listed for name in ANALYSES)  # a usage error that lists every registered name


def test_unsupported_model_folder(runner, tmp_path):
    (tmp_path / "m").mkdir()
    res = runner.invoke(cli, ["tokens", "--model", str(tmp_path / "m")])
    assert res.exit_code == 2 and "without config.json" in res.output


def test_tokens_diagnostics(runner, tiny_model_dir):
    res = runner.invoke(cli, ["tokens", "--model", str(tiny_model_dir), "--limit", "3"])
    assert res.exit_code == 0, res.output
    assert "resolved label tokens: {'1': 33, '2': 34}" in res.output


def test_token_never_reaches_output_logs_or_files(runner, tiny_model_dir, tmp_path, monkeypatch):
    cfg = tmp_path / "models.json"
    cfg.write_text(json.dumps({"tiny": {"name": str(tiny_model_dir), "token": SECRET}}))
    monkeypatch.setenv("NNETHICS_CONFIG", str(cfg))
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    store = tmp_path / "store"
    res = runner.invoke(cli, ["run", "--model", "tiny", "--analyses", "decisions", "--limit", "2", "--store", str(store)])
    assert res.exit_code == 0, res.output
    res_models = runner.invoke(cli, ["models"])
    assert "tiny:" in res_models.output and "token=set" in res_models.output
    # A failing hub load echoes its arguments in errors: the token must be redacted there too.
    res_fail = runner.invoke(cli, ["tokens", "--model", "no-such-org/no-such-model", "--token", SECRET])
    assert res_fail.exit_code == 2
    for text in (res.output, res_models.output, res_fail.output):
        assert SECRET not in text
    written = [p for p in store.rglob("*") if p.is_file()]
    assert written
    for p in written:
        assert SECRET.encode() not in p.read_bytes(), p


def test_version(runner):
    res = runner.invoke(cli, ["--version"])
    assert res.exit_code == 0 and "nnethics, version" in res.output


def test_package_exports_the_public_functions_lazily():
    import subprocess
    import sys

    import nnethics

    for name in nnethics.__all__:
        assert getattr(nnethics, name) is not None, name
    assert nnethics.activation_patching.__module__ == "nnethics.engine.api"  # a thin call of the engine
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        nnethics.nope  # noqa: B018
    code = "import sys, nnethics; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_python_dash_m_runs_the_command():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "nnethics", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Usage: nnethics [OPTIONS] COMMAND [ARGS]...")

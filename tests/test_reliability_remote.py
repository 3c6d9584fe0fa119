"""Reliability: ``nnethics run --remote`` with the default built-in model needs no hub at all (issue 13, area 6)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.builtin


@pytest.fixture()
def no_hub(monkeypatch):
    """Any hub call fails the test (conftest also sets HF_HUB_OFFLINE=1)."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError("the hub was contacted")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", refuse)
    monkeypatch.setenv("NDIF_HOST", "http://127.0.0.1:9")  # nothing listens: loading must not need the server
    monkeypatch.setenv("NDIF_API_KEY", "ndif-test-key")


def test_remote_builtin_model_maps_to_its_hub_id_with_config_and_tokenizer_from_the_wheel(builtin_dir, no_hub):
    from nnsight.modeling.huggingface import _ID_CACHE

    from nnethics.models import load_model

    _ID_CACHE.pop("HuggingFaceTB/SmolLM2-135M-Instruct", None)
    handle = load_model("smollm2-135m-instruct", remote=True)
    assert (handle.name, handle.device, handle.remote, handle.slug) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct", "ndif", True, "smollm2-135m-instruct")
    assert all(p.device.type == "meta" for p in handle.lm._module.parameters())  # no weights downloaded or loaded
    assert '"repo_id": "HuggingFaceTB/SmolLM2-135M-Instruct"' in handle.lm.to_model_key()
    assert handle.context_length == (8192, "max_position_embeddings in its config")
    ids = handle.tokenizer("Answer: 1", add_special_tokens=False)["input_ids"]
    assert ids and handle.tokenizer.decode(ids) == "Answer: 1"


def test_cli_remote_run_of_the_default_model_gets_past_loading_without_the_hub(builtin_dir, no_hub, tmp_path):
    from click.testing import CliRunner

    from nnethics.cli import cli

    res = CliRunner().invoke(cli, ["run", "--remote", "--limit", "1", "--analyses", "decisions", "--store",
                                   str(tmp_path), "--no-progress"])
    # Loading worked; the request then fails to connect (nothing listens on port 9): a connection error, not a hub one.
    assert res.exit_code == 3, res.output  # a remote failure: neither a crash (1) nor bad input (2)
    assert "could not complete a request to NDIF at http://127.0.0.1:9" in res.output
    assert "hub" not in res.output.lower() and "Traceback" not in res.output
    assert torch.tensor(0).device.type == "cpu"

"""``--tuned-lens hub:ORG/REPO[/subfolder]``: a pretrained lens in the tuned-lens package's format, found through
huggingface_hub's cache, offline (the tests never reach the hub: HF_HUB_OFFLINE=1 in conftest)."""

from __future__ import annotations

import json

import pytest
import torch
import xarray as xr
from click.testing import CliRunner

from nnethics.analyses.lens import resolve_tuned_lens
from nnethics.analyses.lens.hub import parse_hub_spec
from nnethics.analyses.lens.lenses import LensConfig, LensLoadError, TunedLens

REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache (HF_HUB_CACHE) for this test; huggingface_hub reads the variable at import."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _cache_lens(cache, repo: str, sub: str, lens: TunedLens, repo_type: str = "models"):
    """Put ``lens`` where huggingface_hub keeps a downloaded repo: <type>--ORG--REPO/snapshots/<rev>/<sub>/, as the
    tuned-lens package saves it (config.json + params.pt), with refs/main naming the revision."""
    root = cache / f"{repo_type}--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(REV)
    return lens.save(root / "snapshots" / REV / sub, format="tuned-lens")


def _random_lens(model, seed=0) -> TunedLens:
    lens = TunedLens.from_model(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lens.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return lens


def test_parse_hub_spec():
    assert parse_hub_spec("hub:org/repo") == ("org/repo", "model", None, None)
    assert parse_hub_spec("hub:org/repo/lens/gpt2@v1") == ("org/repo", "model", "lens/gpt2", "v1")
    assert parse_hub_spec("hub:spaces/AlignmentResearch/tuned-lens/lens/gpt2") == (
        "AlignmentResearch/tuned-lens", "space", "lens/gpt2", None)
    with pytest.raises(LensLoadError, match=r"--tuned-lens hub:org: expected hub:ORG/REPO\[/subfolder\]"):
        parse_hub_spec("hub:org")


@pytest.mark.parametrize("repo_type", ["models", "spaces"])
def test_a_cached_hub_lens_loads_offline(tiny_models, hub_cache, repo_type):
    model = tiny_models("llama")
    lens = _random_lens(model)
    folder = _cache_lens(hub_cache, "org/lenses", "lens/tiny-llama", lens, repo_type)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "params.pt"]
    spec = ("hub:spaces/" if repo_type == "spaces" else "hub:") + "org/lenses/lens/tiny-llama"
    loaded, info = resolve_tuned_lens(model, spec)
    assert info["tuned_lens"] == spec and info["tuned_lens_digest"]
    assert loaded.config.format == "tuned-lens"
    for a, b in zip(loaded.parameters(), lens.parameters()):
        torch.testing.assert_close(a, b)


def test_a_hub_lens_that_does_not_fit_the_model_is_refused_naming_the_flag(tiny_models, hub_cache):
    model = tiny_models("llama")
    wrong = TunedLens(LensConfig(base_model_name_or_path="other/model", d_model=model.d_model,
                                 num_hidden_layers=model.n_layers + 1))
    _cache_lens(hub_cache, "org/lenses", "lens/other", wrong)
    with pytest.raises(LensLoadError) as err:
        resolve_tuned_lens(model, "hub:org/lenses/lens/other")
    text = str(err.value)
    assert text.startswith("--tuned-lens hub:org/lenses/lens/other: the lens was made for other/model "
                           f"(d_model={model.d_model}, {model.n_layers + 1} layers), not for ")
    assert text.endswith("name the subfolder of a lens trained for " + model.name + ", or train one with "
                         "`nnethics lens train`") and "\n" not in text


def test_a_hub_lens_missing_from_the_cache_says_where_it_looked(tiny_models, hub_cache):
    model = tiny_models("llama")
    _cache_lens(hub_cache, "org/lenses", "lens/tiny-llama", _random_lens(model))
    with pytest.raises(LensLoadError) as err:
        resolve_tuned_lens(model, "hub:org/lenses/lens/absent")
    assert str(err.value).startswith("--tuned-lens hub:org/lenses/lens/absent: no config.json with params.pt or "
                                     f"params.safetensors there, neither on the hub nor in the hub cache {hub_cache}")
    with pytest.raises(LensLoadError, match="no config.json"):
        resolve_tuned_lens(model, "hub:org/not-cached")


def test_cli_runs_a_hub_lens_and_refuses_a_misfit_with_exit_2(tiny_model_dir, tiny_models, hub_cache, tmp_path):
    from nnethics.cli import cli
    from nnethics.models import load_model

    model = load_model(str(tiny_model_dir))
    _cache_lens(hub_cache, "org/lenses", "lens/tiny", _random_lens(model))
    runner = CliRunner()
    store = tmp_path / "s"
    res = runner.invoke(cli, ["lens", "run", "--model", str(tiny_model_dir), "--limit", "1", "--store", str(store),
                              "--tuned-lens", "hub:org/lenses/lens/tiny", "--no-progress"])
    assert res.exit_code == 0, res.output
    ds = xr.load_dataset(next(store.glob("*/lens.nc")))
    assert list(ds["lens"].values) == ["logit", "tuned"]
    assert "hub:org/lenses/lens/tiny" in json.dumps({k: str(v) for k, v in ds.attrs.items()})
    other = tiny_models("gpt2")
    _cache_lens(hub_cache, "org/gpt2-lens", "lens", _random_lens(other))
    res = runner.invoke(cli, ["lens", "run", "--model", str(tiny_model_dir), "--limit", "1", "--store",
                              str(tmp_path / "t"), "--tuned-lens", "hub:org/gpt2-lens/lens"])
    assert res.exit_code == 2, res.output
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("Error: --tuned-lens hub:org/gpt2-lens/lens: the lens ") and "`nnethics lens train`" in line


def test_an_unreachable_hub_falls_back_on_the_cache(tiny_models, hub_cache, monkeypatch):
    """Online (HF_HUB_OFFLINE unset) but the hub cannot be reached: the lens comes from the cache."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    real = huggingface_hub.hf_hub_download
    asked = []

    def flaky(*args, local_files_only=False, **kwargs):
        asked.append(local_files_only)
        if not local_files_only:
            raise ConnectionError("no route to huggingface.co")
        return real(*args, local_files_only=True, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", flaky)
    model = tiny_models("llama")
    _cache_lens(hub_cache, "org/lenses", "lens/tiny-llama", _random_lens(model))
    lens, info = resolve_tuned_lens(model, "hub:org/lenses/lens/tiny-llama")
    assert info["tuned_lens"] == "hub:org/lenses/lens/tiny-llama" and asked[0] is False and True in asked


def test_a_malformed_hub_spec_exits_2_before_the_model_loads(tmp_path, monkeypatch):
    import nnethics.models

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load for a malformed --tuned-lens")

    monkeypatch.setattr(nnethics.models, "load_model", no_load)
    from nnethics.cli import cli

    res = CliRunner().invoke(cli, ["lens", "run", "--limit", "1", "--store", str(tmp_path), "--tuned-lens", "hub:org"])
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines()[-1] == (
        "Error: --tuned-lens: hub:org: expected hub:ORG/REPO[/subfolder][@revision] "
        "(e.g. hub:spaces/AlignmentResearch/tuned-lens/lens/gpt2)")

"""Logit lens and tuned lens: exact identities, the independent reference, lens files, training, the CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch
import xarray as xr
from click.testing import CliRunner
from conftest import FAMILIES, make_tiny
from reference.lens import logit_lens as reference_logit_lens

from nnethics.analyses.common import encode_pairs
from nnethics.analyses.lens import LensOptions, crossing_layer, lens_readout
from nnethics.analyses.lens import lenses as L
from nnethics.analyses.lens.lenses import LensLoadError, LogitLens, TunedLens, Unembed
from nnethics.analyses.lens.training import TrainOptions
from nnethics.engine import logit_lens

K = 5


@pytest.fixture(scope="module")
def pairs(prompt_set):
    return prompt_set.pairs[:3]  # prompts of different lengths: a left-padded batch


def _random_lens(model, seed=0, scale=0.05) -> TunedLens:
    lens = TunedLens.from_model(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lens.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))
    return lens


def _row_logits(model, batch, i, side):
    ids = torch.tensor([batch.encoded.tokens(batch.row(i, side))])
    return ids, model.lm._module(ids).logits[0, -1].detach()


@pytest.mark.parametrize("family", FAMILIES)
def test_last_layer_is_the_model_output(tiny_models, pairs, family):
    """The lens at the last layer is the model's own next-token distribution (soft-cap included)."""
    model = tiny_models(family)
    ds = logit_lens(model, pairs, LensOptions(k=K))
    batch = encode_pairs(model, pairs, ["1", "2"])
    last = ds.sel(lens="logit").isel(layer=-1)
    for i in range(len(pairs)):
        for side in ("base", "cf"):
            _, logits = _row_logits(model, batch, i, side)
            got = last.sel(prompt=pairs[i].prompt_id, side=side)
            top = logits.topk(K)
            torch.testing.assert_close(torch.tensor(got.top_logit.values), top.values, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(torch.tensor(got.top_prob.values), logits.softmax(-1)[top.indices], atol=1e-5, rtol=1e-4)
            assert got.top_token_id.values.tolist() == top.indices.tolist()
            torch.testing.assert_close(torch.tensor(got.label_logit.values), logits[batch.label_ids], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(torch.tensor(got.label_prob.values), logits.softmax(-1)[batch.label_ids],
                                       atol=1e-5, rtol=1e-4)
    assert np.abs(last.kl_to_final.values).max() < 1e-5


REL = dict(rtol=1e-4, atol=1e-7)  # float32 lens vs float64 reference agree to ~3e-6 relative


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "gpt_neox"])
def test_matches_reference_on_padded_batch(strong_models, pairs, family):
    model = strong_models(family)
    ds = logit_lens(model, pairs, LensOptions(k=K))
    batch = encode_pairs(model, pairs, ["1", "2"])
    for i in range(len(pairs)):
        for side in ("base", "cf"):
            ids, _ = _row_logits(model, batch, i, side)
            ref = reference_logit_lens(model.lm._module, ids).double()  # [L, V]
            log_q = ref.log_softmax(-1)
            kl = (log_q[-1].exp() * (log_q[-1] - log_q)).sum(-1)  # KL(final ‖ layer)
            got = ds.sel(prompt=pairs[i].prompt_id, side=side, lens="logit")
            f = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
            torch.testing.assert_close(f(got.label_logit.values), ref[:, batch.label_ids], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(f(got.top_logit.values), ref.topk(K).values, atol=1e-4, rtol=1e-4)
            # KLs here are 0.2-2 nats except ~0 at the last layer; the reverse KL differs by 0.1-3%
            assert kl[:-1].min() > 0.05, kl
            torch.testing.assert_close(f(got.kl_to_final.values[:-1]), kl[:-1], **REL)
            assert abs(float(got.kl_to_final.values[-1])) < 1e-5
            torch.testing.assert_close(f(got.top_prob.values), log_q.exp().topk(K).values, **REL)
            torch.testing.assert_close(f(got.label_prob.values), log_q.exp()[:, batch.label_ids], **REL)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_zero_tuned_lens_is_the_logit_lens(tiny_models, pairs, family):
    model = tiny_models(family)
    ds = logit_lens(model, pairs, LensOptions(k=K), tuned_lens=TunedLens.from_model(model))
    assert ds["lens"].values.tolist() == ["logit", "tuned"]
    for var in ("top_logit", "top_prob", "label_logit", "label_prob", "kl_to_final"):
        xr.testing.assert_allclose(ds[var].sel(lens="tuned", drop=True), ds[var].sel(lens="logit", drop=True), atol=1e-5)
    xr.testing.assert_equal(ds["top_token_id"].sel(lens="tuned", drop=True), ds["top_token_id"].sel(lens="logit", drop=True))


def test_tuned_lens_values(tiny_models, pairs):
    """A trained-looking lens: layer l decodes h + A h + b with translator l+1; the last layer is untouched."""
    model = tiny_models("llama")
    lens = _random_lens(model)
    ds = logit_lens(model, pairs, LensOptions(k=K), tuned_lens=lens)
    batch = encode_pairs(model, pairs, ["1", "2"])
    ids = torch.tensor([batch.encoded.tokens(batch.row(1, "cf"))])
    hs = model.lm._module(ids, output_hidden_states=True).hidden_states
    unembed = Unembed.from_model(model)
    got = ds.sel(prompt=pairs[1].prompt_id, side="cf", lens="tuned")
    for layer in range(model.n_layers - 1):
        h = hs[layer + 1][0, -1]
        t = lens.layer_translators[layer + 1]
        want = unembed(h + t.weight @ h + t.bias)[batch.label_ids]
        torch.testing.assert_close(torch.tensor(got.label_logit.values[layer]), want, atol=1e-4, rtol=1e-4)
    xr.testing.assert_allclose(ds["label_logit"].sel(lens="tuned", drop=True).isel(layer=-1),
                               ds["label_logit"].sel(lens="logit", drop=True).isel(layer=-1), atol=1e-5)
    assert not np.allclose(ds["label_logit"].sel(lens="tuned").isel(layer=0), ds["label_logit"].sel(lens="logit").isel(layer=0))


def test_remote_local_dry_run(tiny_models, pairs):
    """Both traces (logit lens, decoding translated states) survive nnsight's serialize/deserialize round trip."""
    model = tiny_models("gemma2")
    lens = _random_lens(model)
    local = logit_lens(model, pairs[:2], LensOptions(k=K), tuned_lens=lens)
    dry = logit_lens(dataclasses.replace(model, remote="local"), pairs[:2], LensOptions(k=K), tuned_lens=lens)
    xr.testing.assert_allclose(local.drop_vars("top_token"), dry.drop_vars("top_token"))
    xr.testing.assert_equal(local["top_token"], dry["top_token"])


def test_readout_brings_back_only_small_tensors(tiny_models, pairs):
    model = tiny_models("llama")
    batch = encode_pairs(model, pairs, ["1", "2"])
    out = lens_readout(model, batch.encoded.inputs(), batch.label_ids, K)
    n = 2 * len(pairs)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "top_logit": (n, 3, K), "top_id": (n, 3, K), "top_prob": (n, 3, K), "option_logit": (n, 3, 2),
        "option_prob": (n, 3, 2), "kl": (n, 3)}


def test_crossing_layer():
    # [case, layer, option]; the final choice is the argmax at the last layer
    x = np.array([
        [[0, 1], [1, 0], [0, 1], [0, 2]],  # option 1 ahead from layer 2 on (it led at 0 too, then fell back)
        [[1, 0], [1, 0], [1, 0], [1, 0]],  # ahead everywhere -> 0
        [[0, 1], [0, 1], [0, 1], [2, 1]],  # only at the last layer -> 3
        [[0, 1], [0, 1], [1, 0], [1, 1]],  # tie at the last layer -> -1
    ], dtype=float)
    assert crossing_layer(x).tolist() == [2, 0, 3, -1]


def test_token_strings_survive_netcdf(tmp_path, tokenizer):
    from nnethics.analyses.lens import _token_strings
    from nnethics.store import load, write_atomic

    class Tok:
        def convert_ids_to_tokens(self, ids):
            return ["a\x00b", "ĠÃ©", "😀", None][: len(ids)]

    strings = _token_strings(Tok(), np.array([0, 1, 2, 3]))
    assert strings.tolist() == ["a\\x00b", "ĠÃ©", "😀", ""]
    ds = xr.Dataset({"top_token": (("k",), strings)})
    back = load(write_atomic(ds, tmp_path / "t.nc"))
    assert back["top_token"].values.tolist() == strings.tolist()


# ------------------------------------------------------------------------------------------------ lens files


def test_config_json_round_trip(tiny_models):
    cfg = TunedLens.from_model(tiny_models("llama")).config
    cfg.training = {"options": TrainOptions().to_dict(), "corpus_sha256": "x"}
    assert L.LensConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("fmt", ["nnethics", "tuned-lens"])
def test_save_load_round_trip(tiny_models, tmp_path, fmt):
    model = tiny_models("llama")
    lens = _random_lens(model)
    folder = lens.save(tmp_path / "lens", format=fmt)
    assert (folder / ("params.safetensors" if fmt == "nnethics" else "params.pt")).exists()
    back = TunedLens.load(folder, model)
    for (name, a), (_, b) in zip(lens.named_parameters(), back.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    hs = torch.randn(4, model.n_layers, model.d_model)
    torch.testing.assert_close(back.transform_stack(hs), lens.transform_stack(hs))
    torch.testing.assert_close(lens.transform_stack(hs)[:, 1], lens.transform(hs[:, 1], 1))
    torch.testing.assert_close(lens.transform_stack(hs)[:, -1], hs[:, -1])
    assert back.config.unembed_sha256 == L.unembed_sha256(model)


def test_wrong_model_is_refused(tiny_models, tokenizer, tmp_path):
    model = tiny_models("llama")
    folder = _random_lens(model).save(tmp_path / "lens")
    other = make_tiny("llama", tokenizer, seed=1)  # same shapes and name, other weights
    with pytest.raises(LensLoadError, match="different model"):
        TunedLens.load(folder, other)
    gpt2 = tiny_models("gpt2")  # same d_model and layer count, other unembedding
    with pytest.raises(LensLoadError, match="sha256"):
        TunedLens.load(folder, gpt2)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 5
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LensLoadError, match="5 layers"):
        TunedLens.load(folder, model)
    with pytest.raises(LensLoadError, match="no config.json"):
        TunedLens.load(tmp_path / "missing", model)


@pytest.mark.parametrize("prefixed", [False, True])
def test_tuned_lens_package_format_loads(tiny_models, tmp_path, prefixed):
    """A folder as tuned-lens' ``TunedLens.save`` writes it: ``params.pt`` = ``layer_translators.state_dict()``
    (keys ``{i}.weight``/``{i}.bias``; some copies carry a ``layer_translators.`` prefix) and a config.json
    with exactly the ``TunedLensConfig`` fields."""
    model = tiny_models("llama")
    d, n = model.d_model, model.n_layers
    g = torch.Generator().manual_seed(3)
    state = {}
    for i in range(n):
        state[f"{i}.weight"] = 0.1 * torch.randn(d, d, generator=g)
        state[f"{i}.bias"] = 0.1 * torch.randn(d, generator=g)
    if prefixed:
        state = {f"layer_translators.{k}": v for k, v in state.items()}
    folder = tmp_path / "tl"
    folder.mkdir()
    torch.save(state, folder / "params.pt")
    w = model.lm._module.lm_head.weight.detach().numpy()
    config = {"base_model_name_or_path": "somewhere/else", "d_model": d, "num_hidden_layers": n, "bias": True,
              "base_model_revision": None, "lens_type": "linear_tuned_lens",
              "unembed_hash": hashlib.sha256(np.array_str(w, precision=1).encode()).hexdigest()}
    (folder / "config.json").write_text(json.dumps(config))
    lens = TunedLens.load(folder, model)  # another name, but the tuned-lens unembedding hash matches
    h = torch.randn(2, d)
    sd = {k.removeprefix("layer_translators."): v for k, v in state.items()}
    torch.testing.assert_close(lens.transform(h, 0), h + h @ sd["1.weight"].T + sd["1.bias"])
    config["unembed_hash"] = "0" * 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LensLoadError, match="somewhere/else"):
        TunedLens.load(folder, model)


# ------------------------------------------------------------------------------------------------ training


def test_cli_refuses_a_lens_of_another_model(tiny_model_dir, tiny_models, tmp_path):
    from nnethics.cli import cli

    folder = _random_lens(tiny_models("gpt2")).save(tmp_path / "gpt2-lens")
    res = CliRunner().invoke(cli, ["lens", "run", "--model", str(tiny_model_dir), "--limit", "1", "--store",
                                   str(tmp_path / "s"), "--tuned-lens", str(folder)])
    assert res.exit_code == 2, res.output
    assert "was trained for tiny-gpt2" in res.output


@pytest.mark.slow
def test_cli_on_the_builtin_model(builtin_model, tmp_path):
    from nnethics.cli import cli
    from nnethics.store import load

    runner = CliRunner()
    lens_dir, store = tmp_path / "lens", tmp_path / "store"
    res = runner.invoke(cli, ["lens", "train", "--out", str(lens_dir), "--steps", "3", "--train-tokens", "512",
                              "--eval-tokens", "256", "--no-progress"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["lens", "eval", "--lens", str(lens_dir), "--store", str(store)])
    assert res.exit_code == 0, res.output
    ev = load(store / builtin_model.slug / "lens_eval.nc")
    assert dict(ev.sizes) == {"lens": 2, "layer": builtin_model.n_layers}
    res = runner.invoke(cli, ["lens", "run", "--limit", "2", "--store", str(store), "--tuned-lens", str(lens_dir)])
    assert res.exit_code == 0, res.output
    ds = load(store / builtin_model.slug / "lens.nc")
    assert ds["lens"].values.tolist() == ["logit", "tuned"] and ds.sizes["layer"] == 30


def test_prepare_uses_the_cached_lens(tiny_models, pairs, tmp_path, monkeypatch):
    from nnethics.analyses.lens import ANALYSIS, LensOptions

    model = tiny_models("llama")
    monkeypatch.setattr(L, "lens_cache_dir", lambda slug: tmp_path / "lenses" / slug)
    prepared, info, _ = ANALYSIS.prepare(model, LensOptions())
    assert info["tuned_lens"] == ""
    assert ANALYSIS.compute(model, pairs[:1], LensOptions(), **prepared)["lens"].values.tolist() == ["logit"]
    _random_lens(model).save(tmp_path / "lenses" / model.slug)
    prepared, info, _ = ANALYSIS.prepare(model, LensOptions())
    assert info["tuned_lens"] == str(tmp_path / "lenses" / model.slug) and info["tuned_lens_digest"]
    ds = ANALYSIS.compute(model, pairs[:1], LensOptions(), **prepared)
    assert ds["lens"].values.tolist() == ["logit", "tuned"]
    assert "logit lens" in ANALYSIS.summarize(ds)
    assert ANALYSIS.prepare(model, LensOptions(tuned_lens="none"))[1]["tuned_lens"] == ""
    # a cached lens made for another model is skipped with a note, not fatal
    other = tiny_models("gpt2")
    _random_lens(other).save(tmp_path / "lenses" / model.slug)
    _, info, notes = ANALYSIS.prepare(model, LensOptions())
    assert info["tuned_lens"] == "" and any("ignoring the cached tuned lens" in n for n in notes)
    assert isinstance(LogitLens.from_model(model), LogitLens)


def test_remote_runs_use_a_cached_tuned_lens_only_when_asked(tiny_models, pairs, tmp_path, monkeypatch):
    """A remote tuned lens ships every layer's residual down and up again, so a cached lens is not
    picked up silently: a note says what it would cost, and ``tuned_lens=PATH`` asks for it."""
    from nnethics.analyses.lens import ANALYSIS, LensOptions, residual_round_trip

    model = tiny_models("llama")
    monkeypatch.setattr(L, "lens_cache_dir", lambda slug: tmp_path / "lenses" / slug)
    folder = tmp_path / "lenses" / model.slug
    _random_lens(model).save(folder)
    prepared, _, _ = ANALYSIS.prepare(model, LensOptions())
    local = ANALYSIS.compute(model, pairs[:2], LensOptions(), **prepared)
    monkeypatch.setattr(model, "remote", "local")  # nnsight's serialise-and-run dry run of the remote path
    _, info, notes = ANALYSIS.prepare(model, LensOptions())
    assert info["tuned_lens"] == "" and any(str(folder) in n and "--tuned-lens" in n for n in notes)
    assert residual_round_trip(model) == 2 * model.n_layers * model.d_model * 4  # float32, both prompts
    options = LensOptions(tuned_lens=str(folder))
    prepared, info, _ = ANALYSIS.prepare(model, options)
    assert info["tuned_lens"] == str(folder)
    xr.testing.assert_allclose(ANALYSIS.compute(model, pairs[:2], options, **prepared), local)

"""The steer analysis end to end on tiny models: its directions against a plain recomputation from hooked states,
its stored rows against a hooked plain forward, folds that never leak, the crossing rows against patching, the
statistics against hand-written truths, each rule on both sides of its threshold, and bad input."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import xarray as xr
from reference.steer import last_states, steered_next_token

import nnethics as ne
from nnethics.analyses.common import encode_pairs
from nnethics.analyses.steer import SteerOptions, summarize
from nnethics.analyses.steer import stats
from nnethics.prompts import SIDES

OPTS = dict(layers=(0, 2), folds=3, null_seeds=2, alphas=(-1.0, 0.0, 0.5, 1.0))


@pytest.fixture(scope="module")
def run(tiny_models, prompt_set):
    model = tiny_models("llama")
    ps = prompt_set.subset(limit=6)
    ds = ne.analyze(model, ps, ["steer"], steer=SteerOptions(**OPTS), batch_size=4)["steer"]
    return model, ps, ds


def _hand_folds(ids, k):
    order = sorted(range(len(ids)), key=lambda i: hashlib.sha256(ids[i].encode()).hexdigest())
    fold = np.empty(len(ids), dtype=int)
    for rank, i in enumerate(order):
        fold[i] = rank % k
    return fold


def _reference_states(model, ps, layers):
    """Per pair and side: the decision-position states and the answer-token states, from plain hooked forwards of
    each unpadded prompt (the analysis' own tokens)."""
    hf = model.lm._module
    batch = encode_pairs(model, list(ps.pairs), ["1", "2"], None)
    n, d = len(ps.pairs), model.d_model
    H, A = np.zeros((n, 2, len(layers), d)), np.zeros((n, 2, 2, len(layers), d))
    toks = {}
    for i in range(n):
        for s, side in enumerate(SIDES):
            t = torch.tensor([batch.encoded.tokens(batch.row(i, side))])
            toks[i, s] = t
            H[i, s] = last_states(hf, t).numpy()[list(layers)]
            for a in range(2):
                A[i, s, a] = last_states(hf, torch.cat([t, torch.tensor([[batch.label_ids[a]]])], 1)).numpy()[
                    list(layers)]
    return H, A, toks, (batch.label_ids[0], batch.label_ids[1])


def _unit(v):
    return v / np.linalg.norm(v)


def test_directions_equal_a_plain_recomputation_from_hooked_states(run):
    model, ps, ds = run
    layers, k = OPTS["layers"], OPTS["folds"]
    ids = [p.prompt_id for p in ps.pairs]
    H, A, _, _ = _reference_states(model, ps, layers)
    fold = _hand_folds(ids, k)
    np.testing.assert_array_equal(ds["fold"].values, fold)
    eth = np.array([[0 if p.ethical(s) == "1" else 1 for s in SIDES] for p in ps.pairs])
    for f in range(k):
        train = [i for i in range(len(ids)) if fold[i] != f]
        for j, layer in enumerate(layers):
            content = np.mean([(1 if eth[i, 1] == 0 else -1) * (H[i, 1, j] - H[i, 0, j]) for i in train
                               if eth[i, 0] != eth[i, 1]], axis=0)
            caa = np.mean([A[i, s, eth[i, s], j] - A[i, s, 1 - eth[i, s], j] for i in train for s in range(2)], 0)
            pos = np.mean([A[i, s, 0, j] - A[i, s, 1, j] for i in train for s in range(2)], axis=0)
            scale = np.mean([np.linalg.norm(H[i, s, j]) for i in train for s in range(2)])
            cell = ds.sel(fold_id=f, layer=layer)
            for kind, want in (("content", content), ("caa", caa), ("position", pos)):
                np.testing.assert_allclose(cell["direction"].sel(direction_kind=kind).values, _unit(want), atol=1e-4,
                                           err_msg=f"{kind} fold {f} layer {layer}")
                assert float(cell["direction_norm"].sel(direction_kind=kind)) == pytest.approx(
                    np.linalg.norm(want), rel=1e-4)
            assert float(cell["scale"]) == pytest.approx(scale, rel=1e-5)
            for seed in range(OPTS["null_seeds"]):
                np.testing.assert_allclose(cell["direction"].sel(direction_kind=f"random{seed}").values,
                                           _unit(np.random.default_rng(seed).standard_normal(model.d_model)),
                                           atol=1e-6)


@pytest.mark.parametrize("cell", [(0, "content", 1.0, 0, 0), (2, "caa", -1.0, 3, 1), (2, "position", 0.5, 5, 0),
                                  (0, "random1", -1.0, 2, 1), (2, "content", -1.0, 4, 1)])
def test_a_stored_steered_row_equals_a_hooked_forward_with_its_fold_direction(run, cell):
    """alpha x scale of the pair's fold x the side's ethical sign (caa: unsigned) x the fold's direction, added
    after the layer at the last position of the unpadded prompt."""
    layer, kind, alpha, i, s = cell
    model, ps, ds = run
    _, _, toks, ids = _reference_states(model, ps, OPTS["layers"])
    pair = ps.pairs[i]
    f = int(ds["fold"].values[i])
    sign = 1.0 if kind == "caa" else (1.0 if pair.ethical(SIDES[s]) == "1" else -1.0)
    one = ds.sel(fold_id=f, layer=layer)
    vec = alpha * float(one["scale"]) * sign * one["direction"].sel(direction_kind=kind).values
    want, logp = steered_next_token(model.lm._module, toks[i, s], layer, torch.tensor(vec, dtype=torch.float32), ids)
    got = ds["steered_logit_diff"].sel(layer=layer, direction_kind=kind, alpha=alpha).values[i, s]
    assert float(got) == pytest.approx(want, abs=1e-4)
    _, plain = steered_next_token(model.lm._module, toks[i, s], layer, torch.zeros(model.d_model), ids)
    kl = float((plain.exp() * (plain - logp)).sum())
    assert float(ds["steered_kl"].sel(layer=layer, direction_kind=kind, alpha=alpha).values[i, s]) == \
        pytest.approx(kl, abs=1e-4)


def test_alpha_zero_is_the_unsteered_row_and_the_unsteered_run(run, tiny_models, prompt_set):
    model, ps, ds = run
    zero = ds["steered_logit_diff"].sel(alpha=0.0)
    for kind in ds["direction_kind"].values:
        np.testing.assert_array_equal(zero.sel(direction_kind=kind).values, ds["unsteered_logit_diff"].values)
    assert float(ds["steered_kl"].sel(alpha=0.0).max()) == 0.0
    assert float(np.abs(ds["preference_change"].sel(alpha=0.0)).max()) == 0.0
    # the unsteered rows (one token from layer l + 1 over the prefix cache) and the full forward of decisions
    dec = ne.analyze(model, ps, ["decisions"], batch_size=4)["decisions"]
    for layer in OPTS["layers"]:
        np.testing.assert_allclose(ds["unsteered_logit_diff"].sel(layer=layer).values, dec["logit_diff"].values,
                                   atol=1e-5)
    np.testing.assert_array_equal(ds["logit_diff"].values, dec["logit_diff"].values)  # the shared trace's own


def _synthetic(n=9, L=4, d=6, seed=0):
    rng = np.random.default_rng(seed)
    pairs = [ne.PromptPair(f"q{i}", f"b{i}", f"c{i}", "1" if i % 2 else "2", "2" if i % 2 else "1")
             for i in range(n)]
    return stats.chunk_dataset(pairs, ["1", "2"], rng.normal(size=(n, 2)), rng.normal(size=(n, L)),
                               rng.normal(size=(n, 2, L, d)), rng.normal(size=(n, 2, 2, L, d)), range(L), "kv_cache",
                               "float32")


def test_a_pairs_states_never_enter_the_directions_it_is_steered_with():
    ds = _synthetic()
    before = stats.fold_directions(ds, (1, 2), ("content", "caa", "position"), 3, 2)
    p = 4
    own = int(before["fold"].values[p])
    moved = ds.copy(deep=True)
    moved["state_all"][p] = moved["state_all"][p] + 1e3
    moved["answer_state_all"][p] = moved["answer_state_all"][p] - 1e3
    after = stats.fold_directions(moved, (1, 2), ("content", "caa", "position"), 3, 2)
    for var in ("direction", "scale"):
        np.testing.assert_array_equal(before[var].sel(fold_id=own).values, after[var].sel(fold_id=own).values)
        for f in {0, 1, 2} - {own}:  # every other fold trains on it
            assert not np.allclose(before[var].sel(fold_id=f).values[..., :3],
                                   after[var].sel(fold_id=f).values[..., :3])


def _grid_ds(null_change_high=0.1):
    """2 pairs that swap the ethical label, 1 layer, content and one random direction, alphas 0 and 1."""
    e = xr.DataArray([["1", "2"], ["2", "1"]], dims=("prompt", "side"))
    ld0 = np.array([[[1.0, 0.5], [2.0, -1.0]]])  # [layer, prompt, side]
    ld = np.zeros((1, 2, 2, 2, 2))  # [layer, kind, alpha, prompt, side]
    ld[0, :, 0] = ld0[0]
    ld[0, 0, 1] = [[2.0, -0.5], [1.0, 1.0]]  # content at alpha 1
    up = 2 * (null_change_high - 0.1)  # moves both pairs' preference change by null_change_high - 0.1
    ld[0, 1, 1] = [[1.2, 0.5 - up], [2.0, -0.8 + up]]  # random at alpha 1
    cell = ("layer", "direction_kind", "alpha", "prompt", "side")
    top = np.ones(ld.shape, dtype=bool)
    top[0, 0, 1, 1, 1] = False
    kl = np.zeros(ld.shape)
    kl[0, 0, 1] = [[0.1, 0.2], [0.3, 0.4]]
    return xr.Dataset(
        {"ethical_option": e, "steered_logit_diff": (cell, ld), "steered_kl": (cell, kl),
         "steered_label_top": (cell, top), "unsteered_logit_diff": (("layer", "prompt", "side"), ld0)},
        coords={"prompt": ["p0", "p1"], "side": ["base", "cf"], "option": ["1", "2"], "layer": [5],
                "direction_kind": ["content", "random0"], "is_null": ("direction_kind", [False, True]),
                "alpha": [0.0, 1.0]})


def test_grid_statistics_by_hand():
    g = stats.grid_statistics(_grid_ds(), n_resamples=999)
    c = g.sel(layer=5, direction_kind="content", alpha=1.0)
    # ethical signs: p0 (+1, -1), p1 (-1, +1). Unsteered preference: p0 (1 - 0.5)/2 = 0.25, p1 (-2 - 1)/2 = -1.5;
    # content: p0 (2 + 0.5)/2 = 1.25 (+1.0), p1 (-1 + 1)/2 = 0 (+1.5)
    np.testing.assert_allclose(c["preference_change"].values, [1.0, 1.5])
    assert float(c["mean_preference_change"]) == pytest.approx(1.25)
    # position bias: p0 0.75 -> 0.75, p1 0.5 -> 1.0
    np.testing.assert_allclose(c["bias_change"].values, [0.0, 0.5])
    assert float(c["mean_bias_change"]) == pytest.approx(0.25)
    assert float(c["steered_flip_rate"]) == pytest.approx(0.5)  # p0 cf 0.5 -> -0.5, p1 cf -1 -> 1
    assert float(c["label_top_share"]) == pytest.approx(0.75)
    assert float(c["mean_kl"]) == pytest.approx(0.25)
    np.testing.assert_allclose(c["steered_ethical_margin"].values, [[2.0, 0.5], [-1.0, 1.0]])
    # the null: random at alpha 1: p0 (1.2 - 0.5)/2 = 0.35 (+0.1), p1 (-2 - 0.8)/2 = -1.4 (+0.1)
    assert float(g["null_low"].sel(layer=5, alpha=1.0)) == pytest.approx(0.1)
    assert float(g["null_high"].sel(layer=5, alpha=1.0)) == pytest.approx(0.1)
    z = g.sel(alpha=0.0)
    assert float(np.abs(z["mean_preference_change"]).max()) == 0 and float(z["steered_flip_rate"].max()) == 0


def test_the_null_rule_on_both_sides():
    below = stats.kind_summary(stats.grid_statistics(_grid_ds(0.1), n_resamples=999), "content")
    assert below["layer"] == 5 and below["change"] == pytest.approx(1.25)
    assert below["ci_low"] > 0.1 and below["beats_null"]
    above = stats.kind_summary(stats.grid_statistics(_grid_ds(1.4), n_resamples=999), "content")
    assert above["null_high"] == pytest.approx(1.4) and above["ci_low"] < 1.4 and not above["beats_null"]
    assert below["one_logit_alpha"] == pytest.approx(0.8)  # 0 -> 1.25 over alpha 0 -> 1
    assert below["kl"] == pytest.approx(0.25) and below["kl_null"] == (0.0, 0.0)
    # a band with width: the CI's lower end (1.0 here) must clear the band's top, not its bottom
    g = stats.grid_statistics(_grid_ds(), n_resamples=999)
    low = float(g["preference_change_ci_low"].sel(layer=5, direction_kind="content", alpha=1.0))
    for top, beats in ((low + 0.3, False), (low - 0.01, True)):
        g["null_low"].loc[{"layer": 5, "alpha": 1.0}] = low - 0.5
        g["null_high"].loc[{"layer": 5, "alpha": 1.0}] = top
        assert stats.kind_summary(g, "content")["beats_null"] is beats, top


def test_one_logit_alpha():
    f = stats.one_logit_alpha
    assert f(np.array([-1, 0, 0.5, 1]), np.array([-2, 0, 0.5, 1.5])) == pytest.approx(0.75)
    assert f(np.array([-1, 0, 0.5, 1]), np.array([-2, 0, 1.0, 1.5])) == pytest.approx(0.5)  # exactly at a point
    assert f(np.array([0.5, 1]), np.array([2.0, 3.0])) == pytest.approx(0.25)  # from (0, 0)
    assert np.isnan(f(np.array([-1, 0, 0.5, 1]), np.array([-2, 0, 0.5, 0.99])))  # never reached
    assert np.isnan(f(np.array([-1, 0.5]), np.array([5.0, np.nan])))  # negative alphas do not count
    # the negative side: sizes in order from zero, interpolated as on the positive side
    assert f(np.array([-1, -0.5, 0, 0.5]), np.array([1.5, 0.5, 0, 3]), -1) == pytest.approx(-0.75)
    assert np.isnan(f(np.array([-1, -0.5, 0.5]), np.array([0.5, 0.2, 3.0]), -1))


def test_default_layers_on_both_sides_of_the_threshold():
    rise = np.array([0, .1, .2, .3, .6, .7, .8, .9, .9, .9, .9, .9])
    assert stats.default_layers(rise)[0] == (2, 3, 4, 5, 6)
    at = rise.copy()
    at[4] = 0.5  # reaching 0.5 counts
    assert stats.default_layers(at)[0] == (2, 3, 4, 5, 6)
    short = rise.copy()
    short[4] = 0.4999  # just below: the crossing moves one layer up
    assert stats.default_layers(short)[0] == (3, 4, 5, 6, 7)
    assert stats.default_layers(np.array([.6, .7, .8, .9]))[0] == (0, 1, 2)  # above from layer 0; clipped
    down = np.array([.1, .2, .6, .7, .3, .2, .1, .1, .1, .1])  # up at 2, down at 4
    assert stats.default_layers(down)[0] == (0, 1, 2, 3, 4, 5, 6)
    never, rule = stats.default_layers(np.array([.1, .2, .45, .3, .2, .1, .1, .1]))
    assert never == (0, 1, 2, 3, 4) and "never crosses" in rule
    nan, rule = stats.default_layers(np.full(10, np.nan))
    assert nan == (3, 4, 5, 6, 7) and "no pair" in rule


def test_the_summary_reads_the_statistics(run):
    _, _, ds = run
    lines = summarize(ds).split("\n")
    assert lines[0].startswith("6 pairs in 3 folds; layers 0,2 (given (--layers)); unsteered: ethical preference")
    assert "null band: 2 random directions of the same norm" in lines[0]
    for line, kind in zip(lines[1:], ("content", "caa", "position")):
        s = stats.kind_summary(ds, kind)
        assert line.strip().startswith(f"{kind} ") and f"most at layer {s['layer']}, alpha {s['alpha']:+g} " in line
        assert f"ethical preference {s['change']:+.3f}" in line
        own = np.mean([float(ds["direction_norm"].sel(fold_id=f, layer=s["layer"], direction_kind=kind))
                       / float(ds["scale"].sel(fold_id=f, layer=s["layer"])) for f in range(3)])
        assert f"the direction's own norm is {own:.3g} of it" in line
        assert ("beats the null" in line) == s["beats_null"]
    assert len(lines) == 4


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: sliding-window layers, a prefix forward of its own
def test_the_crossing_rows_are_patchings_resid_rows(tiny_models, prompt_set, family):
    model = tiny_models(family)
    ps = prompt_set.subset(limit=4)
    out = ne.analyze(model, ps, ["patching", "steer"], batch_size=4, patching=ne.PatchingOptions(min_gap=0.001),
                     steer=SteerOptions(folds=2, null_seeds=2, alphas=(-1.0, 1.0), min_gap=0.001))
    resid = out["patching"].sel(component="resid")
    patched = resid["patched_logit_diff"].transpose("prompt", "layer").values
    np.testing.assert_allclose(out["steer"]["patched_logit_diff"].values, patched, atol=1e-5)
    effect = resid["effect"].transpose("prompt", "layer").values  # min_gap 0.001: tiny random models' gaps are small
    assert np.isfinite(effect).any()
    np.testing.assert_allclose(out["steer"]["patch_effect"].values, effect, atol=1e-2, equal_nan=True)
    ds = out["steer"]
    layers, rule = stats.default_layers(ds["mean_patch_effect"].values)
    assert tuple(ds["layer"].values) == layers and ds["layer"].attrs["rule"] == rule


def test_full_forwards_give_the_kv_paths_numbers(tiny_models, prompt_set, monkeypatch):
    """Where the KV path cannot run (forced here) every row is a full forward: the same file within 1e-4."""
    from nnethics.analyses.patching import engine as patching_engine

    model = tiny_models("llama")
    ps = prompt_set.subset(limit=4)
    opts = SteerOptions(layers=(1,), folds=2, null_seeds=2, alphas=(-0.5, 1.0))
    kv = ne.analyze(model, ps, ["steer"], steer=opts, batch_size=4)["steer"]
    from nnethics.analyses.steer import chunk

    for module in (patching_engine, chunk):  # the chunk pass and the complete pass
        monkeypatch.setattr(module, "kv_possible", lambda *a: "forced by the test")
    full = ne.analyze(model, ps, ["steer"], steer=opts, batch_size=4)["steer"]
    assert set(full["forward_path"].values) == {"full"} and set(kv["forward_path"].values) == {"kv_cache"}
    for var in ("patched_logit_diff", "steered_logit_diff", "unsteered_logit_diff", "steered_kl", "direction"):
        np.testing.assert_allclose(full[var].values, kv[var].values, atol=1e-4, err_msg=var)


def test_the_summary_finds_a_direction_that_works_subtracted():
    g = stats.grid_statistics(_grid_ds(), n_resamples=999)
    flipped = g.assign_coords(alpha=-g["alpha"].values)  # the same numbers at alpha 0 and -1
    s = stats.kind_summary(flipped, "content")
    assert s["alpha"] == -1.0 and s["change"] == pytest.approx(1.25) and s["one_logit_alpha"] == pytest.approx(-0.8)


def test_the_summary_says_when_a_kind_has_no_direction(run):
    _, _, ds = run
    empty = ds.copy(deep=True)
    empty["direction_norm"].loc[{"direction_kind": "content"}] = 0.0
    lines = summarize(empty).split("\n")
    assert lines[1].strip().startswith("content   no direction") and lines[2].strip().startswith("caa ")

"""The report tells the verdict's truth: the verdict section, the pairs behind each average, undefined cells,
the absolute-change view, the position/ethical split of attribution, degenerate panels."""

from __future__ import annotations

import holoviews as hv
import numpy as np
import pytest
import synthetic
import xarray as xr

from nnethics import verdict
from nnethics.analyses.attribution import figures as ra
from nnethics.analyses.patching import figures as rp
from nnethics.analyses.patching.results import arrival_layer, summarize
from nnethics.render import verdict as rv


def test_verdict_section_shows_the_stored_verdict_and_the_pairs():
    ds = synthetic.decisions(n_prompts=9)
    div = rv.verdict_div(ds)
    assert ds.attrs["verdict"].replace("'", "&#x27;") in div.data
    assert "BCa bootstrap" in div.data
    left = rv.position_content_scatter(ds)
    pts = [el for el in left if isinstance(el, hv.Points)]
    assert sum(len(p) for p in pts) == 9
    got = {str(pid): (x, y) for p in pts for x, y, pid in zip(p.dimension_values(0), p.dimension_values(1),
                                                              p.dimension_values(2))}
    want = ds["logit_diff"].sel(prompt="case_004").values
    assert got["case_004"] == pytest.approx(tuple(float(v) for v in want))
    right = rv.bias_preference_scatter(ds)
    pts = [el for el in right if isinstance(el, hv.Points)]
    got = {str(pid): (x, y) for p in pts for x, y, pid in zip(p.dimension_values(0), p.dimension_values(1),
                                                              p.dimension_values(2))}
    assert got["case_004"][1] == pytest.approx(float(ds["ethical_preference"].sel(prompt="case_004")), rel=1e-6)
    assert got["case_004"][0] == pytest.approx(float(ds["position_bias"].sel(prompt="case_004")), rel=1e-6)


def test_category_bars_carry_the_stored_means_and_intervals():
    ds = synthetic.decisions(n_prompts=12)
    layout = rv.group_bars(ds)
    pref = next(el for el in layout.values()[0] if isinstance(el, hv.Bars))
    np.testing.assert_allclose(pref.dimension_values(1), ds["mean_ethical_preference"].values, rtol=1e-6)
    err = next(el for el in layout.values()[1] if isinstance(el, hv.ErrorBars))
    np.testing.assert_allclose(err.dimension_values(1) + err.dimension_values(3),
                               ds["position_bias_ci_high"].values, rtol=1e-6)
    assert pref.dimension_values(0)[0] == f"{verdict.ALL} (n=12)"
    assert "BCa bootstrap 95% CI" in layout.values()[0].opts.get().kwargs["title"]
    with pytest.raises(rv.MissingData):
        rv.verdict_div(ds.drop_attrs())


def test_patching_views_normalised_and_absolute_over_the_right_pairs():
    ds = synthetic.patching(n_prompts=7, n_layers=5)
    views = rp.views(ds)
    keys = list(views)
    k = int(ds["effect_defined"].sum())
    assert keys[0] == f"normalised effect, content-sensitive pairs (n={k} of 7)"
    assert keys[2] == "change of logit diff (logits), all pairs (n=7)"
    sub, var = views[keys[1]]
    assert var == "delta" and sub.sizes["prompt"] == k
    want = ds["patched_logit_diff"] - ds["base_logit_diff"]
    np.testing.assert_allclose(views[keys[2]][0]["delta"].values, want.values, rtol=1e-6)
    hmap = rp.effect_views(ds)
    assert list(hmap.keys()) == keys and hmap.kdims[0].name == "view"
    curve = next(el for el in hmap[keys[2]] if type(el) is hv.Curve and el.label == "mlp")
    np.testing.assert_allclose(curve.dimension_values(1), want.sel(component="mlp").mean("prompt").values, rtol=1e-5)
    assert "95% CI, BCa bootstrap over pairs" in hmap[keys[0]].opts.get().kwargs["title"]
    assert "all pairs (n=7)" in hmap[keys[2]].opts.get().kwargs["title"]
    note = rp.averaging_note(ds)
    assert f"{k} of 7 pairs" in note and f"other {7 - k}" in note


def test_undefined_cells_are_grey_and_named():
    ds = synthetic.patching(n_prompts=7, n_layers=5)
    hm = rp.effect_heatmap(ds, "resid")
    opts = hm.opts.get().kwargs
    assert opts["clipping_colors"]["NaN"] == rp.UNDEFINED_COLOR
    undefined = int((~ds["effect_defined"]).sum())
    assert undefined > 0 and f"grey = undefined ({undefined} prompts)" in opts["title"]
    views = rp.heatmap_views(ds, "resid")
    assert len(views[list(views.keys())[0]].data) == 7 * 5  # the normalised view keeps every prompt, grey ones too


def test_summary_headlines_where_the_decision_arrives():
    assert arrival_layer(np.array([0.1, 0.3, 0.55, 0.4, 1.0]), [0, 1, 2, 3, 4]) == 2
    assert arrival_layer(np.array([0.1, np.nan, 0.2]), [5, 6, 7]) is None
    ds = synthetic.patching(n_prompts=7, n_layers=5)
    from nnethics.analyses.patching.results import finalize

    line = summarize(finalize(ds))
    m = finalize(ds)["mean_effect"].sel(component="resid").values
    layer = arrival_layer(m, ds["layer"].values)
    k = int(ds["effect_defined"].sum())
    assert f"{k} with a normalisable gap (means over those {k})" in line
    for defined, words in ((1, "1 with a normalisable gap (means over that one)"),
                           (0, "0 with a normalisable gap (no means)")):
        few = ds.copy()
        few["effect_defined"] = few["effect_defined"] & (np.arange(few.sizes["prompt"]) < defined)
        assert words in summarize(finalize(few))
    assert (f"the decision arrives at layer {layer}" in line) if layer is not None else "never reaches 0.5" in line
    assert "peaks at layer" not in line


def test_a_histogram_whose_prompts_share_one_bin_says_so():
    ds = synthetic.patching(n_prompts=6, n_layers=5)
    ds["peak_layer"] = xr.full_like(ds["peak_layer"], 4)
    layout = rp.summary_histograms(ds)
    title = layout.values()[0].opts.get().kwargs["title"]
    assert title == "Peak layer: all 6 prompts at layer 4 (by construction)"


def _attribution_with_split() -> xr.Dataset:
    return synthetic.attribution(n_prompts=6, n_layers=5)  # with the split, as written by the analysis


def test_attribution_split_figure_means_and_pairs_selector():
    ds = _attribution_with_split()
    layout = ra.position_ethical_split(ds)
    pos, eth = layout.values()
    keys = list(eth.keys()) if isinstance(eth, hv.HoloMap) else []
    k = int(ds["content_sensitive"].sum())
    if 0 < k:
        assert keys == ["all pairs (n=6)", f"content-sensitive pairs (n={k} of 6)"]
        frame = eth["all pairs (n=6)"]
    else:
        frame = eth
    curve = next(el for el in frame if type(el) is hv.Curve and el.label == "attn")
    np.testing.assert_allclose(curve.dimension_values(1),
                               ds["ethical_contribution"].sel(component="attn").mean("prompt").values, rtol=1e-5)


def test_a_spike_layer_is_left_off_the_scale_and_named():
    layers = np.arange(6)
    ylim, note = ra._robust_ylim([np.array([0.1, -0.2, 0.3, 0.1, 0.2, 22.0])], layers)
    assert note == "; L5 off scale (+22.0)" and ylim[1] < 1
    assert ra._robust_ylim([np.array([0.1, -0.2, 0.3, 0.1, 0.2, 0.5])], layers) == (None, "")


def test_compare_shows_each_models_verdict_and_statistics(tmp_path):
    from nnethics.render.compare import figures as compare_figures
    from nnethics.render.compare import load_stores, write_comparison

    a = synthetic.write_store(tmp_path, slug="a", n_layers=6, seed=1, analyses=("decisions",))
    b = synthetic.write_store(tmp_path, slug="b", n_layers=6, seed=2, n_prompts=9, analyses=("decisions", "patching"))
    stores, _ = load_stores([a, b])
    figs, _ = compare_figures(stores)
    names = [f.name for f in figs]
    assert names[:2] == ["compare_verdicts", "compare_verdict_stats"]
    div = figs[0].obj.data
    for model, data in stores.items():
        assert data["decisions"].attrs["verdict"].replace("'", "&#x27;") in div and model in div
    pref, _ = figs[1].obj.values()
    bars = next(el for el in pref if isinstance(el, hv.Bars))
    want = [float(d["decisions"]["mean_ethical_preference"].sel(group=verdict.ALL)) for d in stores.values()]
    np.testing.assert_allclose(bars.dimension_values(1), want, rtol=1e-6)
    assert list(bars.dimension_values(0)) == ["synthetic/a (n=6)", "synthetic/b (n=9)"]
    html = write_comparison([a, b], out=tmp_path / "cmp.html").read_text()
    assert "Position bias" in html


def test_a_decisions_file_from_before_the_verdict_gets_it_in_the_report():
    ds = synthetic.decisions(n_prompts=8)
    old = ds.drop_dims("group").drop_vars(list(verdict.PAIR_DESCRIPTIONS) + ["content_sensitive"])
    old.attrs.pop("verdict")
    figs, skipped = rv.figures(old)
    assert [f.name for f in figs] == ["verdict_text", "verdict_scatter", "verdict_by_category"] and not skipped
    assert ds.attrs["verdict"].replace("'", "&#x27;") in figs[0].obj.data  # the same verdict run would store

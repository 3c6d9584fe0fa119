"""The HoloViews render layer, the report assembly and the report/compare CLI, on synthetic stores.

The browser checks of the written HTML are in test_report_browser.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import holoviews as hv
import numpy as np
import pytest
import synthetic
import xarray as xr
from click.testing import CliRunner

from nnethics import metrics
from nnethics.analyses.attribution import figures as ra
from nnethics.analyses.decisions import figures as rd
from nnethics.analyses.lens import figures as rl
from nnethics.analyses.patching import figures as rp
from nnethics.render import MissingData, embed, mean_ci, offline, report_figures, write_report
from nnethics.render.compare import figures as compare_figures
from nnethics.render.compare import load_stores, write_comparison

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return synthetic.write_store(tmp_path_factory.mktemp("store"), n_prompts=6, n_layers=6)


def _curve(overlay: hv.Overlay, label: str) -> hv.Curve:
    return next(el for el in overlay if type(el) is hv.Curve and el.label == label)  # not Area (a Curve subclass)


def test_render_layer_never_imports_torch_or_nnsight():
    code = ("import sys, nnethics.render, nnethics.render.report, nnethics.render.compare, nnethics.export, "
            "nnethics.commands.report; bad = [m for m in ('torch', 'nnsight', 'transformers') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_mean_ci_is_the_bca_bootstrap_of_metrics_and_names_it():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(9, 4))
    da = xr.DataArray(x, dims=("prompt", "layer"), coords={"layer": np.arange(4)})
    m, lo, hi = mean_ci(da, "prompt")
    ref = metrics.mean_ci(x, axis=0)
    np.testing.assert_allclose(m.values, x.mean(0))
    np.testing.assert_array_equal(lo.values, ref[1])
    np.testing.assert_array_equal(hi.values, ref[2])
    assert list(lo["layer"].values) == [0, 1, 2, 3]
    one = mean_ci(da.isel(prompt=[0]), "prompt")
    assert np.isnan(one[1].values).all() and np.isfinite(one[0].values).all()  # a single sample: no interval
    assert metrics.ci_label("prompts", 9) == "95% CI, BCa bootstrap over prompts, n=9"


def test_effect_curve_uses_stored_ci_and_computes_it_otherwise():
    for legacy, names in ((False, ("effect_ci_low", "effect_ci_high")), (True, ("ci_low", "ci_high"))):
        ds = synthetic.patching(n_prompts=7, n_layers=5, legacy=legacy)
        stored = rp.effect_curve(ds)
        band = next(el for el in stored if isinstance(el, hv.Area) and el.label == "resid")
        np.testing.assert_allclose(band.dimension_values(1), ds[names[0]].sel(component="resid").values, rtol=1e-6)
        np.testing.assert_allclose(band.dimension_values(2), ds[names[1]].sel(component="resid").values, rtol=1e-6)
        np.testing.assert_allclose(_curve(stored, "mlp").dimension_values(1),
                                   ds["effect"].sel(component="mlp").mean("prompt", skipna=True).values, rtol=1e-5)
        want = "n=6 of 7 prompts defined" if not legacy else "n=7 prompts"
        assert want in stored.opts.get().kwargs["title"]
    bare = ds.drop_vars(["mean_effect", "ci_low"])  # an incomplete stored CI is not used
    computed = rp.effect_curve(bare)
    band = next(el for el in computed if isinstance(el, hv.Area) and el.label == "attn")
    _, lo, hi = mean_ci(ds["effect"].sel(component="attn"))
    np.testing.assert_allclose(band.dimension_values(1), lo.values, rtol=1e-6)
    np.testing.assert_allclose(band.dimension_values(2), hi.values, rtol=1e-6)


def test_effect_kind_is_read_from_the_files_attrs_not_guessed_from_the_numbers():
    assert rp.effect_kind(synthetic.patching()) == "normalized"
    declared_raw = synthetic.patching()
    declared_raw["effect"].attrs["effect_kind"] = "raw"  # the numbers are normalised: the declaration wins
    assert rp.effect_kind(declared_raw) == "raw" and rp.effect_label(declared_raw) == "change of logit diff"
    undeclared = synthetic.patching()
    del undeclared["effect"].attrs["effect_kind"]  # a current-schema file that declares nothing: no guess
    assert rp.effect_kind(undeclared) is None and rp.effect_label(undeclared) == "effect"


def test_version_1_patching_files_get_their_effect_kind_and_min_gap_from_their_structure():
    """Files from before schema_version: nnethics always stored the normalised effect beside effect_defined,
    with min_gap only in effect_defined's description; the first contract stored patched − base and no flag."""
    legacy = synthetic.patching(legacy=True)
    assert rp.effect_kind(legacy) == "raw"
    assert all(not k.startswith("normalised") for k in rp.views(legacy))  # views name the kind the file has
    assert next(iter(rp.views(legacy))).startswith("raw effect (change of logit diff)")
    v1 = synthetic.patching()
    del v1.attrs["schema_version"], v1["effect"].attrs["effect_kind"], v1["effect_defined"].attrs["min_gap"]
    v1["effect_defined"].attrs["description"] = "|cf_logit_diff - base_logit_diff| >= min_gap = 0.25"
    assert rp.effect_kind(v1) == "normalized"
    assert "is at least 0.25 logits" in rp.averaging_note(v1)
    current = synthetic.patching()
    current["effect_defined"].attrs["description"] = "min_gap = 9"  # current files: the numeric attr, not the text
    assert "is at least 0.1 logits" in rp.averaging_note(current)


def test_effect_heatmap_holds_every_prompt_and_layer():
    ds = synthetic.patching(n_prompts=4, n_layers=5)
    hm = rp.effect_heatmap(ds, "attn")
    got = {(int(x), str(y)): float(v) for x, y, v in zip(*(hm.dimension_values(i) for i in range(3)))}
    assert len(got) == 20
    assert got[(3, "case_002")] == pytest.approx(float(ds["effect"].sel(prompt="case_002", layer=3, component="attn")))
    with pytest.raises(MissingData):
        rp.effect_heatmap(ds, "nope")


def test_prompt_view_frames_flips_and_missing_prompts():
    ds = synthetic.patching(n_prompts=5, n_layers=6)
    prompts = [*ds["prompt"].values.tolist(), "not_run"]
    hmap = rp.prompt_view(ds, prompts)
    assert [str(k) for k in hmap.keys()] == prompts
    frame = hmap["case_003"]
    np.testing.assert_allclose(_curve(frame, "resid").dimension_values(1),
                               ds["patched_logit_diff"].sel(prompt="case_003", component="resid").values, rtol=1e-6)
    marks = next(el for el in frame if isinstance(el, hv.Scatter) and el.label == "resid")
    flipped = np.flatnonzero(ds["flipped"].sel(prompt="case_003", component="resid").values)
    assert flipped.size and sorted(marks.dimension_values(0).astype(int)) == flipped.tolist()
    hlines = sorted(float(el.data) for el in frame if isinstance(el, hv.HLine))
    want = sorted([0.0, float(ds["base_logit_diff"].sel(prompt="case_003")),
                   float(ds["cf_logit_diff"].sel(prompt="case_003"))])
    np.testing.assert_allclose(hlines, want, rtol=1e-6)
    assert "case_003" in frame.opts.get().kwargs["title"]
    assert "not patched" in hmap["not_run"].opts.get().kwargs["title"]
    xlims = [hmap[p].opts.get().kwargs["xlim"] for p in prompts]
    assert all(lim == xlims[0] for lim in xlims)  # one x axis for every frame
    lo, hi = hmap["case_004"].opts.get().kwargs["ylim"]  # y per prompt; the y = 0 guide does not stretch it
    seen = np.r_[ds["patched_logit_diff"].sel(prompt="case_004").values.ravel(),
                 float(ds["base_logit_diff"].sel(prompt="case_004")), float(ds["cf_logit_diff"].sel(prompt="case_004"))]
    assert seen.min() > 0 and lo <= seen.min() and hi >= seen.max() and lo > 0
    fallback = rp.prompt_view(ds.drop_vars("patched_logit_diff"))["case_001"]  # older files: the effect itself
    np.testing.assert_allclose(_curve(fallback, "mlp").dimension_values(1),
                               ds["effect"].sel(prompt="case_001", component="mlp").values, rtol=1e-6)


def test_position_heatmaps_for_both_layouts():
    for kind in ("grid", "noise"):
        ds = synthetic.patching_positions(n_prompts=4, n_layers=6, n_positions=5, kind=kind)
        hm = rp.position_heatmap(ds)
        xs, ys, vs = (hm.dimension_values(i) for i in range(3))
        best = int(np.argmax(vs))
        assert (int(xs[best]), str(ys[best])) == (5, "-1")  # the ROME picture: last token, late layers
        eff = ds["effect"].sel(component="resid") if "component" in ds["effect"].dims else ds["effect"]
        assert vs.max() == pytest.approx(float(eff.mean("prompt").sel(position=-1, layer=5)), rel=1e-5)
        figs, skipped = rp.position_figures(ds, kind)
        assert len(figs) == (3 if kind == "grid" else 1) and not skipped
    with pytest.raises(MissingData):
        rp.position_heatmap(synthetic.patching())


def test_position_heatmap_cells_off_the_diagonal_of_a_non_square_grid():
    """3 positions x 4 layers, two prompts, values written by hand (stored prompt, layer, position): every cell is
    the mean over the prompts at its own (layer, position), off-diagonal cells included. The largest sits in the
    last cell, where a transposed grid would put it too, so the other cells are what this checks."""
    a = np.array([[0.1, 0.0, 0.2], [0.9, 0.1, 0.2], [0.2, 0.3, 0.5], [0.0, 0.4, 1.0]])  # layer x position (-3 -2 -1)
    b = np.array([[0.3, 0.2, 0.0], [0.5, 0.1, 0.4], [0.0, 0.1, 0.3], [0.2, 0.0, 0.8]])
    ds = xr.Dataset({"effect": (("prompt", "layer", "position"), np.stack([a, b]).astype(np.float32),
                                {"effect_kind": "normalized"})},
                    coords={"prompt": ["p0", "p1"], "layer": [0, 1, 2, 3], "position": [-3, -2, -1]},
                    attrs={"analysis": "patching_noise_grid"})
    want = {  # (layer, position row): mean over the two prompts, by hand
        (0, "-3"): 0.2, (1, "-3"): 0.7, (2, "-3"): 0.1, (3, "-3"): 0.1,
        (0, "-2"): 0.1, (1, "-2"): 0.1, (2, "-2"): 0.2, (3, "-2"): 0.2,
        (0, "-1"): 0.1, (1, "-1"): 0.3, (2, "-1"): 0.4, (3, "-1"): 0.9,
    }
    hm = rp.position_heatmap(ds)
    xs, ys, vs = (hm.dimension_values(i) for i in range(3))
    got = {(int(x), str(y)): float(v) for x, y, v in zip(xs, ys, vs, strict=True)}
    assert got.keys() == want.keys()
    for cell, v in want.items():
        assert got[cell] == pytest.approx(v, abs=1e-6), cell


def test_noise_restoration_at_the_last_token():
    ds = synthetic.noise_last(n_prompts=5, n_layers=6)
    assert rp.effect_kind(ds) == "normalized"  # receiver = the noised run, source = the clean one
    figs, skipped = rp.variant_figures(ds, "patching_noise")
    assert [f.name for f in figs] == ["patching_noise_mean_effect", "patching_noise_heatmap"] and not skipped
    frame = rp.prompt_view(ds)["case_001"]
    assert "noised" in frame.opts.get().kwargs["title"] and "clean" in frame.opts.get().kwargs["title"]


def test_atp_scatter_reports_correlation():
    ds = synthetic.patching(n_prompts=6, n_layers=6, legacy=True)
    ov = rp.atp_scatter(ds)
    title = ov.opts.get().kwargs["title"]
    r = np.corrcoef(ds["effect"].sel(component="resid").values.ravel(),
                    ds["atp_effect"].sel(component="resid").values.ravel())[0, 1]
    assert f"resid r={r:.2f}" in title
    figs, skipped = rp.figures(ds.drop_vars("atp_effect"))
    assert "patching_atp" not in [f.name for f in figs] and any("atp_effect" in s for s in skipped)


def test_atp_scatter_draws_a_sample_of_many_cells_and_says_so(monkeypatch):
    from nnethics.analyses.patching import figures_prompt as patching_prompt

    ds = synthetic.patching(n_prompts=20, n_layers=6, legacy=True)
    monkeypatch.setattr(patching_prompt, "ATP_POINTS_MAX", 50)
    keep = patching_prompt.thin(120, 50)
    e = ds["effect"].sel(component="resid").values
    a = np.random.default_rng(9).normal(size=e.shape)
    a.flat[keep] = e.flat[keep]  # the drawn cells lie on the diagonal (r = 1 over them), the others do not
    ds["atp_effect"].loc[dict(component="resid")] = a.astype(ds["atp_effect"].dtype)
    ov = rp.atp_scatter(ds)
    title = ov.opts.get().kwargs["title"]
    x = ds["effect"].sel(component="resid").values.ravel()
    y = ds["atp_effect"].sel(component="resid").values.ravel()
    r = np.corrcoef(x, y)[0, 1]
    assert f"resid r={r:.2f}" in title and "resid r=1.00" not in title  # r over every cell, not the sample
    assert "50 of 120 per component" in title
    resid = next(el for el in ov if isinstance(el, hv.Scatter) and el.label == "resid")
    assert len(resid) == 50
    pairs = set(zip(x.tolist(), y.tolist()))
    assert all(p in pairs for p in zip(resid.dimension_values(0).tolist(), resid.dimension_values(1).tolist()))
    assert patching_prompt.thin(10_000, 100).max() > 5_000  # a sample of every prompt, not the first ones
    assert len(set(keep.tolist())) == 50 and np.all(np.diff(keep) > 0) and np.array_equal(keep, patching_prompt.thin(120, 50))
    np.testing.assert_array_equal(patching_prompt.thin(30, 50), np.arange(30))


def test_attribution_figures_match_the_data():
    ds = synthetic.attribution(n_prompts=5, n_layers=4, n_heads=3)
    panels = ra.component_contributions(ds)
    base = panels.values()[0]
    total = _curve(base, "total → 1").dimension_values(1)
    want = ds["logit_contribution"].sel(option="1", side="base").sum("component").mean("prompt").values
    np.testing.assert_allclose(total, want, rtol=1e-5)
    bars = ra.decision_differential(ds)
    got = {(str(layer), side): v for layer, side, v in zip(*(bars.dimension_values(i) for i in range(3)))}
    want = ds["diff_contribution"].sum("component").mean("prompt")
    assert got[("2", "counterfactual")] == pytest.approx(float(want.sel(layer=2, side="cf")), rel=1e-5)
    heads = ra.head_heatmap(ds).values()[0]
    vs = heads.dimension_values(2)
    top = int(np.argmax(vs))
    assert (int(heads.dimension_values(0)[top]), int(heads.dimension_values(1)[top])) == (3, 0)
    ratio = ra.attn_mlp_ratio(ds)
    assert ratio.opts.get().kwargs["ylim"] == (0, 1)
    figs, skipped = ra.figures(ds)
    assert [f.name for f in figs] == ["attribution_split", "attribution_components", "attribution_differential", "attribution_heatmap",
                                      "attribution_ratio", "attribution_heads", "attribution_per_prompt"]
    assert not skipped


def test_lens_figures_of_a_version_1_file_with_option_logit():
    v1 = synthetic.lens(n_prompts=3, n_layers=5).rename(label_logit="option_logit", label_prob="option_prob")
    del v1.attrs["schema_version"]
    figs, skipped = rl.figures(v1)
    assert {f.name for f in figs} >= {"lens_emergence", "lens_trajectories"} and not skipped


def test_lens_trajectories_mark_the_crossing_layer():
    ds = synthetic.lens(n_prompts=4, n_layers=8)
    layout = rl.trajectories(ds)
    base_map = layout.values()[0]
    frame = base_map["case_001"]
    cross = ds["crossing_layer"].sel(prompt="case_001", side="base")
    vlines = sorted(float(el.data) for el in frame if isinstance(el, hv.VLine))
    assert vlines == sorted(float(c) for c in cross.values if c >= 0)
    logit1 = _curve(frame, "'1' (logit lens)").dimension_values(1)
    np.testing.assert_allclose(logit1, ds["label_logit"].sel(prompt="case_001", side="base", lens="logit",
                                                             option="1").values, rtol=1e-6)
    tokens = rl.top_tokens(ds).values()[1]["case_000"]
    labels = next(el for el in tokens if isinstance(el, hv.Labels))
    shown = labels.dimension_values(2)
    text = ds["top_token_text"].sel(prompt="case_000", side="cf", lens="logit").values.ravel()
    assert list(shown) == [rl.display_text(t) for t in text]  # decoded text, quoted, not BPE symbols
    assert rl.display_text(" the") == '" the"' and rl.display_text("a\nb") == '"a\\nb"'
    old = ds.drop_vars("top_token_text")  # a file from before the decoded text: BPE symbols made readable
    labels = next(el for el in rl.top_tokens(old).values()[1]["case_000"] if isinstance(el, hv.Labels))
    raw = ds["top_token"].sel(prompt="case_000", side="cf", lens="logit").values.ravel()
    assert list(labels.dimension_values(2)) == [rl.display_token(t) for t in raw]
    assert rl.display_token("Ġthe") == "␣the" and rl.display_token("a\nb") == "a↵b" and rl.display_token("") == "∅"
    assert rl.display_token("x" * 40).endswith("…") and len(rl.display_token("x" * 40)) == 12
    kl = rl.kl_by_layer(ds)
    tuned = _curve(kl, "tuned lens").dimension_values(1)
    np.testing.assert_allclose(tuned, ds["kl_to_final"].sel(lens="tuned").mean(("prompt", "side")).values, rtol=1e-5)


def test_an_unexpected_layout_costs_one_figure_not_the_report():
    ds = synthetic.lens(n_prompts=3, n_layers=5)
    ds["crossing_layer"] = ds["crossing_layer"].isel(lens=0, drop=True)  # no lens dim, unlike the contract
    with pytest.warns(RuntimeWarning, match="could not draw"):
        figs, skipped = rl.figures(ds)
    names = [f.name for f in figs]
    assert names == ["lens_emergence", "lens_kl", "lens_top_tokens"]  # trajectories and crossing need the lens dim
    assert len(skipped) == 2 and all(s.startswith("could not draw a figure: KeyError") for s in skipped)


def test_decision_rates_and_wilson_interval():
    ds = synthetic.decisions(n_prompts=10)
    ov = rd.ethical_rates(ds)
    bars = next(el for el in ov if isinstance(el, hv.Bars))
    rates = dict(zip(bars.dimension_values(0), bars.dimension_values(1)))
    assert rates["base"] == pytest.approx(float(ds["chose_ethical"].sel(side="base").mean()))
    assert rates["consistent"] == pytest.approx(float(ds["consistent"].mean()))
    lo, hi = rd.wilson(np.array([0, 5, 10]), np.array([10, 10, 10]))
    assert lo[0] == 0 and 0 < hi[0] < 0.35 and lo[1] < 0.5 < hi[1] and hi[2] == pytest.approx(1)
    cats = rd.by_category(ds)
    rows = {(c, m): v for c, m, v in zip(*(cats.dimension_values(i) for i in range(3)))}
    mask = ds["category"].values == "fairness"
    assert rows[("fairness", "counterfactual")] == pytest.approx(
        float(ds["chose_ethical"].sel(side="cf").values[mask].mean()))
    text = rd.prompt_text_view(ds)["case_000"].data
    assert "&lt;script&gt;" in text and "<script>" not in text  # prompt text is escaped


def test_report_renders_whichever_files_exist(tmp_path):
    folder = synthetic.write_store(tmp_path, analyses=("decisions", "lens"), n_prompts=4, n_layers=5)
    from nnethics.render.report import load_store

    data, notes = load_store(folder)
    assert sorted(data) == ["decisions", "lens"] and not notes
    figs, prompts, skipped = report_figures(data)
    names = [f.name for f in figs]
    assert names[0] == "verdict_text" and names[1].startswith("verdict_") and "lens_top_tokens" in names
    assert not any(n.startswith(("patching", "attribution")) for n in names)
    assert prompts == [f"case_{i:03d}" for i in range(4)]
    (folder / "attribution.nc").write_bytes(b"not a netcdf file")
    data, notes = load_store(folder)
    assert "attribution" not in data and notes and "unreadable" in notes[0]


def test_embed_records_only_what_changes_between_frames():
    # small HoloMaps (the "view" selectors) are replayed from recorded frames; per-prompt views are carried
    # (tests/test_render_carrier.py)
    ds = synthetic.patching(n_prompts=3, n_layers=4)
    hmap = rp.effect_views(ds)
    r = embed.render(hmap)
    keys = [str(k) for k in hmap.keys()]
    assert r.select is not None and r.select.options == keys and len(keys) == 3
    assert set(r.frames) == set(r.select.options)
    kinds = {(type(r.targets[i]).__name__, prop) for i, prop, _ in r.frames[keys[1]]}
    assert ("ColumnDataSource", "data") in kinds and ("Title", "text") in kinds
    titles = [v for i, prop, v in r.frames[keys[2]] if prop == "text"]
    assert titles and titles != [v for i, prop, v in r.frames[keys[0]] if prop == "text"]
    static = embed.render(rp.effect_curve(ds))
    assert static.select is None and static.frames is None
    split = synthetic.attribution(n_prompts=6, n_layers=5)
    merged = embed.render(ra.position_ethical_split(split))
    assert merged.select is not None and len(merged.frames) == 2
    n_targets = len(merged.targets)
    assert all(0 <= i < n_targets for f in merged.frames.values() for i, _, _ in f)
    embed.link_selectors([r, merged])
    assert r.select.js_property_callbacks["change:value"][0].args["group"] == [r.select, merged.select]


def test_inline_cdn_and_local_scripts_leave_no_external_reference():
    html = ('<link rel="icon" href="https://cdn.holoviz.org/panel/1.9.4/dist/images/favicon.ico">'
            '"stylesheets": ["https://cdn.holoviz.org/panel/1.9.4/dist/css/loading.css?v=1.9.4",'
            ' "https://cdn.holoviz.org/panel/9.9.9/dist/css/missing.css"]'
            '<script src="static/extensions/panel/bundled/reactiveesm/es-module-shims@^1.10.0/dist/es-module-shims.min.js">'
            '</script><script src="static/extensions/panel/nope.js"></script>')
    out = offline.inline_cdn(offline.inline_local_scripts(html))
    assert "cdn.holoviz.org" not in out and "static/extensions" not in out
    assert 'href="data:image/' in out and '"data:,"' in out
    css = out.split('"stylesheets": ["')[1].split('"')[0]
    import base64

    decoded = base64.b64decode(css.split(",", 1)[1]).decode()
    assert ".pn-loading" in decoded and "../assets/" not in decoded and "data:image/svg+xml" in decoded
    assert "<script src" not in out and "nope.js" not in out and "importShim" in out
    assert "sourceMappingURL=/sm/" not in out  # the trailing comment (not the string literal the code uses)


def test_write_report_is_self_contained_and_quiet(store, tmp_path, capfd):
    out = write_report(store, out=tmp_path / "r.html")
    assert capfd.readouterr().out == ""  # no embed progress bar or other chatter on stdout
    html = out.read_text(encoding="utf-8")
    assert 500_000 < out.stat().st_size < 8_000_000
    assert "cdn.holoviz.org" not in html and "cdn.bokeh.org" not in html
    assert "<script src=" not in html and "<link rel=\"stylesheet\"" not in html
    for name in ("case_005", "Causal tracing", "Direct logit attribution", "Logit lens", "Decisions"):
        assert name in html
    assert "<script>alert" not in html


def test_save_html_of_one_holomap(tmp_path):
    ds = synthetic.patching(n_prompts=3, n_layers=4)
    out = offline.save_html(rp.prompt_view(ds), tmp_path / "one.html", title="one figure")
    html = out.read_text(encoding="utf-8")
    assert "<title>one figure</title>" in html and '"case_002"' in html and "Select" in html
    assert "<script src=" not in html and "cdn.holoviz.org" not in html


def test_report_and_compare_cli(store, tmp_path):
    from nnethics.cli import cli

    runner = CliRunner()
    res = runner.invoke(cli, ["report", str(store), "--out", str(tmp_path / "x.html"), "--max-prompts", "2"])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith(f"report: {tmp_path / 'x.html'} (") and "MB" in res.stdout
    html = (tmp_path / "x.html").read_text()
    assert "first 2 of 6 prompts" in html
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(cli, ["report", str(empty)])
    assert res.exit_code == 2 and "no result files" in res.stderr
    other = synthetic.write_store(tmp_path / "b", slug="other-model", n_layers=9, seed=3,
                                  analyses=("decisions", "patching", "lens"))
    res = runner.invoke(cli, ["compare", str(store), str(other), "--out", str(tmp_path / "c.html")])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("comparison: ")
    res = runner.invoke(cli, ["compare", str(store)])
    assert res.exit_code == 2


def test_compare_uses_relative_depth_when_layer_counts_differ(tmp_path):
    a = synthetic.write_store(tmp_path, slug="a", n_layers=6, seed=1)
    b = synthetic.write_store(tmp_path, slug="b", n_layers=11, seed=2, analyses=("patching",))
    stores, _ = load_stores([a, b])
    assert list(stores) == ["synthetic/a", "synthetic/b"]
    figs, skipped = compare_figures(stores)
    names = [f.name for f in figs]
    assert {"compare_decisions", "compare_patching_resid", "compare_peak_layers", "compare_attribution_attn"} <= set(names)
    resid = next(f for f in figs if f.name == "compare_patching_resid").obj
    b_curve = _curve(resid, "synthetic/b")
    assert b_curve.dimension_values(0)[-1] == pytest.approx(1.0) and len(b_curve) == 11
    np.testing.assert_allclose(b_curve.dimension_values(1),
                               xr.load_dataset(b / "patching.nc")["effect"].sel(component="resid").mean("prompt"),
                               rtol=1e-5)
    same, _ = compare_figures(stores, relative=False)
    assert _curve(next(f for f in same if f.name == "compare_patching_resid").obj,
                  "synthetic/b").dimension_values(0)[-1] == 10
    out = write_comparison([a, b], out=tmp_path / "cmp.html")
    assert "synthetic/b" in out.read_text()


def test_compare_names_each_run_and_titles_use_its_labels_and_n(tmp_path):
    """--name sets each store's legend label; the attribution title uses the runs' answer labels (A/B here), and
    every overlaid figure's title says how many prompts each run holds."""
    from nnethics.cli import cli
    from nnethics.store import write_atomic

    a = synthetic.write_store(tmp_path / "a", slug="m", n_prompts=6, seed=1)
    b = synthetic.write_store(tmp_path / "b", slug="m", n_prompts=4, seed=2, analyses=("decisions", "patching"))
    write_atomic(synthetic.attribution(n_prompts=6, n_layers=6, labels=("A", "B")), a / "attribution.nc")
    stores, _ = load_stores([a, b], names=["base", "tuned"])
    assert list(stores) == ["base", "tuned"]
    figs = {f.name: f.obj for f in compare_figures(stores)[0]}
    resid = figs["compare_patching_resid"]
    assert _curve(resid, "base") is not None and _curve(resid, "tuned") is not None
    assert resid.opts.get().kwargs["title"].endswith("n = base: 6, tuned: 4")
    assert "contribution to label A − label B" in figs["compare_attribution_attn"].opts.get().kwargs["title"]
    assert "n = base: 6, tuned: 4" in figs["compare_decisions"].opts.get().kwargs["title"]
    runner = CliRunner()
    res = runner.invoke(cli, ["compare", str(a), str(b), "--name", "base", "--name", "tuned",
                              "--out", str(tmp_path / "c.html")])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "c.html").read_text()
    assert "nnethics comparison: base, tuned" in page
    res = runner.invoke(cli, ["compare", str(a), str(b), "--name", "base"])
    assert res.exit_code == 2
    assert "--name: given 1 time(s) (1 different) for 2 store folders; pass one different --name per STORE_DIR" in res.output

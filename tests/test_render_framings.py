"""The "Across framings" and "Content swap versus label swap" sections: each figure carries the stored numbers at the
right place (checked at cells that are not corners, on tables that are not square), the report shows the sections
only when the folder has the files, and compare shows each model's framings."""

from __future__ import annotations

import holoviews as hv
import numpy as np
import pytest
import synthetic
import synthetic_framings as sf
import xarray as xr

from nnethics.render import counterfactual_kinds as ck
from nnethics.render import framings as rf
from nnethics.render.report import load_store, report_figures, sections


def _points(overlay: hv.Overlay) -> dict[str, tuple[float, float]]:
    """{framing row label: (x, y)} over every Points element of a forest panel."""
    out = {}
    for el in overlay:
        if isinstance(el, hv.Points):
            for x, y, label in zip(el.dimension_values(0), el.dimension_values(1), el.dimension_values("framing")):
                out[str(label)] = (float(x), float(y))
    return out


def _segments(overlay: hv.Overlay) -> dict[float, tuple[float, float]]:
    """{row y: (x0, x1)} over every Segments element."""
    out = {}
    for el in overlay:
        if isinstance(el, hv.Segments):
            for x0, y0, x1 in zip(*(el.dimension_values(i) for i in range(3))):
                out[float(y0)] = (float(x0), float(x1))
    return out


def test_forest_row_of_a_framing_carries_its_mean_and_ci():
    ds = sf.framings_summary(n_prompts=7)
    pref, bias = rf.forest_plots(ds).values()
    pts, segs = _points(pref), _segments(pref)
    f = "moralchoice.AB.rev"  # neither the first nor the last row
    m = float(ds["mean_ethical_preference"].sel(framing=f))
    x, y = pts[f]
    assert x == pytest.approx(m)
    assert segs[y] == pytest.approx((float(ds["ethical_preference_ci_low"].sel(framing=f)),
                                     float(ds["ethical_preference_ci_high"].sel(framing=f))))
    # the row's tick names the framing, and the rows are grouped by template (a gap between groups)
    ticks = dict(pref.opts.get().kwargs["yticks"])
    assert ticks[y] == f
    ys = {k: v[1] for k, v in pts.items()}
    assert ys["ethical.12.fwd"] - ys["ethical.12.rev"] == 1.0
    assert ys["ethical.12.rev"] - ys["moralchoice.AB.fwd"] == 1.5
    # the pooled estimate is its own row, last, with the stored mean and CI
    assert ys[rf.POOLED] == min(ys.values())
    assert pts[rf.POOLED][0] == pytest.approx(float(ds["mean_pooled_ethical_preference"]))
    assert segs[ys[rf.POOLED]] == pytest.approx((float(ds["pooled_ethical_preference_ci_low"]),
                                                 float(ds["pooled_ethical_preference_ci_high"])))
    title = pref.opts.get().kwargs["title"]
    assert "BCa bootstrap" in title and "n=7 pairs" in title
    # the position-bias panel: the same rows at the same heights, the bias means; the pooled row empty (not stored)
    bpts, bsegs = _points(bias), _segments(bias)
    assert {k: v[1] for k, v in bpts.items()} == ys and np.isnan(bpts[rf.POOLED][0])
    assert bpts[f][0] == pytest.approx(float(ds["mean_position_bias"].sel(framing=f)))
    assert bsegs[bpts[f][1]] == pytest.approx((float(ds["position_bias_ci_low"].sel(framing=f)),
                                               float(ds["position_bias_ci_high"].sel(framing=f))))
    # coloured by template: one Points element per template
    assert [el.label for el in pref if isinstance(el, hv.Points)] == ["ethical", "moralchoice", "first_person",
                                                                       rf.POOLED]


def test_forest_computes_a_ci_the_file_lacks():
    ds = sf.framings_summary(n_prompts=8).drop_vars(["mean_position_bias", "position_bias_ci_low",
                                                     "position_bias_ci_high", "n_pairs"])
    rows = {r.label: r for r in rf.forest_rows(ds, "position_bias", pooled=False)}
    v = ds["position_bias"].sel(framing="ethical.12.rev").values.astype(float)
    from nnethics import metrics

    m, lo, hi = metrics.mean_ci(v)
    r = rows["ethical.12.rev"]
    assert (r.mean, r.n) == (pytest.approx(float(m)), 8)
    assert (r.low, r.high) == (pytest.approx(float(lo), rel=1e-6), pytest.approx(float(hi), rel=1e-6))


def test_agreement_heatmap_is_framing_by_prompt_not_transposed():
    ds = sf.framings_summary(n_prompts=5, framings=sf.FRAMINGS[:3])  # 3 framings x 5 pairs
    hm = rf.agreement_heatmap(ds)
    assert [d.name for d in hm.kdims] == ["pair", "framing"]
    cells = {(str(p), str(f)): float(v) for p, f, v in zip(*(hm.dimension_values(i) for i in range(3)))}
    assert len(cells) == 15
    want = float(ds["ethical_preference"].sel(framing="ethical.12.rev", prompt="case_003"))
    assert cells[("case_003", "ethical.12.rev")] == pytest.approx(want)
    assert cells[("case_001", "moralchoice.AB.fwd")] == pytest.approx(
        float(ds["ethical_preference"].sel(framing="moralchoice.AB.fwd", prompt="case_001")))
    # the rendered Bokeh plot: framings on y (a factor axis runs bottom up: the first framing is on top), pairs on x
    plot = hv.renderer("bokeh").get_plot(hm).state
    assert list(plot.y_range.factors) == list(sf.FRAMINGS[:3])[::-1]
    assert sorted(plot.x_range.factors) == synthetic.prompt_ids(5)
    pref = ds["ethical_preference"].values
    same = int((np.all(pref > 0, 0) | np.all(pref < 0, 0)).sum())
    title = hm.opts.get().kwargs["title"]
    assert f"same sign in all 3 content framings on {same} of 5 pairs" in title and "Krippendorff's α = 0.37" in title
    # without the stored share it is counted here, the same way
    bare = ds.drop_vars(["sign_agreement", "sign_agreement_ci_low", "sign_agreement_ci_high", "n_agreement"])
    assert f"on {same} of 5 pairs" in rf.agreement_heatmap(bare).opts.get().kwargs["title"]
    assert "α undefined" in rf.agreement_heatmap(ds.assign(krippendorff_alpha=np.nan)).opts.get().kwargs["title"]


def test_cloze_scatter_puts_each_pair_at_its_preference_and_cloze_margin():
    ds = sf.framings_summary(n_prompts=9)
    ov = rf.cloze_scatter(ds)
    got = {str(p): (float(x), float(y)) for el in ov if isinstance(el, hv.Points)
           for x, y, p in zip(el.dimension_values(0), el.dimension_values(1), el.dimension_values("prompt"))}
    assert len(got) == 9
    assert got["case_004"] == pytest.approx((float(ds["pooled_ethical_preference"].sel(prompt="case_004")),
                                             float(ds["cloze_margin"].sel(prompt="case_004"))))
    k = int(round(float(ds["cloze_mc_agreement"]) * 9))
    title = ov.opts.get().kwargs["title"]
    assert f"same sign on {k} of 9 pairs" in title and "Wilson 95% CI" in title
    assert [el for el in ov if isinstance(el, hv.HLine)] and [el for el in ov if isinstance(el, hv.VLine)]
    with pytest.raises(rf.MissingData):
        rf.cloze_scatter(ds.drop_vars("cloze_margin"))


def test_verdict_text_is_escaped_and_missing_parts_are_skipped():
    ds = sf.framings_summary(n_prompts=4)
    div = rf.verdict_div(ds).data
    assert "&lt;b&gt;&amp; one&lt;/b&gt;" in div and "<b>& one" not in div
    figs, skipped = rf.figures(ds.drop_vars("cloze_margin"))
    assert [f.name for f in figs] == ["framings_verdict", "framings_forest", "framings_agreement"]
    assert len(skipped) == 1 and "cloze_margin" in skipped[0]


def test_content_and_label_swap_curves_on_one_figure(tmp_path):
    content, label = (sf.kind_patching(k, n_prompts=6, n_layers=5) for k in ("content", "label"))
    hmap = ck.kind_curves(content, label, ("ethical.12.fwd", "ethical.12.swap"))
    assert list(hmap.keys()) == ["resid", "attn", "mlp"]
    curves = {el.label: el for el in hmap["mlp"] if type(el) is hv.Curve}
    n = int(label["effect_defined"].sum())
    lab = next(v for k, v in curves.items() if k.startswith("label swap"))
    assert f"(n={n} pairs)" in lab.label and "ethical.12.swap" in lab.label
    np.testing.assert_allclose(lab.dimension_values(1), label["mean_effect"].sel(component="mlp").values, rtol=1e-6)
    band = next(el for el in hmap["mlp"] if isinstance(el, hv.Area) and el.label == lab.label)
    np.testing.assert_allclose(band.dimension_values(2), label["effect_ci_high"].sel(component="mlp").values,
                               rtol=1e-6)
    con = next(v for k, v in curves.items() if k.startswith("content swap"))
    np.testing.assert_allclose(con.dimension_values(1), content["mean_effect"].sel(component="mlp").values, rtol=1e-6)
    assert ck.kind_pairs(["a.12.rev", "a.12.swap", "b.AB.swap", "c.AB.fwd", "c.AB.rev", "c.AB.swap"]) == [
        ("a.12.rev", "a.12.swap"), ("c.AB.fwd", "c.AB.swap")]


def test_binding_sentence_from_binding_nc_goes_into_the_note():
    content, label = (sf.kind_patching(k) for k in ("content", "label"))
    data = {"framings/ethical.12.fwd/patching": content, "framings/ethical.12.swap/patching": label,
            "binding": xr.Dataset(attrs={"binding": "The label binds at layer 3, the content at layer 2.",
                                         "content_framing": "ethical.12.fwd", "label_framing": "ethical.12.swap"})}
    figs, skipped = rf.folder_figures(data)
    assert [f.name for f in figs] == ["framings_kinds_ethical_12"] and not skipped
    assert figs[0].note.startswith("The label binds at layer 3") and figs[0].section == rf.BINDING_SECTION


def test_report_shows_the_sections_only_with_the_files(tmp_path):
    plain = synthetic.write_store(tmp_path / "plain", analyses=("decisions",), n_prompts=4)
    data, notes = load_store(plain)
    assert sorted(data) == ["decisions"] and not notes
    figs, _, skipped = report_figures(data)
    assert not any(f.section in (rf.SECTION, rf.BINDING_SECTION) for f in figs) and not skipped
    folder = sf.write_framings_store(tmp_path / "framed", n_prompts=4, n_layers=5)
    data, notes = load_store(folder)
    assert sorted(data) == ["decisions", "framings", "framings/ethical.12.fwd/patching",
                            "framings/ethical.12.swap/patching"] and not notes
    figs, _, skipped = report_figures(data)
    names = [f.name for f in figs if f.section in (rf.SECTION, rf.BINDING_SECTION)]
    assert names == ["framings_verdict", "framings_forest", "framings_agreement", "framings_cloze",
                     "framings_kinds_ethical_12"] and not skipped
    order = sections()
    assert order.index(rf.SECTION) == order.index("What the model decided") + 1
    assert order.index(rf.BINDING_SECTION) == order.index("Causal tracing") + 1
    # a framed run writes no model-level decisions.nc: framings.nc alone makes a report
    only = sf.write_framings_store(tmp_path / "only", analyses=(), kinds=False, n_prompts=4)
    data, _ = load_store(only)
    assert sorted(data) == ["framings"]


def test_compare_shows_each_models_framings(tmp_path):
    from nnethics.render.compare import figures as compare_figures
    from nnethics.render.compare import load_stores

    a = sf.write_framings_store(tmp_path, slug="a", n_prompts=5, kinds=False, seed=1)
    b = sf.write_framings_store(tmp_path, slug="b", n_prompts=6, kinds=False, seed=2,
                                framings=sf.FRAMINGS[:2] + sf.FRAMINGS[3:])
    c = synthetic.write_store(tmp_path, slug="c", analyses=("decisions",), n_prompts=4)
    stores, _ = load_stores([a, b, c])
    figs, _ = compare_figures(stores)
    fig = next(f for f in figs if f.name == "compare_framings")
    pts = _points(fig.obj)
    ds_b = stores["synthetic/b"]["framings"]
    key = "moralchoice.AB.rev · synthetic/b"
    assert pts[key][0] == pytest.approx(float(ds_b["mean_ethical_preference"].sel(framing="moralchoice.AB.rev")))
    assert f"{rf.POOLED} · synthetic/a" in pts and "moralchoice.AB.fwd · synthetic/b" not in pts
    assert not any(k.endswith("synthetic/c") for k in pts)  # no framings.nc: no rows
    segs = _segments(fig.obj)
    assert segs[pts[key][1]] == pytest.approx((float(ds_b["ethical_preference_ci_low"].sel(framing="moralchoice.AB.rev")),
                                               float(ds_b["ethical_preference_ci_high"].sel(framing="moralchoice.AB.rev"))))


def _real_summary(n_prompts: int = 6):
    """framings.nc as nnethics.framings_verdict writes it, from synthetic decisions in three content framings and a
    label swap (skipped where that module or its krippendorff dependency is missing)."""
    fv = pytest.importorskip("nnethics.framings_verdict")
    pytest.importorskip("krippendorff")
    decisions = {}
    for i, f in enumerate(("ethical.12.fwd", "ethical.12.rev", "moralchoice.AB.fwd", "ethical.12.swap")):
        t, _, order = f.split(".")
        d = synthetic.decisions(n_prompts, seed=i)
        d.attrs.update(framing=f, framing_template=t, framing_order=order,
                       counterfactual_kind="label" if order == "swap" else "content")
        decisions[f] = d
    cloze = xr.Dataset({"cloze_margin": ("prompt", np.linspace(-1, 1.5, n_prompts))},
                       coords={"prompt": synthetic.prompt_ids(n_prompts)})
    return fv.summarize_framings(decisions, cloze)


def test_the_figures_read_framings_verdicts_own_file():
    ds = _real_summary()
    figs, skipped = rf.figures(ds)
    assert [f.name for f in figs] == ["framings_verdict", "framings_forest", "framings_agreement",
                                      "framings_cloze"] and not skipped
    pref, _ = figs[1].obj.values()
    pts, segs = _points(pref), _segments(pref)
    f = "ethical.12.rev"
    assert pts[f][0] == pytest.approx(float(ds["mean_ethical_preference"].sel(framing=f)))
    assert segs[pts[f][1]] == pytest.approx((float(ds["ethical_preference_ci_low"].sel(framing=f)),
                                             float(ds["ethical_preference_ci_high"].sel(framing=f))))
    assert pts[rf.POOLED][0] == pytest.approx(float(ds["mean_pooled_ethical_preference"]))
    ticks = dict(pref.opts.get().kwargs["yticks"])
    assert ticks[pts["ethical.12.swap"][1]] == "ethical.12.swap (label swap)"
    # the agreement: content framings only, the stored share and its n
    hm = figs[2].obj
    assert set(hm.dimension_values("framing")) == {"ethical.12.fwd", "ethical.12.rev", "moralchoice.AB.fwd"}
    k = int(round(float(ds["sign_agreement"]) * int(ds["n_agreement"])))
    assert f"same sign in all 3 content framings on {k} of {int(ds['n_agreement'])} pairs" in hm.opts.get().kwargs[
        "title"]
    title = figs[3].obj.opts.get().kwargs["title"]
    k = int(round(float(ds["cloze_mc_agreement"]) * int(ds["n_cloze_mc"])))
    assert f"same sign on {k} of {int(ds['n_cloze_mc'])} pairs" in title
    assert html_escape(ds.attrs["framings_verdict"]) in figs[0].obj.data


def html_escape(text: str) -> str:
    import html

    return html.escape(text)


def test_binding_module_gives_the_sentence_and_the_crossing_layers():
    binding = pytest.importorskip("nnethics.binding")
    content = sf.kind_patching("content", n_prompts=6, n_layers=6)
    label = sf.kind_patching("label", n_prompts=6, n_layers=6)
    data = {"framings/ethical.12.fwd/patching": content, "framings/ethical.12.swap/patching": label}
    figs, skipped = rf.folder_figures(data)
    assert not skipped and figs[0].note.startswith(binding.binding_text(content, label))
    bds = binding.binding_dataset(content, label)
    hmap = figs[0].obj
    for comp in ("resid", "mlp"):
        want = {int(v) for v in bds["patch_crossing_layer"].sel(component=comp).values if int(v) != binding.NEVER}
        got = {int(el.data) for el in hmap[comp] if isinstance(el, hv.VLine)}
        assert got == want
        assert [float(el.data) for el in hmap[comp] if isinstance(el, hv.HLine)] == [0.0, bds.attrs["threshold"]]
    # a binding.nc of other framings is not used for this pair
    other = bds.assign_attrs(content_framing="acceptable.AB.fwd", binding="another pair's sentence")
    figs, _ = rf.folder_figures({**data, "binding": other})
    assert "another pair's sentence" not in figs[0].note


def test_forest_rows_put_a_label_sets_two_orders_side_by_side():
    ds = sf.framings_summary(n_prompts=4, framings=("ethical.12.fwd", "ethical.AB.fwd", "acceptable.12.fwd",
                                                     "ethical.12.rev", "ethical.AB.rev"))
    rows = rf.forest_rows(ds, "ethical_preference")
    assert [r.label for r in rows] == ["ethical.12.fwd", "ethical.12.rev", "ethical.AB.fwd", "ethical.AB.rev",
                                       "acceptable.12.fwd", rf.POOLED]
    assert rows[3].mean == pytest.approx(float(ds["mean_ethical_preference"].sel(framing="ethical.AB.rev")))


def test_compare_command_with_framings(tmp_path):
    from click.testing import CliRunner

    from nnethics.cli import cli

    a = sf.write_framings_store(tmp_path, slug="a", n_prompts=4, kinds=False, seed=1)
    b = sf.write_framings_store(tmp_path, slug="b", n_prompts=5, kinds=False, seed=2)
    out = tmp_path / "cmp.html"
    res = CliRunner().invoke(cli, ["compare", str(a), str(b), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.is_file() and "comparison:" in res.output

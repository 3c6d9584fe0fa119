"""Per-prompt views carried once (``nnethics.render.carrier``): every prompt's carried row must draw what
HoloViews draws for that prompt's own frame (the reference picture), numbers within float32."""

from __future__ import annotations

import holoviews as hv
import numpy as np
import pytest
import synthetic
from bokeh.models import GlyphRenderer, Span

from nnethics.analyses.attribution import figures as ra
from nnethics.analyses.decisions import figures as rd
from nnethics.analyses.lens import figures as rl
from nnethics.analyses.patching import figures as rp
from nnethics.render import embed
from nnethics.render.carrier import PerPrompt, PerPromptLayout, apply_row, carried, pack, unpack

NUMERIC = ("layer", "rank", "zvalues", "probability", "token_id")


def _points(model) -> tuple[list, list, str, tuple]:
    """What a figure shows: sorted (glyph, point) tuples of finite points, visible span locations, title, y range."""
    points = []
    for r in model.renderers:
        if not isinstance(r, GlyphRenderer):
            continue
        data = dict(r.data_source.data)
        cols = sorted(data)
        n = len(next(iter(data.values()))) if data else 0
        for j in range(n):
            row = []
            for c in cols:
                v = data[c][j]
                if c in ("width", "height", "ink", "probability"):  # probability: = zvalues (HoloViews: as text)
                    continue
                row.append((c, v) if isinstance(v, str) else (c, round(float(v), 4)))
            if all(not isinstance(v, float) or np.isfinite(v) for _, v in row):
                points.append((type(r.glyph).__name__, tuple(row)))
    spans = sorted(round(float(s.location), 4) for s in model.center if isinstance(s, Span) and s.visible
                   and s.location is not None)
    y = model.y_range
    return sorted(points, key=repr), spans, model.title.text, (round(y.start, 3), round(y.end, 3))


def _hv_points(frame) -> tuple[list, list, str, tuple]:
    points, spans, title, ylim = _points(hv.renderer("bokeh").get_plot(frame).state)
    # HoloViews writes hover values of a HeatMap as text ('0.36788'); the carrier as float32 numbers
    fixed = [(g, tuple((c, round(float(v), 4)) if c in NUMERIC and isinstance(v, str) else (c, v) for c, v in row))
             for g, row in points]
    return sorted(fixed, key=repr), spans, title, ylim


def _check(view, n_checked: int | None = None) -> None:
    panels = view.panels if isinstance(view, PerPromptLayout) else [view]
    for pp in panels:
        model, targets, sources, props = carried(pp)
        for i, p in enumerate(pp.prompts[:n_checked]):
            apply_row(targets, sources, props, i)
            if pp.texts:
                assert model.text == pp.frame(p).data
                continue
            got, want = _points(model), _hv_points(pp.frame(p))
            assert got[0] == want[0], (p, "data")
            assert got[1] == want[1], (p, "spans")
            assert got[2] == want[2], (p, "title")
            if np.isfinite(pp.ylim[i]).all() if pp.ylim is not None else False:
                np.testing.assert_allclose(got[3], want[3], atol=2e-3)


def test_pack_keeps_numbers_in_float32_and_strings_in_a_vocabulary():
    rows = np.random.default_rng(0).normal(size=(5, 3, 4))
    e = pack(rows)
    assert e[0] == "f" and e[1] == 12 and e[2].dtype == np.float32 and e[2].size == 60
    for i in range(5):
        np.testing.assert_allclose(unpack(e, i), rows[i].ravel(), rtol=1e-6)
    words = np.array([["a", "b"], ["b", "c"], ["c", "a"]], dtype=object)
    s = pack(words)
    assert s[0] == "s" and s[2].dtype == np.uint16 and s[3] == ["a", "b", "c"]
    assert [unpack(s, i) for i in range(3)] == words.tolist()
    ids = pack(np.array([[1, 70000], [3, 4]]))
    assert ids[0] == "i" and unpack(ids, 0).tolist() == [1, 70000]
    titles = pack(np.array(["t0", "t1"], dtype=object))
    assert titles[0] == "t" and unpack(titles, 1) == "t1"


def test_patching_rows_draw_each_prompts_frame():
    ds = synthetic.patching(n_prompts=5, n_layers=6)
    view = rp.prompt_view(ds, [*ds["prompt"].values.tolist(), "not_run"])
    assert isinstance(view, PerPrompt)
    _check(view)
    _check(rp.prompt_view(ds.drop_vars("patched_logit_diff")))  # older files: the effect itself
    _check(rp.prompt_view(synthetic.noise_last(n_prompts=4, n_layers=6)))


def test_attribution_lens_and_text_rows_draw_each_prompts_frame():
    _check(ra.prompt_view(synthetic.attribution(n_prompts=4, n_layers=5), [f"case_{i:03d}" for i in range(5)]))
    lens = synthetic.lens(n_prompts=4, n_layers=6)
    _check(rl.trajectories(lens))
    _check(rl.top_tokens(lens))
    _check(rl.top_tokens(lens.drop_vars("top_token_text")))
    _check(rd.prompt_text_view(synthetic.decisions(n_prompts=3), ["case_000", "case_002", "nope"]))


def test_embed_carries_each_prompt_once_and_links_selectors():
    ds = synthetic.patching(n_prompts=3, n_layers=4)
    r = embed.render(rp.prompt_view(ds))
    assert r.select is not None and r.select.options == ["case_000", "case_001", "case_002"]
    assert r.frames is None and r.carry is not None
    sources, props = r.carry
    entries = [e for _, cols in sources for _, e in cols] + [e for _, _, e in props]
    assert all(e[0] == "t" or e[2].dtype in (np.float32, np.int32, np.uint16) for e in entries)
    want = ds["patched_logit_diff"].sel(prompt="case_002").values  # (layer, component)
    rows = [unpack(e, 2) for _, cols in sources for _, e in cols]
    assert all(len(names) == len(set(names)) for _, cols in sources for names, _ in cols)
    assert all(any(np.allclose(row, want[:, c], rtol=1e-6) for row in rows) for c in range(3))
    titles = [unpack(e, 2) for _, prop, e in props if prop == "text"]
    assert titles and "case_002" in titles[0]
    merged = embed.render(rl.trajectories(synthetic.lens(n_prompts=3, n_layers=4)))
    assert merged.select is not None and merged.keys == ("case_000", "case_001", "case_002")
    n_targets = len(merged.targets)
    assert all(0 <= t < n_targets for t, _ in merged.carry[0]) and all(0 <= t < n_targets for t, *_ in merged.carry[1])
    views = embed.render(rp.effect_views(ds))  # a small HoloMap ("view" selector): frames replayed
    embed.link_selectors([r, merged, views])
    assert r.select.js_property_callbacks["change:value"][0].args["group"] == [r.select, merged.select, views.select]
    assert "prompts.indexOf" in r.select.js_property_callbacks["change:value"][0].code


@pytest.mark.parametrize("n", [1000])
def test_a_thousand_prompts_are_carried_in_float32(n):
    ds = synthetic.patching(n_prompts=n, n_layers=30)
    r = embed.render(rp.prompt_view(ds))
    floats = [e[2] for _, cols in r.carry[0] for _, e in cols]
    assert sum(a.nbytes for a in floats) == 6 * n * 30 * 4  # 3 curves + 3 flip markers, 4 bytes a number


def test_prompt_by_layer_heatmaps_of_many_prompts_are_one_float32_image():
    from nnethics.analyses.patching.figures_effect import HEATMAP_CELLS_MAX

    n = HEATMAP_CELLS_MAX + 20
    ds = synthetic.patching(n_prompts=n, n_layers=5)
    img = rp.effect_heatmap(ds, "attn")
    assert isinstance(img, hv.Image)
    z = img.dimension_values(2, flat=False)  # rows = prompts (in order), columns = layers
    want = ds["effect"].sel(component="attn").transpose("prompt", "layer").values
    np.testing.assert_allclose(z, want, rtol=1e-6, equal_nan=True)
    ok = ds["effect_defined"].values.astype(bool)
    ds["effect_defined"] = ds["effect_defined"].copy(data=ok & (np.arange(n) % 3 > 0))  # leave out every third pair
    views = rp.heatmap_views(ds, "resid")
    subset = next(v for k, v in views.items() if "content-sensitive" in str(k) and "change" in str(k))
    rows = subset.dimension_values(2, flat=False)
    assert rows.shape[0] == n  # every prompt keeps its row; the pairs this view leaves out are grey (NaN)
    left_out = ~(ds["effect_defined"].values.astype(bool))
    assert np.isnan(np.asarray(rows, float)[left_out]).all() and np.isfinite(np.asarray(rows, float)[~left_out]).any()

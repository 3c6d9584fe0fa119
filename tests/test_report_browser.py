"""report.html / compare.html in real headless Chromium (Debian's, driven by playwright), and PNG export.

Every request the page makes that is not file:/data:/blob: is blocked and recorded: the report must
make none. Install: ``apt-get install -y chromium chromium-driver`` and ``pip install playwright selenium``
(no ``playwright install``: the tests use /usr/bin/chromium). Screenshots go to $NNETHICS_SHOTS when set.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import synthetic

from nnethics.render import write_comparison, write_report

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install -y chromium)"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                       reason="needs playwright (pip install playwright; no 'playwright install' needed)"),
]

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]
NOTICES = ("WebGL", "GL Driver Message", "GPU stall", "swiftshader")
READY = """() => window.Bokeh && Bokeh.documents.length > 0 &&
  [...Bokeh.index.all_views()].some(v => v.model.type === 'Figure') &&
  [...Bokeh.index.all_views()].filter(v => v.model.type === 'Figure').every(v => v.has_finished())"""
ALL_DRAWN = """() => (""" + READY + """)() &&
  [...Bokeh.index.all_views()].filter(v => v.model.type === 'Figure').length ===
  [...Bokeh.documents[0].all_models].filter(m => m.type === 'Figure').length"""
FIGURES = """() => {
  const models = [...Bokeh.documents[0].all_models].filter(m => m.type === 'Figure');
  const views = [...Bokeh.index.all_views()].filter(v => v.model.type === 'Figure');
  return {models: models.length, views: views.length,
          finished: views.filter(v => v.has_finished()).length,
          sized: views.filter(v => v.el.getBoundingClientRect().width > 50 &&
                                   v.el.getBoundingClientRect().height > 50).length};
}"""
INK = """() => Object.fromEntries([...Bokeh.index.all_views()].filter(v => v.model.type === 'Figure').map(v => {
  const c = v.canvas_view.compose().canvas;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0;  // saturated opaque pixels: coloured glyphs, not axes or text
  for (let i = 0; i < d.length; i += 4) {
    if (d[i + 3] > 200 && Math.max(d[i], d[i + 1], d[i + 2]) - Math.min(d[i], d[i + 1], d[i + 2]) > 60) n++;
  }
  return [v.model.title ? v.model.title.text : '', n];
}))"""
STATE = """() => {
  const doc = Bokeh.documents[0];
  const data = [...doc.all_models].filter(m => m.type === 'ColumnDataSource').map(m => {
    const d = m.data instanceof Map ? Object.fromEntries(m.data) : m.data;
    return Object.fromEntries(Object.entries(d).map(([k, v]) => [k, Array.from(v, x => String(x))]));
  });
  const titles = [...doc.all_models].filter(m => m.type === 'Title').map(m => m.text);
  const divs = [...doc.all_models].filter(m => m.type === 'Div').map(m => m.text);
  return JSON.stringify({data, titles, divs});
}"""


def _open(page_url: str, shot: Path | None = None, select: str | None = None, view: str | None = None,
          height: int = 900) -> dict:
    from playwright.sync_api import sync_playwright

    external: list[str] = []
    console: list[str] = []
    errors: list[str] = []
    out: dict = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": height})

            def route(r):
                url = r.request.url
                if url.startswith(("file:", "data:", "blob:")):
                    return r.continue_()
                external.append(url)
                return r.abort()

            page.route("**/*", route)
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_url)
            page.wait_for_function(READY, timeout=60_000)
            page.wait_for_function("() => window.nnethics_blocks === undefined || nnethics_blocks.pending === 0",
                                   timeout=60_000)
            out["first_screen"] = page.evaluate(FIGURES)  # a report draws a block when it nears the viewport
            holders = page.locator("div.nnethics-lazy")
            out["lazy_blocks"] = holders.count()
            for i in range(out["lazy_blocks"]):  # scroll every block into view, as a reader would
                holders.nth(i).scroll_into_view_if_needed()
                page.wait_for_function(f"() => nnethics_blocks.shown.has({i})", timeout=30_000)
            page.wait_for_function(ALL_DRAWN, timeout=60_000)
            out["figures"] = page.evaluate(FIGURES)
            out["ink"] = page.evaluate(INK)
            if shot is not None:
                page.screenshot(path=str(shot), full_page=True)
            selects = page.locator("select")
            out["n_selects"] = selects.count()
            # Bokeh draws widgets in shadow roots: document.querySelectorAll does not see them, locators do
            out["options"] = [selects.nth(i).evaluate("s => [...s.options].map(o => o.value)")
                              for i in range(out["n_selects"])]
            if view is not None:  # a non-prompt selector: the first one offering the option that starts with `view`
                i, value = next((i, o) for i, opts in enumerate(out["options"]) for o in opts if o.startswith(view))
                before = json.loads(page.evaluate(STATE))
                selects.nth(i).select_option(value)
                page.wait_for_function(READY, timeout=30_000)
                out["view_before"], out["view_after"] = before, json.loads(page.evaluate(STATE))
                out["view_values"] = [selects.nth(j).input_value() for j in range(out["n_selects"])]
            if select is not None and out["n_selects"]:
                before = json.loads(page.evaluate(STATE))
                selects.first.select_option(select)
                for i, opts in enumerate(out["options"]):  # every linked prompt selector follows
                    if select in opts:
                        selects.nth(i).wait_for(state="attached")
                        page.wait_for_function("s => s.value === " + json.dumps(select),
                                               arg=selects.nth(i).element_handle(), timeout=10_000)
                page.wait_for_function(READY, timeout=30_000)
                after = json.loads(page.evaluate(STATE))
                out["before"], out["after"] = before, after
                out["values"] = [selects.nth(i).input_value() for i in range(out["n_selects"])]
                if shot is not None:
                    page.screenshot(path=str(shot.with_name(shot.stem + "_selected.png")), full_page=True)
        finally:
            browser.close()
    out["external"] = external
    out["console_errors"] = [c for c in console if not any(n in c for n in NOTICES)]
    out["page_errors"] = errors
    return out


def _shots(tmp_path: Path) -> Path:
    d = Path(os.environ["NNETHICS_SHOTS"]) if os.environ.get("NNETHICS_SHOTS") else tmp_path / "shots"
    d.mkdir(parents=True, exist_ok=True)
    return d


def test_report_offline_renders_every_figure_and_the_selector_works(tmp_path):
    store = synthetic.write_store(tmp_path / "store", n_prompts=6, n_layers=6)
    report = write_report(store)
    res = _open(report.as_uri(), _shots(tmp_path) / "report.png", select="case_004",
                view="change of logit diff (logits), all pairs")
    assert res["external"] == []
    assert res["console_errors"] == [] and res["page_errors"] == []
    figs = res["figures"]
    assert figs["models"] >= 29  # every figure of every section, the verdict's four included
    assert figs["views"] == figs["models"] == figs["finished"] == figs["sized"]
    # lazy: the first screen draws a few figures, the others once scrolled near (all were, above)
    assert res["lazy_blocks"] >= 20 and 0 < res["first_screen"]["views"] < figs["models"] / 2
    prompt_selects = [i for i, opts in enumerate(res["options"]) if "case_004" in opts]
    assert len(prompt_selects) == 5  # the per-prompt figures; all linked
    assert [res["values"][i] for i in prompt_selects] == ["case_004"] * 5
    # the patching "view" selectors (mean effect + one heatmap per component) and attribution's "pairs" selector
    views = [opts for opts in res["options"] if opts and opts[0].startswith("normalised effect")]
    assert len(views) == 4 and all(len(v) == 3 for v in views)
    chosen = [v for v in res["view_values"] if v.startswith("change of logit diff (logits), all pairs")]
    assert len(chosen) == 4  # the heatmaps follow the mean-effect figure's view
    assert sum(opts[0].startswith("all pairs") for opts in res["options"]) == 1  # one drives both split panels
    # switching the view changes the mean-effect curve's data and title to the absolute change over all pairs
    vb, va = res["view_before"], res["view_after"]
    assert vb["data"] != va["data"]
    assert any(t.startswith("Mean change of the logit difference") and "all pairs (n=6)" in t for t in va["titles"])
    assert not any(t.startswith("Mean change of the logit difference") for t in vb["titles"])
    before, after = res["before"], res["after"]
    assert before["data"] != after["data"]
    assert any("case_000" in t for t in before["titles"]) and not any("case_000" in t for t in after["titles"])
    assert sum("case_004" in t for t in after["titles"]) >= 5  # patching, attribution, 2× lens trajectories, tokens
    assert any("case_004" in d for d in after["divs"]) and not any("Dilemma 0 (base)" in d for d in after["divs"])
    assert any("Dilemma 4 (base)" in d for d in after["divs"])
    # the per-prompt effect figure shows the selected prompt's numbers (carried as float32)
    import xarray as xr

    with xr.open_dataset(store / "patching.nc") as ds:
        want = {p: ds["patched_logit_diff"].sel(prompt=p, component="resid").values.astype(float)
                for p in ("case_000", "case_004")}

    def shows(state: dict, curve: np.ndarray) -> bool:
        for src in state["data"]:
            for col in src.values():
                try:
                    got = np.array([float(x) for x in col])
                except ValueError:
                    continue
                if got.shape == curve.shape and np.allclose(got, curve, rtol=1e-6, atol=1e-6):
                    return True
        return False

    assert shows(before, want["case_000"]) and not shows(before, want["case_004"])
    assert shows(after, want["case_004"]) and not shows(after, want["case_000"])
    # a window tall enough to draw every block at once: the (WebGL) bars are still drawn, as when scrolled
    tall = _open(report.as_uri(), height=12_000)
    assert tall["first_screen"]["views"] == tall["figures"]["models"] and tall["console_errors"] == []
    for ink in (res["ink"], tall["ink"]):
        bars = [n for t, n in ink.items() if t.startswith(("Chose the ethical option", "Ethical choices by category"))]
        assert len(bars) == 2 and min(bars) > 1000, ink


def test_report_with_only_decisions_and_the_compare_page(tmp_path):
    only = synthetic.write_store(tmp_path / "a", slug="only-decisions", analyses=("decisions",), n_prompts=3)
    res = _open(write_report(only).as_uri(), _shots(tmp_path) / "report_decisions.png")
    assert res["external"] == [] and res["console_errors"] == [] and res["page_errors"] == []
    # rates, by category, label mass + the verdict's scatter pair and category bars
    assert res["figures"]["models"] == res["figures"]["finished"] == 7 and res["n_selects"] == 1
    a = synthetic.write_store(tmp_path / "b", slug="model-a", n_layers=6, seed=1)
    b = synthetic.write_store(tmp_path / "b", slug="model-b", n_layers=10, seed=2, analyses=("decisions", "patching"))
    res = _open(write_comparison([a, b]).as_uri(), _shots(tmp_path) / "compare.png")
    assert res["external"] == [] and res["console_errors"] == [] and res["page_errors"] == []
    assert res["figures"]["models"] >= 8 and res["figures"]["models"] == res["figures"]["finished"]


@pytest.mark.skipif(not shutil.which("chromedriver") and not Path("/usr/bin/chromedriver").exists(),
                    reason="needs chromedriver (apt-get install -y chromium-driver)")
@pytest.mark.skipif(importlib.util.find_spec("selenium") is None, reason="needs selenium (pip install selenium)")
def test_png_export_writes_one_image_per_plot(tmp_path):
    from PIL import Image

    store = synthetic.write_store(tmp_path, analyses=("decisions", "lens"), n_prompts=3, n_layers=5)
    report = write_report(store, png=True)
    pngs = sorted((report.parent / "report_png").glob("*.png"))
    assert [p.stem for p in pngs] == sorted(["verdict_scatter", "verdict_by_category", "decisions_rates",
                                             "decisions_by_category", "decisions_label_mass", "lens_emergence", "lens_kl", "lens_crossing",
                                             "lens_trajectories", "lens_top_tokens"])
    for p in pngs:
        im = Image.open(p).convert("RGB")
        assert im.width > 300 and im.height > 200
        assert len(im.getcolors(maxcolors=1 << 20) or []) > 20  # a plot, not a blank page


def test_heads_section_offline_heatmap_and_linked_attention_selector(tmp_path):
    """The heads section: the layer x head heatmap (hover carries the CI and DLA) and the top heads' token view,
    whose prompt selector is linked to the prompt viewer's; no external request, no error."""
    store = synthetic.write_store(tmp_path / "store", n_prompts=4, n_layers=6, analyses=("decisions", "heads"))
    report = write_report(store)
    html = report.read_text()
    assert "Attention heads" in html and "What the top heads read" in html
    res = _open(report.as_uri(), _shots(tmp_path) / "heads.png", select="case_002")
    assert res["external"] == []
    assert res["console_errors"] == [] and res["page_errors"] == []
    figs = res["figures"]
    assert figs["views"] == figs["models"] == figs["finished"] == figs["sized"] and figs["models"] >= 2
    prompt_selects = [i for i, opts in enumerate(res["options"]) if "case_002" in opts]
    assert len(prompt_selects) >= 2 and [res["values"][i] for i in prompt_selects] == ["case_002"] * len(prompt_selects)
    before, after = res["before"], res["after"]
    assert any(t.startswith("case_000: attention of the top heads") for t in before["titles"])
    assert any(t.startswith("case_002: attention of the top heads") for t in after["titles"])
    # the token cells of the selected prompt, and the heatmap's hover columns
    assert any("ci_low" in d and "dla" in d for d in (set(x) for x in before["data"]))
    tokens = synthetic.heads(4, 6)["token_text"].sel(prompt="case_002", side="base").values
    shown = {t for d in after["data"] for t in d.get("token", [])}
    assert {str(t).replace("\n", "⏎") for t in tokens if t} <= shown

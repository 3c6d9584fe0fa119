"""The report of a folder with framings.nc and a content/label pair of patching files, in headless Chromium: the
"Across framings" and "Content swap versus label swap" figures draw (ink on every one), the component selector
switches the curves, nothing is requested from the network. Screenshots go to $NNETHICS_SHOTS when set."""

from __future__ import annotations

import synthetic_framings as sf
from test_report_browser import _open, _shots, pytestmark  # noqa: F401  (the same skips: chromium, playwright)

from nnethics.render import write_comparison, write_report


def test_report_with_framings_draws_the_new_sections(tmp_path):
    folder = sf.write_framings_store(tmp_path / "store", n_prompts=7, n_layers=6)
    report = write_report(folder)
    res = _open(report.as_uri(), _shots(tmp_path) / "report_framings.png", view="attn")
    assert res["external"] == [] and res["console_errors"] == [] and res["page_errors"] == []
    figs = res["figures"]
    assert figs["views"] == figs["models"] == figs["finished"] == figs["sized"]
    ink = res["ink"]
    for start in ("Ethical preference per framing", "Position bias per framing", "Ethical preference per framing ×",
                  "Multiple choice vs cloze", "ethical.12: mean patching effect by layer"):
        drawn = [n for t, n in ink.items() if t.startswith(start)]
        assert drawn and min(drawn) > 200, (start, ink)
    # the component selector of the content/label figure: resid first, attn switches the curves and the title
    comps = [opts for opts in res["options"] if opts == ["resid", "attn", "mlp"]]
    assert len(comps) == 1
    before, after = res["view_before"], res["view_after"]
    assert any("Across framings" in d for d in before["divs"])
    assert any("Content swap versus label swap" in d for d in before["divs"])
    verdict = [d for d in before["divs"] if "Across 5 framings" in d]
    assert verdict and "&lt;b&gt;&amp; one" in verdict[0] and "<b>& one" not in verdict[0]  # escaped
    assert before["data"] != after["data"]
    assert any(t.startswith("ethical.12: mean patching effect by layer, resid") for t in before["titles"])
    assert any(t.startswith("ethical.12: mean patching effect by layer, attn") for t in after["titles"])


def test_compare_page_with_framings(tmp_path):
    a = sf.write_framings_store(tmp_path, slug="a", n_prompts=5, kinds=False, seed=1)
    b = sf.write_framings_store(tmp_path, slug="b", n_prompts=6, kinds=False, seed=2)
    res = _open(write_comparison([a, b]).as_uri(), _shots(tmp_path) / "compare_framings.png")
    assert res["external"] == [] and res["console_errors"] == [] and res["page_errors"] == []
    drawn = [n for t, n in res["ink"].items() if t.startswith("Ethical preference per framing and pooled, by model")]
    assert drawn and drawn[0] > 200, res["ink"]

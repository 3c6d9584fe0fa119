"""Benchmark ``nnethics report``: write time, file size and open time in headless Chromium.

Writes a synthetic store (every analysis, the right schema: ``tests/synthetic.py``) of each size in
``--pairs`` (40 and 1,000 by default; ``--layers`` layers, 30 like the built-in model), renders its
report with every prompt in the selectors and opens it in Debian's Chromium driven by playwright,
as ``tests/test_report_browser.py`` does. The report draws a figure only when it scrolls near the viewport
(``offline.save_lazy``), so two open times: ``first s`` from ``goto`` until the figures of the first screen have
finished drawing, and ``all s`` until every figure of the page has, scrolling each block into view in turn
(``busy s``: the page's main-thread time over both). Also counts external requests and console errors (both
must be 0).

    PYTHONPATH=. python scripts/bench_report.py [--pairs 40,1000] [--layers 30] [--max-prompts N]
    PYTHONPATH=. python scripts/bench_report.py --panel store/<model-slug>   # vs Panel's save(embed=True)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]
READY = """() => window.Bokeh && Bokeh.documents.length > 0 &&
  [...Bokeh.index.all_views()].some(v => v.model.type === 'Figure') &&
  [...Bokeh.index.all_views()].filter(v => v.model.type === 'Figure').every(v => v.has_finished())"""
#: The first screen: every block the page asked for on load (those within a screen of the viewport) is built and
#: every figure built so far is drawn (not merely the first block: blocks are built one after another).
FIRST_SCREEN = """() => (""" + READY + """)() && (window.nnethics_blocks === undefined ||
  (nnethics_blocks.shown.size > 0 && nnethics_blocks.pending === 0))"""
ALL_DRAWN = """() => (""" + READY + """)() &&
  [...Bokeh.index.all_views()].filter(v => v.model.type === 'Figure').length ===
  [...Bokeh.documents[0].all_models].filter(m => m.type === 'Figure').length"""


def scroll_through(page, timeout_ms: int = 300_000) -> None:
    """Scroll every lazy block (``offline.save_lazy``) into view in turn, then wait until every figure of the
    page is drawn."""
    holders = page.locator("div.nnethics-lazy")
    for i in range(holders.count()):
        holders.nth(i).scroll_into_view_if_needed()
        page.wait_for_function(f"() => nnethics_blocks.shown.has({i})", timeout=timeout_ms, polling=20)
    page.wait_for_function(ALL_DRAWN, timeout=timeout_ms, polling=50)


def open_time(path: Path) -> tuple[float, float, float, int, int]:
    """Seconds from navigation until the first screen's figures are drawn and until every figure is (scrolled
    through), the page's main-thread busy time (CDP ``TaskDuration``: less sensitive than wall time to other
    processes on a shared machine), external requests and console errors."""
    from playwright.sync_api import sync_playwright

    external: list[str] = []
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})

            def route(r):
                if r.request.url.startswith(("file:", "data:", "blob:")):
                    return r.continue_()
                external.append(r.request.url)
                return r.abort()

            cdp = page.context.new_cdp_session(page)
            cdp.send("Performance.enable")
            page.route("**/*", route)
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "WebGL" not in m.text
                    and "GL Driver" not in m.text else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            t0 = time.perf_counter()
            page.goto(path.as_uri())
            page.wait_for_function(FIRST_SCREEN, timeout=300_000, polling=50)
            first = time.perf_counter() - t0
            scroll_through(page)
            wall = time.perf_counter() - t0
            metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
            return first, wall, metrics.get("TaskDuration", float("nan")), len(external), len(errors)
        finally:
            browser.close()


def panel_report(store: Path, out: Path) -> Path:
    """The same figures saved by Panel's own ``save(embed=True, resources=INLINE)`` (issue 15): per-prompt views
    as HoloMaps (one frame per prompt, Panel's widget), no CDN inlining, no custom JS."""
    import holoviews as hv
    import panel as pn
    from bokeh.resources import INLINE

    from nnethics.render.carrier import PerPrompt, PerPromptLayout
    from nnethics.render.report import load_store, report_figures

    def as_hv(obj):
        if isinstance(obj, PerPrompt):
            return hv.HoloMap({p: obj.frame(p) for p in obj.prompts}, kdims=["prompt"], sort=False)
        if isinstance(obj, PerPromptLayout):
            return hv.Layout([as_hv(p) for p in obj.panels]).cols(obj.cols)
        return obj

    data, _ = load_store(store)
    figs, _, _ = report_figures(data, max_prompts=None)
    page = pn.Column(*[pn.Column(pn.pane.Markdown(f"### {f.title}"), pn.panel(as_hv(f.obj))) for f in figs])
    page.save(str(out), embed=True, resources=INLINE, title="nnethics report (Panel embed)")
    return out


def compare_panel(store: Path, root: Path, args_only_open: bool = False) -> None:
    """Our writer (``write_report``) against Panel's ``save(embed=True, resources=INLINE)`` on one store
    (``args_only_open``: reopen files already written in ``root``)."""
    import warnings

    from nnethics.render import write_report

    print(f"{'writer':>8} {'write s':>8} {'cpu s':>6} {'MB':>7} {'first s':>7} {'all s':>7} {'busy s':>7} "
          f"{'external':>8} {'errors':>6}")
    for name, write in (("nnethics", lambda o: write_report(store, out=o)), ("panel", lambda o: panel_report(store, o))):
        out = root / f"report_{name}.html"
        t0, c0 = time.perf_counter(), time.process_time()
        if not (args_only_open and out.exists()):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                write(out)
        write_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        first, opened, busy, external, errors = open_time(out)
        print(f"{name:>8} {write_s:>8.1f} {cpu_s:>6.1f} {out.stat().st_size / 1e6:>7.2f} {first:>7.2f} {opened:>7.2f} "
              f"{busy:>7.2f} {external:>8} {errors:>6}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", default="40,1000", help="comma-separated store sizes (prompt pairs)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--max-prompts", type=int, default=None, help="prompts offered by the selectors (default all)")
    ap.add_argument("--keep", default=None, help="folder to keep the stores and reports in")
    ap.add_argument("--panel", default=None, metavar="STORE_DIR",
                    help="instead: compare with Panel's save(embed=True, resources=INLINE) on this store folder")
    ap.add_argument("--open-only", action="store_true", help="with --panel: reopen the files already in --keep")
    args = ap.parse_args()
    if args.panel:
        compare_panel(Path(args.panel), Path(args.keep or tempfile.mkdtemp(prefix="bench_report_")), args.open_only)
        return

    import synthetic

    from nnethics.render import write_report

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_report_"))
    print(f"{'pairs':>6} {'write s':>8} {'cpu s':>6} {'MB':>7} {'first s':>7} {'all s':>7} {'busy s':>7} "
          f"{'external':>8} {'errors':>6}")
    for n in (int(x) for x in args.pairs.split(",")):
        store = synthetic.write_store(root / f"n{n}", n_prompts=n, n_layers=args.layers)
        t0, c0 = time.perf_counter(), time.process_time()
        out = write_report(store, max_prompts=args.max_prompts)
        write_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        size = out.stat().st_size / 1e6
        first, opened, busy, external, errors = open_time(out)
        print(f"{n:>6} {write_s:>8.1f} {cpu_s:>6.1f} {size:>7.2f} {first:>7.2f} {opened:>7.2f} {busy:>7.2f} "
              f"{external:>8} {errors:>6}", flush=True)


if __name__ == "__main__":
    main()

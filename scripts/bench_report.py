"""Benchmark ``nnethics report``: write time, file size and open time in headless Chromium.

Writes a synthetic store (every analysis, the right schema: ``tests/synthetic.py``) of each size in
``--pairs`` (40 and 1,000 by default; ``--layers`` layers, 30 like the built-in model), renders its
report with every prompt in the selectors and opens it in Debian's Chromium driven by playwright,
as ``tests/test_report_browser.py`` does: the open time runs from ``goto`` until every Bokeh figure
has finished drawing. Also counts external requests and console errors (both must be 0).

    PYTHONPATH=. python scripts/bench_report.py [--pairs 40,1000] [--layers 30] [--max-prompts N]
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


def open_time(path: Path) -> tuple[float, int, int]:
    """Seconds from navigation until every figure is drawn; external requests; console errors."""
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

            page.route("**/*", route)
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "WebGL" not in m.text
                    and "GL Driver" not in m.text else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            t0 = time.perf_counter()
            page.goto(path.as_uri())
            page.wait_for_function(READY, timeout=300_000, polling=50)
            return time.perf_counter() - t0, len(external), len(errors)
        finally:
            browser.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", default="40,1000", help="comma-separated store sizes (prompt pairs)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--max-prompts", type=int, default=None, help="prompts offered by the selectors (default all)")
    ap.add_argument("--keep", default=None, help="folder to keep the stores and reports in")
    args = ap.parse_args()

    import synthetic

    from nnethics.render import write_report

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_report_"))
    print(f"{'pairs':>6} {'write s':>8} {'MB':>7} {'open s':>7} {'external':>8} {'errors':>6}")
    for n in (int(x) for x in args.pairs.split(",")):
        store = synthetic.write_store(root / f"n{n}", n_prompts=n, n_layers=args.layers)
        t0 = time.perf_counter()
        out = write_report(store, max_prompts=args.max_prompts)
        write_s = time.perf_counter() - t0
        size = out.stat().st_size / 1e6
        opened, external, errors = open_time(out)
        print(f"{n:>6} {write_s:>8.1f} {size:>7.2f} {opened:>7.2f} {external:>8} {errors:>6}", flush=True)


if __name__ == "__main__":
    main()

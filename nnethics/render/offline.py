"""Self-contained HTML and PNG output.

``save_bokeh`` writes every script and style inline, so the file opens offline with no server and
no network request. Bokeh's inline bundle includes Panel's extension (HoloViews imports Panel),
which references a server-relative ``static/extensions/panel/...`` script and, in Panel models,
stylesheets and icons on ``cdn.holoviz.org``; both are inlined from the copies shipped in
``panel/dist`` (CDN URLs become ``data:`` URIs, nested ``url(...)`` references included).
``export_pngs`` screenshots figures with one reused headless Chromium (selenium + chromedriver).

Measured against Panel's own ``save(embed=True, resources=INLINE)`` (issue 15; ``scripts/bench_report.py
--panel``, the built-in model's 5-pair store, 2 shared CPU cores, load ~7-10): this writer 23.1 s, 2.49 MB,
opens in 6.4 s, 0 external requests, 0 console errors; Panel 103.6 s, 4.52 MB, opens in 9.8 s, and its
"inline" page still asks cdn.holoviz.org / jsdelivr for 7 stylesheets and icons (7 requests, 7 console
errors offline) and its per-figure prompt widgets are not linked. So this module and ``embed``/``carrier``
stay: the regex inlining below is what makes the file make no request at all.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import mimetypes
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import holoviews as hv

from ..store.atomic import write_text_atomic

CDN_URL = re.compile(r"https?:(?:\\?/){2}cdn\.holoviz\.org/panel/[^/\"'\s]+/dist/([^\"'\s)?#]+)(?:\?[^\"'\s)#]*)?")
CSS_URL = re.compile(r"url\(\s*(['\"]?)([^'\")]+)\1\s*\)")


class PngExportError(RuntimeError):
    """PNG export needs Chromium + chromedriver + selenium; raised with an install hint when missing."""


def _panel_dist() -> Path:
    import panel

    return Path(panel.__file__).parent / "dist"


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


@functools.cache
def _dist_file_uri(rel: str) -> str:
    """A ``data:`` URI for ``panel/dist/<rel>``; CSS gets its relative ``url(...)`` references inlined too.

    A file Panel does not ship locally becomes an empty ``data:`` URI, so the browser requests nothing.
    """
    dist = _panel_dist()
    path = (dist / rel).resolve()
    if dist.resolve() not in path.parents or not path.is_file():
        return "data:,"
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if path.suffix == ".css":
        text = path.read_text(encoding="utf-8")

        def inline(m: re.Match) -> str:
            ref = m.group(2).strip()
            if ref.startswith(("data:", "#")) or re.match(r"^[a-z]+:", ref):
                return m.group(0)
            target = (path.parent / ref.split("?")[0].split("#")[0]).resolve()
            if dist.resolve() not in target.parents or not target.is_file():
                return "url(data:,)"
            sub = mimetypes.guess_type(target.name)[0] or ("image/svg+xml" if target.suffix == ".svg" else
                                                           "application/octet-stream")
            return f"url('{_data_uri(target.read_bytes(), sub)}')"

        return _data_uri(CSS_URL.sub(inline, text).encode("utf-8"), "text/css")
    return _data_uri(path.read_bytes(), mime)


def inline_cdn(html: str) -> str:
    """Rewrite every ``https://cdn.holoviz.org/panel/<version>/dist/<file>`` in ``html`` to a ``data:`` URI."""
    return CDN_URL.sub(lambda m: _dist_file_uri(m.group(1)), html)


LOCAL_SCRIPT = re.compile(r'<script(?P<attrs>[^>]*?)\ssrc="static/extensions/panel/(?P<rel>[^"]+)"(?P<rest>[^>]*)>\s*</script>')


def inline_local_scripts(html: str) -> str:
    """Inline the scripts that Bokeh references relative to a server (Panel's ``static/extensions/panel/...``)
    from ``panel/dist``; drop those Panel does not ship."""
    dist = _panel_dist()

    def repl(m: re.Match) -> str:
        path = (dist / m.group("rel")).resolve()
        if dist.resolve() not in path.parents or not path.is_file():
            return ""
        code = path.read_text(encoding="utf-8").replace("</script", "<\\/script")
        code = re.sub(r"\n//# sourceMappingURL=\S*\s*$", "\n", code)  # the trailing comment only
        return f"<script{m.group('attrs')}{m.group('rest')}>{code}</script>"

    return LOCAL_SCRIPT.sub(repl, html)


def save_bokeh(model: Any, path: str | Path, title: str = "nnethics report") -> Path:
    """Save a Bokeh model as one self-contained, offline HTML file (every script inline; written atomically)."""
    from bokeh.embed import file_html
    from bokeh.resources import INLINE

    html = file_html(model, INLINE, title)
    return write_text_atomic(inline_cdn(inline_local_scripts(html)), Path(path))


#: Draws a block of a lazy page when its placeholder comes within a screen of the viewport (a DocumentReady
#: callback). The blocks are in the page's one Document from the start (the first root's ``tags`` hold them),
#: so selectors linked across blocks work before a block is drawn.
LAZY_JS = """
const blocks = root.tags;
const doc = root.document;
const holders = [...document.querySelectorAll("div.nnethics-lazy")];
const shown = new Set();
let queue = Promise.resolve();
let pending = 0;  // blocks asked for and not built yet
function show(i) {
  // one block at a time: blocks built concurrently (a tall window) lost their WebGL glyphs in Chromium
  if (shown.has(i)) return queue;
  shown.add(i);
  pending += 1;
  queue = queue.then(async () => {
    try {
      const view = await doc.views_manager.build_view(blocks[i]);  // also enters Bokeh.index
      holders[i].replaceChildren();  // the "drawing figure" note
      holders[i].style.minHeight = "";
      view.build(holders[i]);
    } finally {
      pending -= 1;
    }
  });
  return queue;
}
const seen = new IntersectionObserver((entries) => {
  for (const e of entries) {
    if (e.isIntersecting) { seen.unobserve(e.target); show(Number(e.target.dataset.block)); }
  }
}, {rootMargin: "100% 0px"});
holders.forEach((h) => seen.observe(h));
window.nnethics_blocks = {count: holders.length, shown, show, get pending() { return pending; },
                          show_all: () => Promise.all(holders.map((_, i) => show(i)))};
"""


def block_height(model: Any) -> int:
    """A Bokeh layout's approximate height in pixels (a lazy block's placeholder, so scrolling stays put)."""
    from bokeh.layouts import GridPlot
    from bokeh.models import Column, Row, Select

    if isinstance(model, Column):
        return sum(block_height(c) for c in model.children)
    if isinstance(model, Row):
        return max((block_height(c) for c in model.children), default=0)
    if isinstance(model, GridPlot):
        rows: dict[int, int] = {}
        for child, r, _c, *_ in model.children:
            rows[r] = max(rows.get(r, 0), block_height(child))
        return sum(rows.values())
    if isinstance(model, Select):
        return 56
    return int(getattr(model, "height", None) or 60)


def save_lazy(layout: Any, path: str | Path, title: str = "nnethics report", eager: int = 1) -> Path:
    """:func:`save_bokeh` for a long page: the first ``eager`` children of the column ``layout`` are drawn on
    load, each other child only when it scrolls near the viewport (``LAZY_JS``). Drawing ~35 Bokeh figures
    at once took most of a 1,000-pair report's open time. Every model stays in one Document (the first root's
    ``tags`` hold the blocks), so selectors linked across blocks keep working before a block is drawn."""
    import html as html_

    from bokeh.document import Document
    from bokeh.embed import file_html
    from bokeh.models import Column, CustomJS
    from bokeh.resources import INLINE

    children = list(layout.children)
    if len(children) <= eager:
        return save_bokeh(layout, path, title)
    layout.children = []
    blocks = children[eager:]
    doc = Document()
    root = Column(*children[:eager], styles=dict(layout.styles), tags=blocks)  # tags: references, not drawn
    doc.add_root(root)
    doc.js_on_event("document_ready", CustomJS(args=dict(root=root), code=LAZY_JS))
    # the column's side margins, not its vertical ones (they would add up between blocks)
    margin = html_.escape(";".join(f"{k}:{v}" for k, v in dict(layout.styles).items()))
    holders = "".join(f'<div class="nnethics-lazy" data-block="{i}" style="{margin};margin-top:0;margin-bottom:0;'
                      f'min-height:{block_height(b)}px"><span style="color:#999;font:13px sans-serif">drawing figure…'
                      f'</span></div>' for i, b in enumerate(blocks))
    page = file_html(doc, INLINE, title)
    head, tail = page.rsplit("</body>", 1)
    if "embed_items" not in head:
        raise RuntimeError("bokeh's page has no embed script")  # pragma: no cover - bokeh changed its template
    return write_text_atomic(inline_cdn(inline_local_scripts(head + holders + "</body>" + tail)), Path(path))


def save_html(obj: Any, path: str | Path, title: str = "nnethics figure") -> Path:
    """Save one HoloViews object or per-prompt view (with a working selector) as an offline HTML file."""
    from bokeh.layouts import column

    from .embed import link_selectors, render

    r = render(obj)
    link_selectors([r])
    return save_bokeh(column(r.select, r.model) if r.select is not None else r.model, path, title)


def static(obj: Any) -> Any:
    """The first frame of every HoloMap or per-prompt view in ``obj`` (for still images)."""
    from .carrier import PerPrompt, PerPromptLayout

    if isinstance(obj, PerPrompt):
        return obj.frame(obj.prompts[0])
    if isinstance(obj, PerPromptLayout):
        return hv.Layout([static(p) for p in obj.panels]).cols(obj.cols)
    if isinstance(obj, hv.HoloMap):
        return obj.data[next(iter(obj.data))] if obj.data else hv.Curve([])
    if isinstance(obj, hv.Layout):
        items = [static(o) for o in obj]
        return hv.Layout(items).cols(obj._max_cols) if items else obj
    return obj


def _browser_paths() -> tuple[str, str]:
    browser = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                                shutil.which("google-chrome"), "/usr/bin/chromium") if p and Path(p).exists()), None)
    driver = next((p for p in (shutil.which("chromedriver"), "/usr/bin/chromedriver") if p and Path(p).exists()), None)
    if not browser or not driver:
        raise PngExportError("PNG export needs Chromium and chromedriver (Debian: apt-get install chromium "
                             "chromium-driver) and the selenium package (pip install selenium)")
    return browser, driver


@contextlib.contextmanager
def chromium_driver():
    """One headless Chromium driven by selenium, sandbox off (needed when running as root in containers)."""
    browser, driver_path = _browser_paths()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        raise PngExportError("PNG export needs the selenium package (pip install selenium)") from e
    opts = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                "--force-device-scale-factor=1", "--disable-background-networking", "--disable-component-update",
                "--no-first-run", "--disable-sync"):
        opts.add_argument(arg)
    opts.binary_location = browser
    drv = webdriver.Chrome(options=opts, service=Service(driver_path))
    try:
        yield drv
    finally:
        drv.quit()


def export_pngs(figures: Iterable[Any], out_dir: str | Path) -> list[Path]:
    """One PNG per plotted figure (``figure.name + '.png'``; the first prompt of per-prompt figures) in
    ``out_dir``. Text-only figures (the prompt viewer) are skipped."""
    import logging

    from bokeh.io import export_png
    from bokeh.models import Div

    from .embed import render

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = list(figures)
    written: list[Path] = []
    if not figures:
        return written
    export_log = logging.getLogger("bokeh.io.export")
    level = export_log.level
    export_log.setLevel(logging.ERROR)  # harmless WebGL-fallback notices from headless Chromium
    try:
        with chromium_driver() as drv, contextlib.redirect_stdout(io.StringIO()):
            for fig in figures:
                model = render(static(fig.obj)).model
                if isinstance(model, Div):
                    continue
                path = out / f"{fig.name}.png"
                export_png(model, filename=str(path), webdriver=drv)
                written.append(path)
    finally:
        export_log.setLevel(level)
    return written

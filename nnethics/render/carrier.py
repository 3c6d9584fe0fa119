"""Per-prompt views carried once, compactly, and selected in the browser.

A :class:`PerPrompt` is one per-prompt figure: a HoloViews *template* (one prompt's frame, drawn once by
HoloViews, so it looks like every other figure) plus the data of every prompt as columnar arrays
``(n_prompts, n)``: numbers as float32 (ids as int32), strings dictionary-coded (one vocabulary + uint16/int32
codes), titles and HTML as one string per prompt. Bokeh writes numpy arrays as base64 typed arrays, so
the file holds each number once in 4 bytes. A ``Select`` with a ``CustomJS`` callback (:data:`CARRY_JS`)
copies row ``i`` of every array into the template's data sources, spans, ranges, titles and divs when
the prompt changes; all prompt selectors of a page are linked (:func:`nnethics.render.embed.link_selectors`).

This replaced a HoloMap frame per prompt replayed from recorded Bokeh states (``embed.render``): a
40-pair store took 23 s and 4.0 MB, a 1,000-pair one minutes and tens of MB (see ``scripts/bench_report.py``).

How a module declares one (see ``nnethics.analyses.patching.figures_prompt.prompt_view`` for a full example)::

    PerPrompt(prompts, frame=lambda p: ..., template=frame_with_every_element,
              columns={(2, "effect"): arr_PxL, (3, "effect"): arr_with_nan_where_hidden},
              spans={1: base_PxNaN}, titles=[...], ylim=lo_hi_Px2, opts=dict(width=..., ...))

``(i, column)`` names column ``column`` of the data source of element ``i`` of the template Overlay
(HoloViews names columns after dimensions: ``hv.Curve((x, y), "layer", "effect")`` has ``layer`` and
``effect``; a ``HeatMap`` colours by ``zvalues``). Elements hidden for a prompt get NaN (points) or a NaN
span location (the span is hidden). ``frame(p)`` stays the reference picture of one prompt (PNG
export, tests): the carried rows must show the same numbers (``tests/test_render.py`` checks them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import holoviews as hv
import numpy as np
from bokeh.models import CustomJS, Select
from holoviews.core.util import dimension_sanitizer

JS_KINDS = ("f", "i", "s", "t")  # float32 rows, int32 rows, dictionary-coded string rows, one text per prompt

CARRY_JS = """
const i = prompts.indexOf(cb_obj.value);
function row(e) {
  const [kind, n, vals, vocab] = e;
  if (kind === "t") return vals[i];
  // copied element by element: subarray() on a BokehJS ndarray calls its constructor ("Size mismatch")
  const r = new Array(n);
  for (let j = 0; j < n; j++) r[j] = kind === "s" ? vocab[vals[i * n + j]] : vals[i * n + j];
  return r;
}
if (i >= 0) {
  for (const [t, cols] of sources) {
    const src = targets[t];
    const d = src.data instanceof Map ? new Map(src.data) : Object.assign({}, src.data);
    for (const [names, e] of cols) {
      const v = row(e);
      for (const name of names) {
        if (d instanceof Map) d.set(name, v); else d[name] = v;
      }
    }
    src.data = d;
  }
  for (const [t, prop, e] of props) {
    let v = row(e);
    if (v != null && typeof v !== "string" && v.length === 1) v = v[0];
    if (prop === "location") targets[t].setv({location: isNaN(v) ? 0 : v, visible: !isNaN(v)});
    else if ((prop === "start" || prop === "end") && isNaN(v)) continue;
    else targets[t].setv({[prop]: v});
  }
}
for (const other of group) {
  if (other !== cb_obj && other.value !== cb_obj.value && other.options.includes(cb_obj.value)) {
    other.value = cb_obj.value;
  }
}
"""


def select_width(labels: Sequence[str]) -> int:
    """Wide enough to show the longest option (about 7.5 px a character), 320 to 760 px."""
    return int(min(760, max(320, 7.5 * max((len(str(x)) for x in labels), default=0) + 40)))


def pack(rows: np.ndarray | Sequence) -> list:
    """One carried array: ``[kind, row length, values, vocabulary]`` (see :data:`JS_KINDS`).

    ``rows`` is ``(n_prompts, ...)``; trailing dims are flattened row-major. Floats become float32,
    integers int32, strings (or objects) one vocabulary plus the smallest unsigned codes that fit.
    """
    a = np.asarray(rows)
    if a.ndim == 1 and a.dtype.kind in "OUS":
        return ["t", 1, [str(x) for x in a.tolist()], []]
    a = a.reshape(a.shape[0], -1) if a.ndim != 1 else a.reshape(-1, 1)
    n = a.shape[1]
    if a.dtype.kind in "OUS":
        vocab, codes = np.unique(a.astype(str).ravel(), return_inverse=True)
        dtype = np.uint16 if len(vocab) <= 1 << 16 else np.int32
        return ["s", n, codes.astype(dtype), vocab.tolist()]
    if a.dtype.kind in "iub":
        return ["i", n, np.ascontiguousarray(a.ravel(), dtype=np.int32), []]
    return ["f", n, np.ascontiguousarray(a.ravel(), dtype=np.float32), []]


def unpack(entry: list, i: int) -> Any:
    """Row ``i`` of a :func:`pack` entry, as the browser sees it (``CARRY_JS``'s ``row``)."""
    kind, n, vals, vocab = entry
    if kind == "t":
        return vals[i]
    r = np.asarray(vals[i * n:(i + 1) * n])
    return [vocab[k] for k in r] if kind == "s" else r.copy()


@dataclass
class PerPrompt:
    """One per-prompt figure: a template drawn once plus every prompt's data, selected in the browser.

    ``prompts`` are the selector's options; ``frame(p)`` is one prompt's HoloViews picture (tests, PNG);
    ``template`` the Overlay whose elements the arrays fill (defaults to the first prompt's frame; it must
    hold every element any prompt shows); ``columns[(element index, column)]`` an ``(n_prompts, n)`` array;
    ``spans[element index]`` an ``(n_prompts,)`` location of an HLine/VLine (NaN hides it); ``titles`` one
    title per prompt; ``ylim`` ``(n_prompts, 2)`` y ranges (else the template's); ``texts`` one HTML text per
    prompt for a ``Div`` view (then no template is needed); ``fields[(element index, glyph property)]`` a
    column name the glyph property reads (e.g. a per-cell text colour); ``opts`` plot options of the template.
    """

    prompts: list[str]
    frame: Callable[[str], Any]
    template: Any = None
    columns: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)
    spans: dict[int, np.ndarray] = field(default_factory=dict)
    titles: Sequence[str] = ()
    ylim: np.ndarray | None = None
    texts: Sequence[str] = ()
    fields: dict[tuple[int, str], str] = field(default_factory=dict)
    opts: dict = field(default_factory=dict)
    kdim: str = "prompt"

    def keys(self) -> list[str]:
        return list(self.prompts)

    def __getitem__(self, prompt: str) -> Any:
        return self.frame(prompt)


@dataclass
class PerPromptLayout:
    """Side-by-side :class:`PerPrompt` panels that follow one selector (e.g. the base and counterfactual side)."""

    panels: list[PerPrompt]
    cols: int = 2

    def values(self) -> list[PerPrompt]:
        return list(self.panels)


def _template(pp: PerPrompt) -> Any:
    tpl = pp.template if pp.template is not None else pp.frame(pp.prompts[0])
    tpl = tpl if isinstance(tpl, hv.Overlay) else hv.Overlay([tpl])
    return tpl.opts(hv.opts.Overlay(**pp.opts)) if pp.opts else tpl


def carried(pp: PerPrompt) -> tuple[Any, list, list, list]:
    """Render ``pp``: (Bokeh model, targets, [(target, [(column, entry)])], [(target, prop, entry)])."""
    from bokeh.models import Div

    if pp.texts:
        opts = dict(pp.opts)
        model = Div(text=str(pp.texts[0]), width=opts.get("width", 600), height=opts.get("height", 300))
        return model, [model], [], [(0, "text", pack(np.asarray(list(pp.texts), dtype=object)))]
    plot = hv.renderer("bokeh").get_plot(_template(pp))
    subplots = list(plot.subplots.values())
    targets: list = []
    by_source: dict[int, list] = {}
    packed: dict[int, list] = {}  # one entry per array object: columns that show the same numbers share it
    props: list = []
    for (i, column), rows in pp.columns.items():
        src = subplots[i].handles["source"]
        if column not in src.data and (i, column) not in {(j, c) for (j, _), c in pp.fields.items()}:
            raise KeyError(f"per-prompt view: element {i} ({type(subplots[i].current_frame).__name__}) has no column "
                           f"{column!r} (it has {sorted(src.data)})")
        if src not in targets:
            targets.append(src)
        alias = dimension_sanitizer(column)  # HoloViews' copy of a column for hover tooltips
        names = [column] + ([alias] if alias != column and alias in src.data else [])
        cols = by_source.setdefault(targets.index(src), [])
        key = id(rows)
        if key in packed:
            packed[key][0].extend(names)
            continue
        packed[key] = [names, pack(rows)]
        cols.append(packed[key])
    for (i, prop), column in pp.fields.items():
        from bokeh.core.property.vectorization import Field

        setattr(subplots[i].handles["glyph"], prop, Field(column))
    for i, loc in pp.spans.items():
        targets.append(subplots[i].handles["glyph"])
        props.append((len(targets) - 1, "location", pack(np.asarray(loc, dtype=float))))
    if len(pp.titles):
        targets.append(plot.handles["plot"].title)
        props.append((len(targets) - 1, "text", pack(np.asarray(list(pp.titles), dtype=object))))
    if pp.ylim is not None:
        targets.append(plot.handles["y_range"])
        lim = np.asarray(pp.ylim, dtype=float)
        props += [(len(targets) - 1, "start", pack(lim[:, 0])), (len(targets) - 1, "end", pack(lim[:, 1]))]
    sources = [(t, cols) for t, cols in by_source.items()]
    apply_row(targets, sources, props, 0)
    return plot.state, targets, sources, props


def apply_row(targets: list, sources: list, props: list, i: int) -> None:
    """What ``CARRY_JS`` does in the browser, in Python: show prompt ``i`` (the page opens on the first)."""
    for t, cols in sources:
        data = dict(targets[t].data)
        data.update({name: unpack(e, i) for names, e in cols for name in names})
        targets[t].data = data
    for t, prop, e in props:
        v = unpack(e, i)
        v = v[0] if isinstance(v, np.ndarray) and v.size == 1 else v
        if prop == "location":
            ok = bool(np.isfinite(v))
            targets[t].location, targets[t].visible = (float(v) if ok else 0.0), ok
        elif prop in ("start", "end"):
            if np.isfinite(v):
                setattr(targets[t], prop, float(v))
        else:
            setattr(targets[t], prop, v)


def selector(prompts: Sequence[str], title: str = "prompt") -> Select:
    labels = [str(p) for p in prompts]
    return Select(title=title, value=labels[0], options=labels, width=select_width(labels))


def callback(prompts: Sequence[str], targets: list, sources: list, props: list, group: list) -> CustomJS:
    return CustomJS(args=dict(prompts=[str(p) for p in prompts], targets=targets, sources=sources, props=props,
                              group=group), code=CARRY_JS)

"""Static embedding of HoloViews figures, HoloMap frames included, as plain Bokeh models.

Per-prompt views are :class:`nnethics.render.carrier.PerPrompt` objects (data carried once per prompt as
typed arrays, see ``carrier``); the frame replay below is for small HoloMaps (a handful of "view" frames).

Panel's ``save(embed=True)`` replays every widget state through a live Bokeh Document, which
recomputes the whole document's model graph on every change: a report with ~30 figures and a
prompt selector took ~4 s per prompt. Here each HoloViews object is rendered once with HoloViews'
own Bokeh renderer (no Document attached), each HoloMap frame is applied with ``plot.update(key)``
and the properties that change between frames (data sources, titles, spans, divs, visibility, colour
ranges) are recorded. A Bokeh ``Select`` replays them in the browser through a ``CustomJS``
callback, so the file needs no server and no kernel. All prompt selectors of a page are linked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import holoviews as hv
import numpy as np
from bokeh.models import (
    BoxAnnotation,
    ColorMapper,
    ColumnDataSource,
    CustomJS,
    DataRange1d,
    Div,
    FactorRange,
    GlyphRenderer,
    LegendItem,
    Range1d,
    Select,
    Span,
    Title,
)
from bokeh.models import Model as BokehModel

from .carrier import PerPrompt, PerPromptLayout, callback, carried, select_width, selector

#: Bokeh properties that a HoloMap frame may change (everything else is fixed by HoloViews' plot init).
DYNAMIC: tuple[tuple[type, tuple[str, ...]], ...] = (
    (ColumnDataSource, ("data",)),
    (Title, ("text",)),
    (Span, ("location", "visible")),
    (BoxAnnotation, ("left", "right", "bottom", "top", "visible")),
    (Div, ("text",)),
    (GlyphRenderer, ("visible",)),
    (ColorMapper, ("low", "high")),
    (Range1d, ("start", "end")),
    (DataRange1d, ("start", "end")),
    (FactorRange, ("factors",)),
    (LegendItem, ("label", "visible")),
)

APPLY_JS = """
const key = cb_obj.value;
const frame = frames instanceof Map ? frames.get(key) : frames[key];
if (frame != null) {
  for (const [i, prop, value] of frame) {
    const model = targets[i];
    let v = value;
    if (prop === "data" && v instanceof Map && !(model.data instanceof Map)) {
      v = Object.fromEntries(v);
    }
    model.setv({[prop]: v});
  }
}
for (const other of group) {
  if (other !== cb_obj && other.value !== key && other.options.includes(key)) {
    other.value = key;
  }
}
"""


@dataclass
class Rendered:
    """A rendered figure: its Bokeh model and, for a HoloMap, the selector that replays its frames."""

    model: Any
    select: Select | None = None
    keys: tuple[str, ...] = ()
    frames: dict | None = None
    targets: list | None = None
    carry: tuple[list, list] | None = None  # (sources, props) of a carried per-prompt view (``carrier``)


def _props(model: BokehModel) -> tuple[str, ...]:
    for cls, names in DYNAMIC:
        if isinstance(model, cls):
            return names
    return ()


def _targets(root: BokehModel) -> list[BokehModel]:
    return sorted((m for m in root.references() if _props(m)), key=lambda m: m.id)


def _snapshot(value: Any) -> Any:
    """A copy that later frames cannot mutate. Not ``deepcopy`` for other values: it would clone
    Bokeh's ``Unspecified`` sentinel inside ``value()`` specs, which the serializer matches by identity."""
    if isinstance(value, dict):
        return {k: (np.array(v, copy=True) if isinstance(v, np.ndarray) else list(v) if isinstance(v, list) else v)
                for k, v in value.items()}
    if isinstance(value, list):
        return list(value)
    return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        try:
            return np.array_equal(np.asarray(a), np.asarray(b), equal_nan=np.asarray(a).dtype.kind == "f")
        except (TypeError, ValueError):
            return False
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True  # both NaN
    try:
        return bool(a == b)
    except (TypeError, ValueError):
        return False


def _holomap_dim(obj: Any) -> str | None:
    """The single key dimension of the HoloMaps in ``obj`` (a HoloMap or a Layout of them), else None."""
    maps = [obj] if isinstance(obj, hv.HoloMap) else [o for o in obj if isinstance(o, hv.HoloMap)] \
        if isinstance(obj, hv.Layout) else []
    dims = {tuple(d.name for d in m.kdims) for m in maps}
    if len(dims) == 1:
        (names,) = dims
        if len(names) == 1:
            return names[0]
    if dims:
        raise ValueError(f"static embedding supports HoloMaps over one shared dimension, got {sorted(dims)}")
    return None


def _div_map(hmap: hv.HoloMap) -> Rendered:
    """A HoloMap of ``hv.Div`` as a plain Bokeh ``Div`` (HoloViews renders Divs as Panel models, which
    would pull Panel's whole JS bundle into the page)."""
    labels = [str(k[0]) if isinstance(k, tuple) else str(k) for k in hmap.keys()]
    divs = list(hmap.values())
    opts = hv.Store.lookup_options("bokeh", divs[0], "plot").kwargs
    model = Div(text=str(divs[0].data), width=opts.get("width", 600), height=opts.get("height", 300))
    frames = {label: [[0, "text", str(d.data)]] for label, d in zip(labels, divs)}
    select = Select(title=hmap.kdims[0].name, value=labels[0], options=labels, width=select_width(labels))
    return Rendered(model, select, tuple(labels), frames, [model])


def _merge(parts: list[Rendered], ncols: int) -> Rendered:
    """Side-by-side panels of a Layout of HoloMaps, replayed by one selector."""
    from bokeh.layouts import gridplot

    model = gridplot([p.model for p in parts], ncols=ncols, merge_tools=True)
    with_frames = [p for p in parts if p.select is not None]
    if not with_frames:
        return Rendered(model)
    labels = with_frames[0].keys
    targets: list = []
    frames: dict = {label: [] for label in labels}
    for p in with_frames:
        offset = len(targets)
        targets += p.targets
        for label in labels:
            frames[label] += [[i + offset, prop, value] for i, prop, value in (p.frames or {}).get(label, [])]
    select = Select(title=with_frames[0].select.title, value=labels[0], options=list(labels),
                    width=select_width(labels))
    return Rendered(model, select, labels, frames, targets)


def _carried(obj: Any) -> Rendered:
    """A :class:`~nnethics.render.carrier.PerPrompt` (or a layout of them) and one selector for it."""
    from bokeh.layouts import gridplot


    panels = obj.panels if isinstance(obj, PerPromptLayout) else [obj]
    models, targets, sources, props = [], [], [], []
    for pp in panels:
        model, t, s, p = carried(pp)
        off = len(targets)
        models.append(model)
        targets += t
        sources += [(i + off, cols) for i, cols in s]
        props += [(i + off, prop, e) for i, prop, e in p]
    model = models[0] if len(models) == 1 else gridplot(models, ncols=obj.cols, merge_tools=True)
    prompts = panels[0].prompts
    return Rendered(model, selector(prompts, panels[0].kdim), tuple(prompts), None, targets, (sources, props))


def render(obj: Any) -> Rendered:
    """Render a HoloViews object to Bokeh; for HoloMaps, record every frame for the JS selector."""

    if isinstance(obj, (PerPrompt, PerPromptLayout)):
        return _carried(obj)
    dim = _holomap_dim(obj)
    if dim is not None and isinstance(obj, hv.Layout):
        # Panel by panel: a LayoutPlot rebuilds the frame of every panel from all frames at each update.
        return _merge([render(item) for item in obj], obj._max_cols or len(obj))
    if isinstance(obj, hv.HoloMap) and obj.data and all(isinstance(v, hv.Div) for v in obj.values()):
        return _div_map(obj)
    if isinstance(obj, hv.Div):
        opts = hv.Store.lookup_options("bokeh", obj, "plot").kwargs
        return Rendered(Div(text=str(obj.data), width=opts.get("width", 600), height=opts.get("height", 300)))
    plot = hv.renderer("bokeh").get_plot(obj)
    if dim is None:
        return Rendered(plot.state)
    keys = list(plot.keys)
    labels = [str(k[0]) if isinstance(k, tuple) else str(k) for k in keys]
    targets = _targets(plot.state)
    snaps: list[list[Any]] = []
    for key in keys:
        plot.update(key)
        snaps.append([_snapshot(getattr(m, p)) for m in targets for p in _props(m)])
    final = _targets(plot.state)
    if [m.id for m in final] != [m.id for m in targets]:  # a frame added models: record again with all of them
        targets = final
        snaps = []
        for key in keys:
            plot.update(key)
            snaps.append([_snapshot(getattr(m, p)) for m in targets for p in _props(m)])
    plot.update(keys[0])
    slots = [(i, p) for i, m in enumerate(targets) for p in _props(m)]
    varying = [j for j in range(len(slots)) if any(not _same(snaps[0][j], s[j]) for s in snaps[1:])]
    used = sorted({slots[j][0] for j in varying})
    index = {i: n for n, i in enumerate(used)}
    frames = {label: [[index[slots[j][0]], slots[j][1], snap[j]] for j in varying]
              for label, snap in zip(labels, snaps)}
    select = Select(title=dim, value=labels[0], options=labels, width=select_width(labels))
    return Rendered(plot.state, select, tuple(labels), frames, [targets[i] for i in used])


def link_selectors(rendered: Sequence[Rendered]) -> None:
    """Attach the frame-replay callbacks; every selector of the page follows the others."""

    group = [r.select for r in rendered if r.select is not None]
    for r in rendered:
        if r.select is None:
            continue
        if r.carry is not None:
            r.select.js_on_change("value", callback(r.keys, r.targets, *r.carry, group))
            continue
        r.select.js_on_change("value", CustomJS(args=dict(frames=r.frames, targets=r.targets, group=group),
                                                code=APPLY_JS))

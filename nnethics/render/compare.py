"""The same figures overlaid across models: ``nnethics compare store/<a> store/<b> ...``.

Models differ in depth, so layers are shown as relative depth (layer / (n_layers − 1)) whenever the
models do not all have the same number of layers.
"""

from __future__ import annotations

import html
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import holoviews as hv
import numpy as np
import xarray as xr

from ..analyses import analyses
from ._base import (
    HEIGHT,
    MODEL_COLORS,
    WIDE,
    WIDTH,
    Figure,
    MissingData,
    band_and_curve,
    ci_label,
    collect,
    mean_ci,
    model_name,
    values,
)
from .report import load_store

SECTION = "Comparison"
Stores = Mapping[str, Mapping[str, xr.Dataset]]


def load_stores(store_dirs: Sequence[str | Path], names: Sequence[str] | None = None
                ) -> tuple[dict[str, dict[str, xr.Dataset]], list[str]]:
    """Each folder's result files, keyed by a unique label: ``names[i]`` (``--name``), else the model id, else the
    folder name."""
    if names and len(names) != len(store_dirs):
        raise MissingData(f"--name: given {len(names)} time(s) for {len(store_dirs)} store folders; pass one --name "
                          "per STORE_DIR, in the same order, or none")
    out: dict[str, dict[str, xr.Dataset]] = {}
    notes: list[str] = []
    for i, d in enumerate(store_dirs):
        data, n = load_store(d)
        notes += [f"{Path(d).name}: {x}" for x in n]
        label = names[i] if names else model_name(next(iter(data.values())), Path(d).name)
        if label in out:
            label = f"{label} ({Path(d).name})"
        k = 2
        base = label
        while label in out:
            label, k = f"{base} #{k}", k + 1
        out[label] = data
    return out, notes


def _layers(stores: Stores, name: str) -> dict[str, int]:
    return {m: d[name].sizes["layer"] for m, d in stores.items() if name in d and "layer" in d[name].dims}


def use_relative(stores: Stores) -> bool:
    counts = set()
    for analysis in analyses():  # every registered analysis whose file has a layer dim
        counts |= set(_layers(stores, analysis.name).values())
    return len(counts) > 1


def _x(ds: xr.Dataset, relative: bool) -> np.ndarray:
    layers = values(ds["layer"]).astype(float)
    return layers / max(1.0, float(ds.sizes["layer"] - 1)) if relative else layers


def _xlabel(relative: bool) -> str:
    return "relative depth (layer / last layer)" if relative else "layer"


def n_text(stores: Stores, name: str) -> str:
    """How many prompts each run's ``name`` file holds, in legend order: ``n = a: 140, b: 70``."""
    return "n = " + ", ".join(f"{m}: {d[name].sizes['prompt']}" for m, d in stores.items()
                              if name in d and "prompt" in d[name].dims)


def label_text(stores: Stores, name: str) -> str:
    """The runs' answer labels as ``'A' − 'B'``; ``first − second label`` with each run's when they differ."""
    pairs = {m: tuple(str(o) for o in values(d[name]["option"])) for m, d in stores.items()
             if name in d and "option" in d[name].coords}
    if len(set(pairs.values())) == 1:
        a, b = next(iter(pairs.values()))
        return f"label {a} − label {b}"
    return "first − second label (" + "; ".join(f"{m}: {p[0]} − {p[-1]}" for m, p in pairs.items()) + ")"


def curves(stores: Stores, name: str, pick, title: str, ylabel: str, relative: bool,
            dim: str | Sequence[str] = "prompt") -> hv.Overlay:
    parts = []
    for i, (model, data) in enumerate(stores.items()):
        if name not in data:
            continue
        try:
            da = pick(data[name])
        except (KeyError, ValueError):
            continue
        m, lo, hi = (values(x.transpose("layer")) for x in mean_ci(da, dim))
        parts.append(band_and_curve(_x(data[name], relative), m, lo, hi, model, MODEL_COLORS[i % len(MODEL_COLORS)],
                                    kdim="depth" if relative else "layer", vdim=ylabel))
    if not parts:
        raise MissingData(f"compare: no model has {name}.nc with the needed variables")
    parts.append(hv.HLine(0).opts(color="gray", line_dash="dotted", line_width=1))
    return hv.Overlay(parts).opts(title=f"{title}; {n_text(stores, name)}", width=WIDE, height=HEIGHT,
                                  legend_position="top_left",
                                  xlabel=_xlabel(relative), ylabel=ylabel)


def framing_forest(stores: Stores) -> hv.Overlay:
    """Each model's ethical preference per framing and pooled over framings (``framings.nc``), with the stored BCa
    95% CIs: one block of rows per framing (pooled last), one row per model holding it, coloured by model."""
    from .framings import POOLED, Row, forest, forest_rows

    per_model = {m: forest_rows(d["framings"], "ethical_preference") for m, d in stores.items() if "framings" in d}
    if not per_model:
        raise MissingData("compare: no framings.nc")
    order = list(dict.fromkeys(r.label for rows in per_model.values() for r in rows if r.label != POOLED))
    rows = []
    for framing in [*order, POOLED]:
        first = True
        for model, model_rows in per_model.items():
            r = next((x for x in model_rows if x.label == framing), None)
            if r is None:
                continue
            rows.append(Row(f"{framing} · {model}", model, r.mean, r.low, r.high, r.n, block=framing,
                            tick=framing if first else ""))
            first = False
    colors = {m: MODEL_COLORS[i % len(MODEL_COLORS)] for i, m in enumerate(stores)}
    n = ", ".join(f"{m}: {d['framings'].sizes.get('prompt', 0)}" for m, d in stores.items() if "framings" in d)
    return forest(rows, f"Ethical preference per framing and pooled, by model (pairs: {n})\n{ci_label('pairs')}",
                  "ethical preference (logits; > 0: leans ethical)", colors=colors, width=WIDE)


def box(stores: Stores, name: str, var: str, title: str, relative: bool, transform=None) -> hv.BoxWhisker:
    models, vals = [], []
    for model, data in stores.items():
        if name not in data or var not in data[name]:
            continue
        ds = data[name]
        da = ds[var]
        if "component" in da.dims:
            comps = [str(c) for c in values(ds["component"])]
            da = da.sel(component="resid" if "resid" in comps else comps[0])
        v = values(transform(da) if transform is not None else da).astype(float).ravel()
        v = v[np.isfinite(v) & (v >= 0)]
        if relative:
            v = v / max(1.0, float(ds.sizes["layer"] - 1))
        models += [model] * len(v)
        vals += v.tolist()
    if not vals:
        raise MissingData(f"compare: no {var} in any {name}.nc")
    return hv.BoxWhisker((models, vals), kdims=["model"], vdims=[_xlabel(relative)]).opts(
        title=f"{title} ({n_text(stores, name)})", width=WIDTH, height=HEIGHT, box_fill_color="#c6dbef", tools=["hover"], invert_axes=True)


def figures(stores: Stores, relative: bool | None = None) -> tuple[list[Figure], list[str]]:
    """The comparison figures: each registered analysis' (its ``compare`` module's ``compare_figures(stores,
    relative)``, in registry order), then the framings'; figures no model has data for are skipped."""
    import importlib

    rel = use_relative(stores) if relative is None else relative
    makers = [make for a in analyses() if a.compare is not None
              for make in importlib.import_module(a.compare).compare_figures(stores, rel)]
    makers.append(lambda: Figure("compare_framings", "Ethical preference across framings", framing_forest(stores),
                                 SECTION))
    return collect(makers)


def write_comparison(store_dirs: Sequence[str | Path], out: str | Path | None = None, png: bool = False,
                     relative: bool | None = None, names: Sequence[str] | None = None) -> Path:
    """Write ``compare.html`` for several model folders (default: next to the first one); return its path.
    ``names``: one legend label per folder (default: each model's id)."""
    from bokeh.layouts import column, row
    from bokeh.models import Div

    from .embed import render
    from .offline import export_pngs, save_bokeh
    from .report import provenance_html, writing

    stores, notes = load_stores(store_dirs, names)
    figs, skipped = figures(stores, relative)
    if not figs:
        raise MissingData("compare: nothing to compare in " + ", ".join(str(d) for d in store_dirs))
    out = Path(out) if out is not None else Path(store_dirs[0]).parent / "compare.html"
    intro = f"<h1 style='margin:4px 0'>nnethics comparison: {html.escape(', '.join(stores))}</h1>"
    for i, (model, data) in enumerate(stores.items()):
        intro += (f"<h3 style='margin:8px 0 0 0;color:{MODEL_COLORS[i % len(MODEL_COLORS)]}'>{html.escape(model)}"
                  f"</h3>{provenance_html(data)}")
    if notes or skipped:
        intro += ("<details style='font-size:12px;color:#666'><summary>skipped</summary><ul>"
                  + "".join(f"<li>{html.escape(s)}</li>" for s in notes + skipped) + "</ul></details>")
    items = [Div(text=intro, width=WIDE)]
    narrow = []
    for fig in figs:
        block = column(Div(text=f"<h3 style='margin:14px 0 2px 0'>{html.escape(fig.title)}</h3>", width=WIDTH),
                       render(fig.obj).model)
        if isinstance(fig.obj, hv.BoxWhisker):
            narrow.append(block)
            continue
        items.append(block)
    if narrow:
        items.append(row(*narrow))
    with writing(out, "pass --out with a file in another folder you can write to"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_bokeh(column(*items, styles={"margin": "10px 20px"}), out, title="nnethics comparison")
        if png:
            export_pngs(figs, out.parent / f"{out.stem}_png")
    return out

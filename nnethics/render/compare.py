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
from .decisions import measures
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


def _curves(stores: Stores, name: str, pick, title: str, ylabel: str, relative: bool,
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


def verdicts(stores: Stores) -> hv.Div:
    """Each model's verdict (the ``verdict`` attr of its ``decisions.nc``), side by side."""
    cells = []
    for i, (model, data) in enumerate(stores.items()):
        text = data["decisions"].attrs.get("verdict") if "decisions" in data else None
        body = html.escape(str(text)) if text else "<i>no verdict (no decisions.nc, or one from before the verdict)</i>"
        cells.append(f"<div style='flex:1;min-width:0;font-size:13px;line-height:1.4;background:#f4f6fa;padding:8px;"
                     f"border-top:4px solid {MODEL_COLORS[i % len(MODEL_COLORS)]}'><b>{html.escape(model)}</b>"
                     f"<br>{body}</div>")
    if not any("decisions" in d and d["decisions"].attrs.get("verdict") for d in stores.values()):
        raise MissingData("compare: no decisions.nc with a verdict")
    return hv.Div(f"<div style='display:flex;gap:12px;width:{WIDE - 20}px'>{''.join(cells)}</div>").opts(
        width=WIDE, height=330)


def verdict_stats(stores: Stores) -> hv.Layout:
    """Mean ethical preference and position bias over all pairs, per model, with their BCa bootstrap 95% CIs."""
    from ..verdict import ALL

    rows = {stem: [] for stem in ("ethical_preference", "position_bias")}
    for model, data in stores.items():
        ds = data.get("decisions")
        if ds is None or "group" not in ds.dims:
            continue
        g = ds.sel(group=ALL)
        for stem in rows:
            m, lo, hi = (float(g[k]) for k in (f"mean_{stem}", f"{stem}_ci_low", f"{stem}_ci_high"))
            rows[stem].append((f"{model} (n={int(g['n_debiased'])})", m, m - lo if np.isfinite(lo) else 0.0,
                               hi - m if np.isfinite(hi) else 0.0))
    if not rows["ethical_preference"]:
        raise MissingData("compare: no decisions.nc with verdict statistics")
    panels = []
    for stem, title in (("ethical_preference", "Ethical preference"), ("position_bias", "Position bias")):
        r = rows[stem]
        bars = hv.Bars([(a, b) for a, b, _, _ in r], kdims=["model"], vdims=["logits"]).opts(
            color="#55a868" if stem == "ethical_preference" else "#8c8c8c", tools=["hover"])
        err = hv.ErrorBars(r, kdims=["model"], vdims=["logits", "neg", "pos"]).opts(color="black", line_width=1.5)
        panels.append((bars * err * hv.HLine(0).opts(color="gray", line_dash="dotted")).opts(
            title=f"{title}, all pairs\n{ci_label('pairs')}", width=WIDTH, height=HEIGHT, xlabel="",
            ylabel="logits"))
    return hv.Layout(panels).cols(2).opts(shared_axes=False)


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


def decision_rates(stores: Stores) -> hv.Bars:
    rows = []
    for model, data in stores.items():
        if "decisions" not in data:
            continue
        for measure, v in measures(data["decisions"]).items():
            rows.append((measure, model, float(v.mean()), int(v.sum()), int(v.size)))
    if not rows:
        raise MissingData("compare: no decisions.nc")
    names = list(dict.fromkeys(r[0] for r in rows))
    bars = hv.Bars(rows, kdims=[hv.Dimension("measure", values=names), "model"], vdims=["rate", "count", "prompts"])
    return bars.opts(title=f"Chose the ethical option, by model ({n_text(stores, 'decisions')})", width=WIDE, height=HEIGHT, ylim=(0, 1.05),
                     tools=["hover"], multi_level=False, cmap=list(MODEL_COLORS), show_legend=True,
                     legend_position="top", ylabel="fraction of prompts", xlabel="")


def _box(stores: Stores, name: str, var: str, title: str, relative: bool, transform=None) -> hv.BoxWhisker:
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
    """The comparison figures; figures no model has data for are skipped."""
    rel = use_relative(stores) if relative is None else relative

    def comp(c):
        return lambda ds: ds["effect"].sel(component=c) if "component" in ds["effect"].dims else ds["effect"]

    def effects() -> list[Figure]:
        comps = []
        for data in stores.values():
            if "patching" in data and "component" in data["patching"].dims:
                comps += [str(c) for c in values(data["patching"]["component"]) if str(c) not in comps]
        return [Figure(f"compare_patching_{c}", f"Mean patching effect ({c})",
                       _curves(stores, "patching", comp(c), f"Mean patching effect by depth: {c} ({ci_label('prompts')})",
                               "effect", rel), SECTION) for c in (comps or ["resid"])]

    def attribution(component: str):
        def pick(ds):
            return ds["diff_contribution"].sel(component=component, side="base")
        return lambda: Figure(f"compare_attribution_{component}", f"Attribution profile ({component})",
                              _curves(stores, "attribution", pick,
                                      f"{component} contribution to {label_text(stores, 'attribution')} "
                                      f"(base prompts, {ci_label('prompts')})",
                                      "contribution", rel), SECTION)

    def lens_kl():
        def pick(ds):
            return ds["kl_to_final"].sel(lens=str(values(ds["lens"])[0])).stack(sample=("prompt", "side"))
        return Figure("compare_lens_kl", "Lens KL to the final output",
                      _curves(stores, "lens", pick, f"KL to the final output by depth (first lens, {ci_label('prompts')})", "KL",
                              rel, dim="sample"), SECTION)

    return collect([
        lambda: Figure("compare_verdicts", "Verdicts", verdicts(stores), SECTION),
        lambda: Figure("compare_verdict_stats", "Position bias and ethical preference", verdict_stats(stores),
                       SECTION),
        lambda: Figure("compare_decisions", "Ethical choices", decision_rates(stores), SECTION),
        lambda: Figure("compare_framings", "Ethical preference across framings", framing_forest(stores), SECTION),
        effects,
        lambda: Figure("compare_peak_layers", "Peak layers", _box(stores, "patching", "peak_layer",
                                                                  "Peak patching layer per prompt", rel), SECTION),
        attribution("attn"),
        attribution("mlp"),
        lens_kl,
        lambda: Figure("compare_crossing", "Crossing layers", _box(
            stores, "lens", "crossing_layer", "Layer from which the final choice leads (first lens)", rel,
            transform=lambda da: da.isel(lens=0) if "lens" in da.dims else da), SECTION),
    ])


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

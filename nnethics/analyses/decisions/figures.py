"""Baseline-decision figures from ``decisions.nc``.

dims prompt, side (base, cf), option: ``chose_ethical (prompt, side)``, ``consistent (prompt)``,
``logit_diff (prompt, side)``, ``label_prob (prompt, side, option)``, ``category (prompt)``,
``prompt_text (prompt, side)``.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import holoviews as hv
import numpy as np
import xarray as xr

from ... import metrics
from ...render._base import (
    HEIGHT,
    MODEL_COLORS,
    WIDE,
    WIDTH,
    Figure,
    MissingData,
    ci_label,
    collect,
    require,
    side_name,
    values,
)
from ...render.carrier import PerPrompt
from ...render.compare import SECTION as COMPARISON
from ...render.compare import Stores, n_text

SECTION = "Decisions"
MEASURE_COLORS = {"base": "#4c72b0", "counterfactual": "#c44e52", "both sides": "#55a868", "consistent": "#8172b3"}


def wilson(k: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score 95% interval for k successes out of n (scipy's ``binomtest(...).proportion_ci``; well
    behaved at 0% and 100%); NaN where n = 0."""
    return metrics.proportion_ci(np.atleast_1d(np.asarray(k, int)), np.atleast_1d(np.asarray(n, int)))


def measures(ds: xr.Dataset) -> dict[str, np.ndarray]:
    """Boolean per-prompt outcomes: ethical on each side, on both, and consistency."""
    require(ds, "chose_ethical")
    ce = ds["chose_ethical"]
    out = {side_name(s): values(ce.sel(side=s)).astype(bool) for s in values(ds["side"])}
    out["both sides"] = values(ce.all("side")).astype(bool)
    if "consistent" in ds:
        out["consistent"] = values(ds["consistent"]).astype(bool)
    return out


def ethical_rates(ds: xr.Dataset) -> hv.Overlay:
    """How often the model chose the ethical option: base, counterfactual, both, and consistency (Wilson 95% CI)."""
    m = measures(ds)
    names = list(m)
    k = np.array([m[x].sum() for x in names])
    n = np.array([m[x].size for x in names])
    lo, hi = wilson(k, n)
    rate = k / np.maximum(n, 1)
    bars = hv.Bars((names, rate, k, n), kdims=["measure"], vdims=["rate", "count", "prompts"]).opts(
        color="measure", cmap=MEASURE_COLORS, tools=["hover"], ylim=(0, 1.05), show_legend=False)
    err = hv.ErrorBars((names, rate, rate - lo, hi - rate), kdims=["measure"], vdims=["rate", "neg", "pos"],
                       ).opts(line_width=1.5, color="black")
    return (bars * err).opts(title=f"Chose the ethical option (n={len(values(ds['prompt']))} pairs; Wilson 95% CI)",
                             width=WIDTH,
                             height=HEIGHT, ylabel="fraction of prompts", xlabel="")


def by_category(ds: xr.Dataset) -> hv.Bars:
    """Ethical-choice rates per prompt category, base vs counterfactual, and consistency."""
    require(ds, "category")
    m = measures(ds)
    cats = values(ds["category"]).astype(str)
    cats = np.where(cats == "", "(none)", cats)
    names = [x for x in m if x != "both sides"]
    rows = []
    for cat in sorted(set(cats.tolist())):
        mask = cats == cat
        for name in names:
            rows.append((cat, name, float(m[name][mask].mean()), int(m[name][mask].sum()), int(mask.sum())))
    measure = hv.Dimension("measure", values=names)
    bars = hv.Bars(rows, kdims=["category", measure], vdims=["rate", "count", "prompts"])
    n_cats = len(set(cats.tolist()))
    return bars.opts(title="Ethical choices by category", width=WIDE if n_cats > 4 else WIDTH, height=HEIGHT,
                     ylim=(0, 1.05), tools=["hover"], cmap=MEASURE_COLORS, multi_level=False,
                     show_legend=True, legend_position="top", xrotation=30 if n_cats > 6 else 0,
                     ylabel="fraction of prompts", xlabel="")


def label_mass(ds: xr.Dataset) -> hv.Overlay:
    """How much probability the two labels get at the answer position, per side."""
    require(ds, "label_prob")
    mass = ds["label_prob"].sum("option")
    edges = np.linspace(0, 1, 21)
    parts = []
    for s in values(ds["side"]):
        freq, _ = np.histogram(values(mass.sel(side=s)).astype(float), bins=edges)
        parts.append(hv.Histogram((edges, freq), kdims=["probability on the labels"], vdims=["prompts"], label=side_name(s)).opts(
            alpha=0.5, color=MEASURE_COLORS.get(side_name(s), "#444"), tools=["hover"]))
    title = "Probability on the two labels"
    if "label_is_top" in ds:
        title += f" (a label is top-1 in {float(ds['label_is_top'].mean()):.0%})"
    return hv.Overlay(parts).opts(title=title, width=WIDTH, height=HEIGHT, legend_position="top_left")


def prompt_text_view(ds: xr.Dataset, prompts: Sequence[str] | None = None) -> PerPrompt:
    """The text of each pair and what the model chose, following the prompt selector (one HTML text per prompt)."""
    require(ds, "prompt_text")
    prompts = list(prompts) if prompts is not None else [str(p) for p in values(ds["prompt"])]
    index = {str(p): i for i, p in enumerate(values(ds["prompt"]))}
    sides = [str(s) for s in values(ds["side"])]

    def column(name: str) -> np.ndarray | None:
        return values(ds[name].transpose("prompt", ...)) if name in ds else None

    text, chosen, ethical, ld, cat = (column(n) for n in ("prompt_text", "chosen", "ethical_option", "logit_diff",
                                                         "category"))

    def cell(i: int, j: int, side: str) -> str:
        parts = []
        if chosen is not None:
            parts.append(f"chose <b>{html.escape(str(chosen[i, j]))}</b>")
        if ethical is not None:
            parts.append(f"ethical <b>{html.escape(str(ethical[i, j]))}</b>")
        if ld is not None:
            parts.append(f"logit diff {float(ld[i, j]):+.2f}")
        return (f"<div style='flex:1;min-width:0'><h4 style='margin:4px 0'>{side_name(side)}: "
                f"{' · '.join(parts)}</h4><pre style='white-space:pre-wrap;font-size:11px;background:#f6f6f6;"
                f"padding:6px;margin:0;max-height:220px;overflow:auto'>{html.escape(str(text[i, j]))}</pre></div>")

    def body(p: str) -> str:
        i = index.get(p)
        if i is None:
            return f"<div><b>{html.escape(p)}</b>: no decision data</div>"
        c = f" · {html.escape(str(cat[i]))}" if cat is not None else ""
        cells = "".join(cell(i, j, s) for j, s in enumerate(sides))
        return (f"<div style='width:{WIDE - 10}px'><b>{html.escape(p)}</b>{c}"
                f"<div style='display:flex;gap:12px'>{cells}</div></div>")

    texts = [body(p) for p in prompts]
    return PerPrompt(prompts, lambda p: hv.Div(body(p)).opts(width=WIDE, height=290), texts=texts,
                     opts=dict(width=WIDE, height=290))


def figures(ds: xr.Dataset, prompts: Sequence[str] | None = None) -> tuple[list[Figure], list[str]]:
    """The decision figures (figures whose inputs are missing are skipped)."""
    return collect([
        lambda: Figure("decisions_rates", "Ethical choices", ethical_rates(ds), SECTION,
                       note="Which label the model prefers at the answer position (argmax over the label logits). "
                            "These rates mix position and content: a model that always answers '1' is ethical on "
                            "half the prompts of a swapped pair set; the section above separates the two."),
        lambda: Figure("decisions_by_category", "By category", by_category(ds), SECTION),
        lambda: Figure("decisions_label_mass", "Label probability", label_mass(ds), SECTION),
        lambda: Figure("decisions_prompts", "Prompt viewer", prompt_text_view(ds, prompts), SECTION,
                       per_prompt=True),
    ])


# ----------------------------------------------------------------------------------------------
# across models (``nnethics compare``)

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
    from ...verdict import ALL

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


def compare_figures(stores: Stores, relative: bool) -> list:
    """The comparison's decision figures: each model's verdict, its statistics, its ethical choices."""
    return [
        lambda: Figure("compare_verdicts", "Verdicts", verdicts(stores), COMPARISON),
        lambda: Figure("compare_verdict_stats", "Position bias and ethical preference", verdict_stats(stores),
                       COMPARISON),
        lambda: Figure("compare_decisions", "Ethical choices", decision_rates(stores), COMPARISON),
    ]

""""What the model decided": the verdict, position vs content per pair, and the preference per category.

Reads the verdict variables of ``decisions.nc`` (see :mod:`nnethics.verdict`): ``ethical_preference``,
``position_bias``, ``content_sensitive (prompt)``, the ``group`` statistics and the ``verdict`` attr.
"""

from __future__ import annotations

import html

import holoviews as hv
import numpy as np
import xarray as xr

from ._base import HEIGHT, WIDE, WIDTH, Figure, MissingData, collect, require, values

SECTION = "What the model decided"
MEAN_CI = "BCa bootstrap 95% CI"
CATEGORY_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c",
                   "#ccb974", "#64b5cd")


def verdict_div(ds: xr.Dataset) -> hv.Div:
    """The verdict paragraph stored in ``decisions.nc``, with the numbers it rests on."""
    text = ds.attrs.get("verdict")
    if not text:
        raise MissingData("decisions: no verdict attr (file written before the verdict existed; rerun "
                          "'nnethics run --analyses decisions')")
    methods = ds.attrs.get("ci_methods", "")
    body = (f"<div style='font-size:15px;line-height:1.45;max-width:{WIDE - 20}px;background:#f4f6fa;"
            f"border-left:4px solid #4c72b0;padding:10px 14px'>{html.escape(str(text))}</div>"
            f"<p style='font-size:12px;color:#555;margin:4px 0'>Intervals: {html.escape(str(methods))}. "
            "Debiased quantities average the two orders of each pair, so a fixed preference for one position "
            "cancels; see the README's verdict section for the rules behind the wording.</p>")
    return hv.Div(body).opts(width=WIDE, height=230)


def _categories(ds: xr.Dataset) -> np.ndarray:
    cats = values(ds["category"]).astype(str) if "category" in ds else np.full(ds.sizes["prompt"], "")
    return np.where(cats == "", "(none)", cats)


def position_content_scatter(ds: xr.Dataset) -> hv.Overlay:
    """Each pair's logit difference on the base prompt against the counterfactual's, coloured by category.

    On the diagonal (LD_cf = LD_base) the swap changed nothing: the choice follows position only. On the
    anti-diagonal (LD_cf = −LD_base) the choice follows the content only.
    """
    require(ds, "logit_diff", "side")
    base = values(ds["logit_diff"].sel(side="base")).astype(float)
    cf = values(ds["logit_diff"].sel(side="cf")).astype(float)
    prompts = values(ds["prompt"]).astype(str)
    cats = _categories(ds)
    pref = values(ds["ethical_preference"]).astype(float) if "ethical_preference" in ds else np.full(len(base), np.nan)
    sens = values(ds["content_sensitive"]).astype(bool) if "content_sensitive" in ds else np.ones(len(base), bool)
    lim = float(np.nanmax(np.abs(np.concatenate([base, cf, [1.0]])))) * 1.1
    order = sorted(set(cats.tolist()))
    colors = {c: CATEGORY_COLORS[i % len(CATEGORY_COLORS)] for i, c in enumerate(order)}
    parts = [
        hv.Curve(([-lim, lim], [-lim, lim]), "base logit diff", "counterfactual logit diff",
                 label="position only (diagonal)").opts(color="#888", line_dash="dashed", line_width=1.5),
        hv.Curve(([-lim, lim], [lim, -lim]), "base logit diff", "counterfactual logit diff",
                 label="content only (anti-diagonal)").opts(color="#888", line_dash="dotted", line_width=1.5),
    ]
    for c in order:
        m = cats == c
        parts.append(hv.Points((base[m], cf[m], prompts[m], pref[m], np.where(sens[m], "yes", "no")),
                               kdims=["base logit diff", "counterfactual logit diff"],
                               vdims=["prompt", "ethical preference", "content-sensitive"], label=c).opts(
            color=colors[c], size=8, alpha=0.8, tools=["hover"]))
    labels = [str(o) for o in values(ds["option"])] if "option" in ds.coords else ["1", "2"]
    return hv.Overlay(parts).opts(
        title=f"Position vs content: logit diff ('{labels[0]}' − '{labels[-1]}') per pair (n={len(base)})",
        width=WIDTH + 60, height=HEIGHT + 80, xlim=(-lim, lim), ylim=(-lim, lim), legend_position="right",
        show_legend=True)


def group_bars(ds: xr.Dataset) -> hv.Layout:
    """Mean ethical preference and mean position bias per category (and over all pairs) with their CIs; two
    panels, each on its own scale (a bias of logits would flatten a preference of hundredths)."""
    require(ds, "group", "mean_ethical_preference", "mean_position_bias")
    groups = [str(g) for g in values(ds["group"])]
    n = values(ds["n_debiased"]).astype(int)
    labels = [f"{g} (n={k})" for g, k in zip(groups, n)]
    panels = []
    for title, stem, color in (("Ethical preference", "ethical_preference", "#55a868"),
                               ("Position bias", "position_bias", "#8c8c8c")):
        mean = values(ds[f"mean_{stem}"]).astype(float)
        lo = values(ds[f"{stem}_ci_low"]).astype(float)
        hi = values(ds[f"{stem}_ci_high"]).astype(float)
        group = hv.Dimension("group", values=labels)
        bars = hv.Bars((labels, mean, lo, hi), kdims=[group], vdims=["logits", "ci low", "ci high"]).opts(
            color=color, tools=["hover"], xrotation=35 if len(groups) > 4 else 0)
        err = hv.ErrorBars((labels, mean, np.where(np.isfinite(lo), mean - lo, 0.0),
                            np.where(np.isfinite(hi), hi - mean, 0.0)), kdims=[group],
                           vdims=["logits", "neg", "pos"]).opts(line_width=1.5, color="black")
        zero = hv.HLine(0).opts(color="gray", line_dash="dotted", line_width=1)
        sign = "> 0: leans ethical" if stem == "ethical_preference" else "> 0: favours label 1"
        panels.append((bars * err * zero).opts(title=f"{title} by category ({MEAN_CI})", width=WIDTH,
                                               height=HEIGHT + 40, xlabel="", ylabel=f"logits ({sign})"))
    return hv.Layout(panels).cols(2)


def figures(ds: xr.Dataset) -> tuple[list[Figure], list[str]]:
    """The verdict figures (figures whose inputs are missing are skipped)."""
    return collect([
        lambda: Figure("verdict_text", "Verdict", verdict_div(ds), SECTION),
        lambda: Figure("verdict_scatter", "Position or content?", position_content_scatter(ds), SECTION,
                       note="One point per pair. Diagonal: the swap of the options changed nothing (position only); "
                            "anti-diagonal: the choice followed the options (content only). Hover for the prompt."),
        lambda: Figure("verdict_by_category", "Preference by category", group_bars(ds), SECTION,
                       note="ethical preference = mean over both orders of logit(ethical) − logit(other); "
                            "position bias = mean over both orders of logit(label 1) − logit(label 2). n = pairs "
                            "whose counterfactual swaps the ethical label."),
    ])

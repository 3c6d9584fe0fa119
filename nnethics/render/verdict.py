""""What the model decided": the verdict, position vs content per pair, and the preference per category.

Reads the verdict variables of ``decisions.nc`` (see :mod:`nnethics.verdict`): ``ethical_preference``,
``position_bias``, ``content_sensitive (prompt)``, the ``group`` statistics and the ``verdict`` attr.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import holoviews as hv
import numpy as np
import xarray as xr

from ..verdict import finalize_decisions
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


def _pair_arrays(ds: xr.Dataset) -> dict[str, np.ndarray]:
    require(ds, "logit_diff", "side")
    base = values(ds["logit_diff"].sel(side="base")).astype(float)
    cf = values(ds["logit_diff"].sel(side="cf")).astype(float)
    require(ds, "ethical_preference", "position_bias", "content_sensitive")
    return {
        "base": base, "cf": cf, "prompt": values(ds["prompt"]).astype(str), "category": _categories(ds),
        "preference": values(ds["ethical_preference"]).astype(float),
        "bias": values(ds["position_bias"]).astype(float),
        "sensitive": values(ds["content_sensitive"]).astype(bool),
    }


def _category_points(a: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, xlabel: str, ylabel: str) -> list:
    order = sorted(set(a["category"].tolist()))
    parts = []
    for i, c in enumerate(order):
        m = a["category"] == c
        parts.append(hv.Points((x[m], y[m], a["prompt"][m], a["preference"][m], np.where(a["sensitive"][m], "yes", "no")),
                               kdims=[xlabel, ylabel], vdims=["prompt", "ethical preference", "content-sensitive"],
                               label=c).opts(color=CATEGORY_COLORS[i % len(CATEGORY_COLORS)], size=8, alpha=0.8,
                                             tools=["hover"]))
    return parts


def position_content_scatter(ds: xr.Dataset) -> hv.Overlay:
    """Each pair's logit difference on the base prompt against the counterfactual's, coloured by category.

    On the diagonal (LD_cf = LD_base) the swap changed nothing: the choice follows position only. On the
    anti-diagonal (LD_cf = −LD_base) the choice follows the content only.
    """
    a = _pair_arrays(ds)
    xl, yl = "base logit diff", "counterfactual logit diff"
    lim = float(np.nanmax(np.abs(np.concatenate([a["base"], a["cf"], [1.0]])))) * 1.1
    parts = [
        hv.Curve(([-lim, lim], [-lim, lim]), xl, yl, label="position only (diagonal)").opts(
            color="#888", line_dash="dashed", line_width=1.5),
        hv.Curve(([-lim, lim], [lim, -lim]), xl, yl, label="content only (anti-diagonal)").opts(
            color="#888", line_dash="dotted", line_width=1.5),
        *_category_points(a, a["base"], a["cf"], xl, yl),
    ]
    labels = [str(o) for o in values(ds["option"])] if "option" in ds.coords else ["1", "2"]
    return hv.Overlay(parts).opts(
        title=f"Logit diff ('{labels[0]}' − '{labels[-1]}'), base vs counterfactual (n={len(a['base'])} pairs)",
        width=WIDTH, height=HEIGHT + 60, xlim=(-lim, lim), ylim=(-lim, lim), legend_position="bottom_right",
        show_legend=True)


def bias_preference_scatter(ds: xr.Dataset) -> hv.Overlay:
    """The same pairs rotated by 45°: position bias (the mean over both orders) against ethical preference (half
    the difference, signed toward the ethical option); the grey band holds the pairs that are not
    content-sensitive (|preference| < min_gap / 2)."""
    a = _pair_arrays(ds)
    xl, yl = "position bias (logits)", "ethical preference (logits)"
    half = float(ds.attrs.get("min_gap", 0.1)) / 2
    ymax = float(np.nanmax(np.abs(np.concatenate([a["preference"], [half * 2]])))) * 1.15
    band = hv.HSpan(-half, half).opts(color="#bbbbbb", alpha=0.25)
    zero = hv.HLine(0).opts(color="gray", line_dash="dotted", line_width=1)
    n_s = int(a["sensitive"].sum())
    return hv.Overlay([band, zero, *_category_points(a, a["bias"], a["preference"], xl, yl)]).opts(
        title=f"Bias vs preference (grey band: {len(a['bias']) - n_s} of {len(a['bias'])} not content-sensitive)",
        width=WIDTH, height=HEIGHT + 60, ylim=(-ymax, ymax), show_legend=False, xlabel=xl, ylabel=yl)


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
    return hv.Layout(panels).cols(2).opts(shared_axes=False)


def figures(ds: xr.Dataset, prompts: Sequence[str] | None = None) -> tuple[list[Figure], list[str]]:
    """The verdict figures (figures whose inputs are missing are skipped). A ``decisions.nc`` written before the
    verdict existed gets it computed here from its logit differences (the same function ``run`` uses)."""
    if "group" not in ds.dims and all(v in ds for v in ("logit_diff", "ethical_option", "chosen")):
        ds = finalize_decisions(ds)
    return collect([
        lambda: Figure("verdict_text", "Verdict", verdict_div(ds), SECTION),
        lambda: Figure("verdict_scatter", "Position or content?",
                       (position_content_scatter(ds) + bias_preference_scatter(ds)).cols(2).opts(shared_axes=False),
                       SECTION,
                       note="One point per pair. Left: on the diagonal the swap of the options changed nothing "
                            "(position only), on the anti-diagonal the choice followed the options (content only). "
                            "Right: the same pairs rotated, so a small preference under a large bias is visible. "
                            "Hover for the prompt."),
        lambda: Figure("verdict_by_category", "Preference by category", group_bars(ds), SECTION,
                       note="ethical preference = mean over both orders of logit(ethical) − logit(other); "
                            "position bias = mean over both orders of logit(label 1) − logit(label 2). n = pairs "
                            "whose counterfactual swaps the ethical label."),
    ])

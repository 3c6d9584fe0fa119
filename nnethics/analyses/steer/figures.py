"""Steering figures from ``steer.nc``: the render contract.

``mean_preference_change``/``preference_change_ci_low``/``preference_change_ci_high (layer, kind, alpha)``,
``null_low``/``null_high (layer, alpha)``, ``is_null (kind)``; ``mean_patch_effect`` with its CI ``(patch_layer)``.
Six figures: the dose-response per steered layer (each real kind's mean change in ethical preference with its
BCa CI, over the random directions' band), the same for the position bias and for the side effects (KL, label top-1), a
layer x alpha heatmap per kind, and the resid patching curve that chose the default layers."""

from __future__ import annotations

from collections.abc import Sequence

import holoviews as hv
import numpy as np
import xarray as xr

from ... import metrics
from ...render._base import WIDE, WIDTH, Figure, MissingData, band_and_curve, collect, reference_hline, require, values
from .stats import null_range

SECTION = "Steering"
COLORS = {"content": "#1f77b4", "caa": "#d62728", "position": "#7f7f7f"}
PANEL = 250


def _kinds(ds: xr.Dataset) -> list[str]:
    return [str(k) for k, null in zip(values(ds["direction_kind"]), values(ds["is_null"])) if not null]


def _legend(ds: xr.Dataset) -> hv.Overlay:
    """A panel that holds only the legend (inside a panel it would cover curves; beside one it widens its column)."""
    items = [hv.Area(([0.0], [0.0], [0.0]), vdims=["lo", "hi"], label="random (null band)").opts(
        color="#bbbbbb", alpha=0.5, line_alpha=0)]
    items += [hv.Curve(([0.0], [0.0]), label=k).opts(color=COLORS.get(k, "#2ca02c"), line_width=2)
              for k in _kinds(ds)]
    return hv.Overlay(items).opts(width=PANEL, height=PANEL, xaxis=None, yaxis=None, show_frame=False,
                                  legend_position="top_left", title="", toolbar=None)


def _response(ds: xr.Dataset, name: str, ylabel: str, ci: bool) -> hv.Layout:
    """Per steered layer: ``name`` against alpha for each real kind (with its CI band where ``ci``), the random
    directions' band (grey) and zero; the legend in a panel of its own."""
    require(ds, name, "alpha", "is_null")
    alphas = values(ds["alpha"]).astype(float)
    lo, hi = null_range(ds, name)
    panels = [_legend(ds)]
    for j, layer in enumerate(values(ds["layer"]).astype(int)):
        one = ds.sel(layer=layer)
        null = hv.Area((alphas, lo[j], hi[j]), kdims=["alpha"], vdims=["null_lo", "null_hi"],
                       label="random (null band)").opts(color="#bbbbbb", alpha=0.5, line_alpha=0)
        curves = []
        for k in _kinds(ds):
            mean = values(one[name].sel(direction_kind=k)).astype(float)
            band = [values(one[f"preference_change_ci_{e}"].sel(direction_kind=k)).astype(float) for e in
                    ("low", "high")] if ci else [mean, mean]
            curves.append(band_and_curve(alphas, mean, *band, k, COLORS.get(k, "#2ca02c"), kdim="alpha", vdim=name))
        panels.append(hv.Overlay([null, *curves, reference_hline()]).opts(
            title=f"layer {layer}", width=PANEL, height=PANEL, show_legend=False,
            xlabel="alpha (x mean residual norm)", ylabel=ylabel))
    return hv.Layout(panels).cols(4)


def dose_response(ds: xr.Dataset) -> hv.Layout:
    """Per steered layer: mean change in ethical preference against alpha for each kind (BCa CI band), the random
    directions' band (grey) and zero."""
    require(ds, "preference_change_ci_low", "preference_change_ci_high")
    return _response(ds, "mean_preference_change", "change in ethical preference (logit)", ci=True)


def bias_response(ds: xr.Dataset) -> hv.Layout:
    """The same for the mean change in position bias (no CI band: its means only)."""
    return _response(ds, "mean_bias_change", "change in position bias (logit)", ci=False)


def side_effects(ds: xr.Dataset) -> hv.Layout:
    """The mean KL from the unsteered next-token distribution against alpha, per layer and kind, beside the random
    directions' range."""
    return _response(ds, "mean_kl", "mean KL(unsteered || steered) (nats)", ci=False)


def label_top(ds: xr.Dataset) -> hv.Layout:
    """The share of prompts where a label stays the top-1 token against alpha, per layer and kind."""
    return _response(ds, "label_top_share", "share: a label is the top-1 token", ci=False)


def heatmaps(ds: xr.Dataset) -> hv.Layout:
    """Per kind: the mean change in ethical preference over layer x alpha (hover: its CI and the null band)."""
    require(ds, "mean_preference_change", "alpha")
    layers = values(ds["layer"]).astype(int)
    alphas = values(ds["alpha"]).astype(float)
    out = []
    lim = float(np.nanmax(np.abs(values(ds["mean_preference_change"]))) or 1.0)
    for k in _kinds(ds):
        one = ds.sel(direction_kind=k)
        cols = {v: values(one[v].transpose("layer", "alpha")).astype(float).ravel()
                for v in ("mean_preference_change", "preference_change_ci_low", "preference_change_ci_high")}
        nl = values(ds["null_low"].transpose("layer", "alpha")).astype(float).ravel()
        nh = values(ds["null_high"].transpose("layer", "alpha")).astype(float).ravel()
        data = (np.repeat(layers, len(alphas)), np.tile([f"{a:+g}" for a in alphas], len(layers)),
                cols["mean_preference_change"], cols["preference_change_ci_low"], cols["preference_change_ci_high"],
                nl, nh)
        hm = hv.HeatMap(data, kdims=["layer", "alpha"], vdims=[
            hv.Dimension("change", label="mean change (logit)"), hv.Dimension("ci_low", label="CI low"),
            hv.Dimension("ci_high", label="CI high"), hv.Dimension("null_low", label="null low"),
            hv.Dimension("null_high", label="null high")])
        out.append(hm.redim.values(alpha=[f"{a:+g}" for a in alphas]).opts(
            cmap="RdBu_r", clim=(-lim, lim), colorbar=True, tools=["hover"], width=WIDTH // 1 + 40, height=300,
            title=f"{k}: mean change in ethical preference", xlabel="layer", ylabel="alpha"))
    return hv.Layout(out).cols(2)


def crossing(ds: xr.Dataset) -> hv.Overlay:
    """The mean resid patching effect at the decision position per layer, with 0.5 and the steered layers."""
    require(ds, "mean_patch_effect", "patch_effect_ci_low", "patch_effect_ci_high", "patch_layer")
    x = values(ds["patch_layer"]).astype(float)
    curve = band_and_curve(x, values(ds["mean_patch_effect"]), values(ds["patch_effect_ci_low"]),
                           values(ds["patch_effect_ci_high"]), "resid patching", "#1f77b4")
    steered = [hv.VLine(float(la)).opts(color="#ff7f0e", line_dash="dotted") for la in values(ds["layer"])] \
        if "layer" in ds.coords else []
    half = hv.HLine(0.5).opts(color="#999999", line_dash="dashed")
    return hv.Overlay([curve, half, *steered, reference_hline()]).opts(
        width=WIDE, height=300, xlabel="layer", ylabel="mean effect", show_legend=False,
        title="Resid patching at the decision position (dashed: 0.5; dotted: the steered layers)")


def figures(ds: xr.Dataset, prompts: Sequence[str] | None = None) -> tuple[list[Figure], list[str]]:
    """The steering figures (figures whose inputs are missing are skipped)."""
    if "prompt" not in ds.dims:
        raise MissingData("steer: no prompt dim")
    n = ds.sizes["prompt"]
    k = int(values(ds["effect_defined"]).sum()) if "effect_defined" in ds else n
    nulls = int(values(ds["is_null"]).sum()) if "is_null" in ds else 0
    folds = ds.sizes.get("fold_id", "?")
    return collect([
        lambda: Figure("steer_dose_response", "Dose-response per layer", dose_response(ds), SECTION,
                       note=f"Each pair is steered with directions from the other folds ({folds} folds by pair): "
                            "alpha x the layer's mean residual norm x the direction, added after the layer at the "
                            "decision position, toward each side's ethical label (negative alpha: away). y: the mean "
                            f"over the {n} pairs of the change in ethical preference (the mean ethical margin of the "
                            f"two sides) from the unsteered row, {metrics.ci_label('pairs', n)}. Grey: the lowest to "
                            f"highest mean change of {nulls} random directions of the same norm (the null band)."),
        lambda: Figure("steer_bias", "Position bias under the same pushes", bias_response(ds), SECTION,
                       note="The mean change in position bias (the logit difference averaged over the two sides; "
                            "over the pairs that swap the ethical label) at the same layers and alphas: a push "
                            "toward each side's ethical label leaves it unmoved if it acts through the content alone. "
                            "Grey: the random directions' range."),
        lambda: Figure("steer_kl", "Side effect: how far the whole next-token distribution moves",
                       side_effects(ds), SECTION,
                       note="Mean over prompts of KL(unsteered || steered), in nats, of the next-token distribution at "
                            "the decision position; grey: the random directions' range (the same norm)."),
        lambda: Figure("steer_label_top", "Side effect: does a label stay the answer", label_top(ds), SECTION,
                       note="Share of prompts (both sides) whose most likely next token is still one of the two "
                            "labels; grey: the random directions' range."),
        lambda: Figure("steer_heatmap", "Preference change over layer x alpha", heatmaps(ds), SECTION,
                       note="The same means as the dose-response, one heatmap per direction kind; hover for the CI "
                            "and the null band of the cell."),
        lambda: Figure("steer_crossing", "Where patching says the decision arrives", crossing(ds), SECTION,
                       note=f"Mean resid patching effect at the decision position over the {k} of {n} pairs with "
                            f"a normalisable gap, {metrics.ci_label('pairs', k)}; its crossing of 0.5, and 2 "
                            "layers either side, are the default steered layers."),
    ])

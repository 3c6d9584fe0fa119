"""Causal tracing (activation patching) figures from ``patching*.nc`` Datasets.

``patching.nc``: dims prompt, layer, component; ``effect (prompt, layer, component)`` is the change of
the base prompt's logit difference when that component's output at that layer is replaced by the
counterfactual's. ``patching_grid.nc`` / ``patching_noise.nc`` add a ``position`` dim (−1 = last token).
"""

from __future__ import annotations

from typing import Sequence

import holoviews as hv
import numpy as np
import xarray as xr

from ._base import (
    COMPONENT_COLORS,
    HEIGHT,
    WIDE,
    WIDTH,
    Figure,
    MissingData,
    band_and_curve,
    collect,
    empty_curve,
    layers_of,
    mean_ci,
    prompt_map,
    require,
    values,
)

SECTION = "Causal tracing"


def components(ds: xr.Dataset) -> list[str]:
    return [str(c) for c in values(ds["component"])] if "component" in ds.dims else []


def effect_curve(ds: xr.Dataset, var: str = "effect") -> hv.Overlay:
    """Mean ``var`` per layer for each component, with a 95% CI band over prompts.

    Uses the stored ``mean_effect``/``ci_low``/``ci_high (layer, component)`` when present (the
    analysis may use a better interval than the normal approximation), else computes mean ± 1.96·SEM.
    """
    require(ds, var, "layer")
    layers = layers_of(ds)
    stored = var == "effect" and all(v in ds for v in ("mean_effect", "ci_low", "ci_high"))
    parts = []
    comps = components(ds) or [None]
    for comp in comps:
        sel = (lambda v: ds[v].sel(component=comp)) if comp is not None else (lambda v: ds[v])
        if stored:
            mean, lo, hi = sel("mean_effect"), sel("ci_low"), sel("ci_high")
        else:
            mean, lo, hi = mean_ci(sel(var), "prompt")
        label = comp or var
        parts.append(band_and_curve(layers, values(mean.transpose("layer")), values(lo.transpose("layer")),
                                    values(hi.transpose("layer")), label, COMPONENT_COLORS.get(label, "#4c72b0"),
                                    vdim=var))
    zero = hv.HLine(0).opts(color="gray", line_dash="dotted", line_width=1)
    n = ds.sizes.get("prompt", 0)
    return hv.Overlay([*parts, zero]).opts(
        title=f"Mean patching effect by layer ±95% CI (n={n} prompts)", width=WIDTH, height=HEIGHT,
        legend_position="top_left", xlabel="layer", ylabel="effect on logit diff")


def effect_heatmap(ds: xr.Dataset, component: str | None = "resid", var: str = "effect") -> hv.HeatMap:
    """``var`` for every prompt (rows) and layer (columns) of one component."""
    require(ds, var)
    da = ds[var]
    if "component" in da.dims:
        if component not in components(ds):
            raise MissingData(f"patching: no component {component!r}")
        da = da.sel(component=component)
    da = da.transpose("prompt", "layer")
    prompts = [str(p) for p in values(ds["prompt"])]
    layers = layers_of(ds)
    xs = np.tile(layers, len(prompts))
    ys = np.repeat(prompts, len(layers))
    hm = hv.HeatMap((xs, ys, values(da).ravel()), kdims=["layer", "prompt"], vdims=[var])
    height = int(min(900, max(240, 16 * len(prompts) + 90)))
    return hm.opts(cmap="RdBu_r", symmetric=True, colorbar=True, tools=["hover"], width=WIDTH, height=height,
                   title=f"{component or var}: {var} per prompt × layer", invert_yaxis=True,
                   xlabel="layer", ylabel="prompt")


def prompt_view(ds: xr.Dataset, prompts: Sequence[str] | None = None) -> hv.HoloMap:
    """Per-prompt effect curves (one per component) with flipped layers marked; a HoloMap over prompt."""
    require(ds, "effect")
    prompts = list(prompts) if prompts is not None else [str(p) for p in values(ds["prompt"])]
    layers = layers_of(ds)
    comps = components(ds) or [None]

    def frame(p: str) -> hv.Overlay:
        one = ds.sel(prompt=p)
        parts = []
        for comp in comps:
            eff = one["effect"].sel(component=comp) if comp is not None else one["effect"]
            label = comp or "effect"
            color = COMPONENT_COLORS.get(label, "#4c72b0")
            parts.append(hv.Curve((layers, values(eff.transpose("layer")).astype(float)), "layer", "effect",
                                  label=label).opts(color=color, line_width=2, tools=["hover"]))
            if "flipped" in one:
                fl = one["flipped"].sel(component=comp) if comp is not None else one["flipped"]
                mask = values(fl.transpose("layer")).astype(bool)
                parts.append(hv.Scatter((layers[mask], values(eff.transpose("layer"))[mask].astype(float)),
                                        "layer", "effect", label=label).opts(
                    color=color, size=9, marker="diamond", show_legend=False))
        title = p
        if "base_logit_diff" in one and "cf_logit_diff" in one:
            b, c = float(one["base_logit_diff"]), float(one["cf_logit_diff"])
            title = f"{p}: base logit diff {b:+.2f}, counterfactual {c:+.2f} (◆ = decision flipped)"
            parts.append(hv.HLine(c - b).opts(color="black", line_dash="dashed", line_width=1))
        parts.append(hv.HLine(0).opts(color="gray", line_dash="dotted", line_width=1))
        return hv.Overlay(parts).opts(title=title)

    return prompt_map(prompts, frame, [str(p) for p in values(ds["prompt"])],
                      empty_curve("not patched", "layer", "effect"), width=WIDE, height=HEIGHT,
                      legend_position="top_left", xlabel="layer", ylabel="effect on logit diff")


def _position_effect(ds: xr.Dataset, var: str = "effect") -> xr.DataArray:
    require(ds, var, "position")
    if "position" not in ds[var].dims:
        raise MissingData(f"{ds.attrs.get('analysis', 'patching')}: {var} has no position dim")
    return ds[var]


def position_heatmap(ds: xr.Dataset, component: str | None = None, var: str = "effect", title: str = "") -> hv.HeatMap:
    """Mean ``var`` over prompts for each token position (rows, −1 = last) and layer: the ROME picture."""
    da = _position_effect(ds, var)
    if "component" in da.dims:
        comp = component if component is not None else str(values(ds["component"])[0])
        da = da.sel(component=comp)
        title = title or f"{comp}: mean {var} by token position × layer"
    da = da.mean("prompt") if "prompt" in da.dims else da
    da = da.transpose("position", "layer")
    pos = values(ds["position"]).astype(int)
    layers = layers_of(ds)
    xs = np.tile(layers, len(pos))
    ys = np.repeat([f"{p:+d}" if p < 0 else str(p) for p in pos], len(layers))
    hm = hv.HeatMap((xs, ys, values(da).ravel().astype(float)), kdims=["layer", "position"], vdims=[var])
    height = int(min(700, max(220, 22 * len(pos) + 90)))
    order = sorted(set(ys), key=lambda s: int(s))
    return hm.redim.values(position=order).opts(
        cmap="Reds" if float(np.nanmin(values(da))) >= 0 else "RdBu_r",
        symmetric=float(np.nanmin(values(da))) < 0, colorbar=True, tools=["hover"], width=WIDTH, height=height,
        invert_yaxis=True,
        title=title or f"mean {var} by token position × layer", xlabel="layer", ylabel="token position (−1 = last)")


def atp_scatter(ds: xr.Dataset) -> hv.Overlay:
    """Exact patching effect against its attribution-patching (gradient) estimate, one point per cell."""
    require(ds, "effect", "atp_effect")
    parts = []
    lo, hi = np.inf, -np.inf
    comps = components(ds) or [None]
    stats = []
    for comp in comps:
        e = ds["effect"].sel(component=comp) if comp is not None else ds["effect"]
        a = ds["atp_effect"].sel(component=comp) if comp is not None else ds["atp_effect"]
        x, y = values(e).ravel().astype(float), values(a.transpose(*e.dims)).ravel().astype(float)
        ok = np.isfinite(x) & np.isfinite(y)
        x, y = x[ok], y[ok]
        if not x.size:
            continue
        lo, hi = min(lo, x.min(), y.min()), max(hi, x.max(), y.max())
        r = float(np.corrcoef(x, y)[0, 1]) if x.size > 2 and x.std() > 0 and y.std() > 0 else float("nan")
        stats.append(f"{comp or 'effect'} r={r:.2f}")
        label = comp or "effect"
        parts.append(hv.Scatter((x, y), "exact effect", "attribution-patching estimate", label=label).opts(
            color=COMPONENT_COLORS.get(label, "#4c72b0"), alpha=0.6, size=5, tools=["hover"]))
    if not parts:
        raise MissingData("patching: no finite effect/atp_effect values")
    diag = hv.Curve(([lo, hi], [lo, hi]), "exact effect", "attribution-patching estimate").opts(
        color="gray", line_dash="dashed", line_width=1)
    return hv.Overlay([*parts, diag]).opts(title="Exact vs attribution patching (" + ", ".join(stats) + ")",
                                           width=WIDTH, height=HEIGHT, legend_position="top_left")


def _per_prompt(ds: xr.Dataset, var: str) -> np.ndarray:
    require(ds, var)
    da = ds[var]
    if "component" in da.dims:
        da = da.sel(component="resid" if "resid" in components(ds) else components(ds)[0])
    return values(da).astype(float).ravel()


def summary_histograms(ds: xr.Dataset) -> hv.Layout:
    """The seed's per-prompt summaries: peak layer, number of layers that flip the decision, Gini."""
    plots = []
    n_layers = ds.sizes.get("layer", 1)
    if "peak_layer" in ds:
        v = _per_prompt(ds, "peak_layer")
        freq, edges = np.histogram(v[np.isfinite(v)], bins=np.arange(-0.5, n_layers + 0.5))
        plots.append(hv.Histogram((edges, freq), kdims=["peak layer"], vdims=["prompts"]).opts(title="Peak layer", color="#a23b72"))
    if "num_choice_flips" in ds:
        v = _per_prompt(ds, "num_choice_flips")
        top = int(np.nanmax(v)) if np.isfinite(v).any() else 0
        freq, edges = np.histogram(v[np.isfinite(v)], bins=np.arange(-0.5, top + 1.5))
        plots.append(hv.Histogram((edges, freq), kdims=["layers that flip the choice"], vdims=["prompts"]).opts(
            title="Choice flips", color="#f18f01"))
    if "gini_coefficient" in ds:
        v = _per_prompt(ds, "gini_coefficient")
        freq, edges = np.histogram(v[np.isfinite(v)], bins=np.linspace(0, 1, 11))
        plots.append(hv.Histogram((edges, freq), kdims=["Gini coefficient"], vdims=["prompts"]).opts(
            title="Concentration of effects (Gini)", color="#9b59b6"))
    if not plots:
        raise MissingData("patching: no per-prompt summaries (peak_layer, num_choice_flips, gini_coefficient)")
    return hv.Layout([p.opts(width=340, height=260, tools=["hover"]) for p in plots]).cols(3)


def figures(ds: xr.Dataset, prompts: Sequence[str] | None = None) -> tuple[list[Figure], list[str]]:
    """The causal-tracing figures of ``patching.nc`` (figures whose inputs are missing are skipped)."""
    def heatmaps() -> list[Figure]:
        comps = components(ds) or [None]
        return [Figure(f"patching_heatmap_{c or 'effect'}", f"{c or 'effect'}: effect per prompt × layer",
                       effect_heatmap(ds, c), SECTION) for c in comps]

    return collect([
        lambda: Figure("patching_mean_effect", "Mean effect by layer", effect_curve(ds), SECTION,
                       note="Change of the base prompt's logit difference (label 1 − label 2) when one "
                            "component's output at one layer (last token) comes from the counterfactual prompt."),
        heatmaps,
        lambda: Figure("patching_per_prompt", "Per-prompt effect", prompt_view(ds, prompts), SECTION,
                       per_prompt=True),
        lambda: Figure("patching_summary", "Per-prompt summaries", summary_histograms(ds), SECTION),
        lambda: Figure("patching_atp", "Exact vs attribution patching", atp_scatter(ds), SECTION),
    ])


def position_figures(ds: xr.Dataset, kind: str) -> tuple[list[Figure], list[str]]:
    """Position × layer heatmaps of ``patching_grid.nc`` (kind 'grid') or ``patching_noise.nc`` ('noise')."""
    what = "noise restoration" if kind == "noise" else "grid patching"

    def maps() -> list[Figure]:
        da = _position_effect(ds)
        comps = [str(c) for c in values(ds["component"])] if "component" in da.dims else [None]
        out = []
        for c in comps:
            title = f"{what}: mean effect by position × layer" + (f" ({c})" if c else "")
            out.append(Figure(f"patching_{kind}_{c or 'effect'}", title, position_heatmap(ds, c, title=title),
                              SECTION))
        return out

    return collect([maps])

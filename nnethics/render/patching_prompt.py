"""Per-prompt patching pictures: each prompt's patched logit difference by layer, the exact effect against
its attribution-patching estimate, and histograms of the per-prompt summaries (peak layer, flips, Gini)."""

from __future__ import annotations

from collections.abc import Sequence

import holoviews as hv
import numpy as np
import xarray as xr

from ._base import (
    COMPONENT_COLORS,
    HEIGHT,
    WIDE,
    WIDTH,
    MissingData,
    empty_curve,
    layers_of,
    prompt_map,
    reference_hline,
    require,
    values,
)
from .patching_effect import components, effect_label, ends


def prompt_view(ds: xr.Dataset, prompts: Sequence[str] | None = None) -> hv.HoloMap:
    """Per prompt: the patched run's logit difference at every layer, one curve per component, against
    the unpatched base and counterfactual logit differences, with the layers that flip the decision
    marked (◆); a HoloMap over prompt. Falls back to ``effect`` when ``patched_logit_diff`` is absent."""
    var = "patched_logit_diff" if "patched_logit_diff" in ds else "effect"
    require(ds, var)
    prompts = list(prompts) if prompts is not None else [str(p) for p in values(ds["prompt"])]
    layers = layers_of(ds)
    comps = components(ds) or [None]
    pair = ends(ds) if var == "patched_logit_diff" else None
    ylabel = "logit diff ('1' − '2')" if var == "patched_logit_diff" else effect_label(ds)

    def frame(p: str) -> hv.Overlay:
        one = ds.sel(prompt=p)
        parts = [reference_hline(0)]
        title = p
        if pair is not None:
            recv, src = float(one[pair[0]]), float(one[pair[1]])
            names = ("noised", "clean") if pair[0] == "corrupted_logit_diff" else ("base", "counterfactual")
            parts += [hv.HLine(recv).opts(color="#555555", line_dash="dashed", line_width=1),
                      hv.HLine(src).opts(color="black", line_dash="dotdash", line_width=1.5)]
            title = (f"{p}: logit diff when patched; {names[0]} {recv:+.2f} (dashed), "
                     f"{names[1]} {src:+.2f} (dot-dash), ◆ = decision flipped")
        for comp in comps:
            v = one[var].sel(component=comp) if comp is not None else one[var]
            y = values(v.transpose("layer")).astype(float)
            label = comp or var
            color = COMPONENT_COLORS.get(label, "#4c72b0")
            parts.append(hv.Curve((layers, y), "layer", ylabel, label=label).opts(color=color, line_width=2,
                                                                                  tools=["hover"]))
            mask = np.zeros(len(layers), bool)
            if "flipped" in one:
                fl = one["flipped"].sel(component=comp) if comp is not None else one["flipped"]
                mask = values(fl.transpose("layer")).astype(bool)
            parts.append(hv.Scatter((layers[mask], y[mask]), "layer", ylabel, label=label).opts(
                color=color, size=9, marker="diamond", show_legend=False))
        return hv.Overlay(parts).opts(title=title)

    return prompt_map(prompts, frame, [str(p) for p in values(ds["prompt"])],
                      empty_curve("not patched", "layer", ylabel), width=WIDE, height=HEIGHT,
                      legend_position="top_left", xlabel="layer", ylabel=ylabel)


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
    return hv.Overlay([*parts, diag]).opts(title="Exact vs AtP estimate (" + ", ".join(stats) + ")",
                                           width=WIDTH, height=HEIGHT, legend_position="top_left")


def _per_prompt(ds: xr.Dataset, var: str) -> np.ndarray:
    require(ds, var)
    da = ds[var]
    if "component" in da.dims:
        da = da.sel(component="resid" if "resid" in components(ds) else components(ds)[0])
    return values(da).astype(float).ravel()


def _one_bin_note(freq: np.ndarray, edges: np.ndarray, what: str) -> str:
    """A title suffix when every prompt falls in one bin (the histogram then shows a single bar)."""
    nz = np.flatnonzero(freq)
    if len(nz) != 1:
        return ""
    centre = (edges[nz[0]] + edges[nz[0] + 1]) / 2
    value = f"{centre:g}" if float(centre).is_integer() else f"{edges[nz[0]]:g}–{edges[nz[0] + 1]:g}"
    return f": all {int(freq.sum())} prompts at {(what + ' ') if what else ''}{value}"


def summary_histograms(ds: xr.Dataset) -> hv.Layout:
    """The seed's per-prompt summaries of the residual stream: peak layer, number of layers that flip the
    decision, Gini. A panel whose prompts all fall in one bin says so in its title (for the residual at the last
    position the peak is the last layer by construction: there the patched state is the counterfactual's output)."""
    plots = []
    n_layers = ds.sizes.get("layer", 1)
    if "peak_layer" in ds:
        v = _per_prompt(ds, "peak_layer")
        freq, edges = np.histogram(v[np.isfinite(v)], bins=np.arange(-0.5, n_layers + 0.5))
        note = _one_bin_note(freq, edges, "layer")
        if note and int(np.flatnonzero(freq)[0]) == n_layers - 1:
            note += " (by construction)"
        plots.append(hv.Histogram((edges, freq), kdims=["peak layer"], vdims=["prompts"]).opts(
            title="Peak layer" + note, color="#a23b72"))
    if "num_choice_flips" in ds:
        v = _per_prompt(ds, "num_choice_flips")
        top = int(np.nanmax(v)) if np.isfinite(v).any() else 0
        freq, edges = np.histogram(v[np.isfinite(v)], bins=np.arange(-0.5, top + 1.5))
        plots.append(hv.Histogram((edges, freq), kdims=["layers that flip the choice"], vdims=["prompts"]).opts(
            title="Choice flips" + _one_bin_note(freq, edges, ""), color="#f18f01"))
    if "gini_coefficient" in ds:
        v = _per_prompt(ds, "gini_coefficient")
        freq, edges = np.histogram(v[np.isfinite(v)], bins=np.linspace(0, 1, 11))
        plots.append(hv.Histogram((edges, freq), kdims=["Gini coefficient"], vdims=["prompts"]).opts(
            title="Concentration (Gini)" + _one_bin_note(freq, edges, "Gini"), color="#9b59b6"))
    if not plots:
        raise MissingData("patching: no per-prompt summaries (peak_layer, num_choice_flips, gini_coefficient)")
    return hv.Layout([p.opts(width=340, height=260, tools=["hover"]) for p in plots]).cols(3)

"""Per-prompt patching pictures: each prompt's patched logit difference by layer, the exact effect against
its attribution-patching estimate, and histograms of the per-prompt summaries (peak layer, flips, Gini)."""

from __future__ import annotations

from collections.abc import Sequence

import holoviews as hv
import numpy as np
import xarray as xr

from ...render._base import (
    COMPONENT_COLORS,
    HEIGHT,
    WIDE,
    WIDTH,
    MissingData,
    empty_curve,
    frame_limits,
    layers_of,
    reference_hline,
    reindexed,
    require,
    row_limits,
    values,
)
from ...render.carrier import PerPrompt
from .figures_effect import components, effect_label, ends


def prompt_view(ds: xr.Dataset, prompts: Sequence[str] | None = None) -> PerPrompt:
    """Per prompt: the patched run's logit difference at every layer, one curve per component, against
    the unpatched base and counterfactual logit differences, with the layers that flip the decision
    marked (◆); carried once per prompt (:class:`PerPrompt`). Falls back to ``effect`` when
    ``patched_logit_diff`` is absent.

    Long because the one-prompt frame, the template and the vectorised carried arrays must describe the same
    elements in the same order; kept in one place so they stay in step."""
    var = "patched_logit_diff" if "patched_logit_diff" in ds else "effect"
    require(ds, var)
    prompts = list(prompts) if prompts is not None else [str(p) for p in values(ds["prompt"])]
    layers = layers_of(ds)
    comps = components(ds) or [None]
    pair = ends(ds) if var == "patched_logit_diff" else None
    ylabel = "logit diff ('1' − '2')" if var == "patched_logit_diff" else effect_label(ds)
    names = ("noised", "clean") if pair is not None and pair[0] == "corrupted_logit_diff" else ("base", "counterfactual")
    have = {str(p) for p in values(ds["prompt"])}
    opts = dict(width=WIDE, height=HEIGHT, legend_position="top_left", xlabel="layer", ylabel=ylabel)
    span = float(layers.max() - layers.min()) or 1.0
    xlim = (float(layers.min()) - 0.05 * span, float(layers.max()) + 0.05 * span)

    def title(p: str, recv: float, src: float) -> str:
        if not np.isfinite(recv):
            return f"{p}: not patched"
        if pair is None:
            return p
        return (f"{p}: logit diff when patched; {names[0]} {recv:+.2f} (dashed), "
                f"{names[1]} {src:+.2f} (dot-dash), ◆ = decision flipped")

    def overlay(lines: tuple[float, float], ys: list[np.ndarray], marks: list[np.ndarray], full: bool) -> hv.Overlay:
        parts = [reference_hline(0)]
        if pair is not None:
            parts += [hv.HLine(lines[0]).opts(color="#555555", line_dash="dashed", line_width=1),
                      hv.HLine(lines[1]).opts(color="black", line_dash="dotdash", line_width=1.5)]
        for comp, y, mask in zip(comps, ys, marks):
            label = comp or var
            color = COMPONENT_COLORS.get(label, "#4c72b0")
            parts.append(hv.Curve((layers, y), "layer", ylabel, label=label).opts(color=color, line_width=2,
                                                                                  tools=["hover"]))
            pts = (layers, np.where(mask, y, np.nan)) if full else (layers[mask], y[mask])
            parts.append(hv.Scatter(pts, "layer", ylabel, label=label).opts(
                color=color, size=9, marker="diamond", show_legend=False))
        return hv.Overlay(parts)

    def frame(p: str) -> hv.Overlay:
        if p not in have:
            return frame_limits(empty_curve("not patched", "layer", ylabel)(p), xlim, **opts)
        one = ds.sel(prompt=p)
        lines = (float(one[pair[0]]), float(one[pair[1]])) if pair is not None else (0.0, 0.0)
        ys, marks = [], []
        for comp in comps:
            v = one[var].sel(component=comp) if comp is not None else one[var]
            ys.append(values(v.transpose("layer")).astype(float))
            fl = (one["flipped"].sel(component=comp) if comp is not None else one["flipped"]) if "flipped" in one \
                else None
            marks.append(values(fl.transpose("layer")).astype(bool) if fl is not None else np.zeros(len(layers), bool))
        return frame_limits(overlay(lines, ys, marks, False).opts(title=title(p, *lines) if pair else p), xlim,
                            **opts)

    dims = ("component", "layer") if comps[0] is not None else ("layer",)
    y = reindexed(ds[var], prompts, *dims).reshape(len(prompts), len(comps), len(layers))
    fl = reindexed(ds["flipped"], prompts, *dims).reshape(y.shape) if "flipped" in ds else np.zeros(y.shape)
    marks = np.where(fl == 1, y, np.nan)
    lines = [reindexed(ds[v], prompts) for v in pair] if pair is not None else [np.zeros(len(prompts))] * 2
    present = np.array([p in have for p in prompts])
    titles = [title(p, a if ok else np.nan, b) if pair or not ok else p
              for p, a, b, ok in zip(prompts, *lines, present)]
    first = next((i for i, ok in enumerate(present) if ok), 0)
    template = overlay((lines[0][first], lines[1][first]), list(y[first]), list(fl[first] == 1), True)
    base = 3 if pair is not None else 1  # reference line (+ the two ends) come first
    columns = {}
    for c in range(len(comps)):
        columns[(base + 2 * c, ylabel)] = y[:, c]
        columns[(base + 2 * c + 1, ylabel)] = marks[:, c]
    spans = {1: lines[0], 2: lines[1]} if pair is not None else {}
    limits = row_limits(np.concatenate([y.reshape(len(prompts), -1), *(ln[:, None] for ln in lines)], 1)
                        if pair is not None else y)
    return PerPrompt(prompts, frame, template, columns, spans, titles, limits, opts={**opts, "xlim": xlim})


#: Points drawn per component in the AtP scatter; above, a seeded random sample of cells (r stays over all).
#: 1,000 pairs x 30 layers drew 3 x 29,970 circles: 4.4 s of the report's open time in headless Chromium.
ATP_POINTS_MAX = 4000


def thin(n: int, k: int | None = None, seed: int = 0) -> np.ndarray:
    """Indices of at most ``k`` (:data:`ATP_POINTS_MAX`) of ``n`` points: all, or a seeded random sample in order."""
    k = ATP_POINTS_MAX if k is None else k
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def atp_scatter(ds: xr.Dataset) -> hv.Overlay:
    """Exact patching effect against its attribution-patching (gradient) estimate, one point per cell (over
    :data:`ATP_POINTS_MAX` cells per component: a random sample of them, named in the title)."""
    require(ds, "effect", "atp_effect")
    sampled = []
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
        keep = thin(x.size)
        if keep.size < x.size:
            sampled.append(f"{keep.size:,} of {x.size:,}")
        x, y = x[keep], y[keep]
        parts.append(hv.Scatter((x, y), "exact effect", "attribution-patching estimate", label=label).opts(
            color=COMPONENT_COLORS.get(label, "#4c72b0"), alpha=0.6, size=5, tools=["hover"]))
    if not parts:
        raise MissingData("patching: no finite effect/atp_effect values")
    diag = hv.Curve(([lo, hi], [lo, hi]), "exact effect", "attribution-patching estimate").opts(
        color="gray", line_dash="dashed", line_width=1)
    shown = f"\nrandom sample of cells drawn ({', '.join(sampled)} per component); r over all" if sampled else ""
    return hv.Overlay([*parts, diag]).opts(title="Exact vs AtP estimate (" + ", ".join(stats) + ")" + shown,
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

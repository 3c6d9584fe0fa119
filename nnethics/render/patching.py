"""Causal tracing (activation patching) figures from ``patching*.nc`` Datasets.

``patching.nc``: dims prompt, layer, component; ``effect (prompt, layer, component)`` is the change of
the base prompt's logit difference when that component's output at that layer is replaced by the
counterfactual's. The grid variants (``patching_grid.nc``, ``patching_noise_grid.nc``) add a ``position``
dim (−1 = last token); ``patching_noise*.nc`` restore clean states into a noised run (ROME).
"""

from __future__ import annotations

from collections.abc import Sequence

import holoviews as hv
import numpy as np
import xarray as xr

from .. import metrics
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
    fix_limits,
    layers_of,
    mean_ci,
    prompt_map,
    reference_hline,
    require,
    values,
)

SECTION = "Causal tracing"


def components(ds: xr.Dataset) -> list[str]:
    return [str(c) for c in values(ds["component"])] if "component" in ds.dims else []


CI_NAMES = (("effect_ci_low", "effect_ci_high"), ("ci_low", "ci_high"))


def _ends(ds: xr.Dataset) -> tuple[str, str] | None:
    """(receiver, source) logit-difference variables: the run patched into and the run patched from."""
    if "corrupted_logit_diff" in ds and "base_logit_diff" in ds:  # noise: clean states restored into the noised run
        return "corrupted_logit_diff", "base_logit_diff"
    if "base_logit_diff" in ds and "cf_logit_diff" in ds:
        return "base_logit_diff", "cf_logit_diff"
    return None


def effect_kind(ds: xr.Dataset) -> str | None:
    """'normalized' when ``effect`` = (patched − receiver) / (source − receiver), 'raw' when it is
    patched − receiver (in logit-difference units), None when that cannot be told from the file."""
    ends = _ends(ds)
    if ends is None or "effect" not in ds or "patched_logit_diff" not in ds:
        return None
    eff = ds["effect"].astype(float)
    patched = ds["patched_logit_diff"].astype(float).transpose(*eff.dims)
    recv, src = ds[ends[0]].astype(float), ds[ends[1]].astype(float)
    ok = np.isfinite(values(eff))
    if not ok.any():
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = values(((patched - recv) / (src - recv)).transpose(*eff.dims))
    raw = values((patched - recv).transpose(*eff.dims))
    e = values(eff)
    if np.allclose(e[ok], norm[ok], rtol=1e-3, atol=1e-4):
        return "normalized"
    if np.allclose(e[ok], raw[ok], rtol=1e-3, atol=1e-4):
        return "raw"
    return None


def effect_label(ds: xr.Dataset) -> str:
    return {"normalized": "effect (1 = counterfactual's logit diff)",
            "raw": "change of logit diff"}.get(effect_kind(ds) or "", "effect")


BOOTSTRAP_CI = "percentile bootstrap 95% CI over pairs"
NORMAL_CI = "normal-approximation 95% CI (mean ± 1.96 SEM)"
UNDEFINED_COLOR = "#c8c8c8"


def effect_curve(ds: xr.Dataset, var: str = "effect", ci: str = "normal", title: str | None = None) -> hv.Overlay:
    """Mean ``var`` per layer for each component, with a 95% CI band over prompts.

    Uses the stored ``mean_effect`` and ``effect_ci_low``/``effect_ci_high`` (or ``ci_low``/``ci_high``)
    ``(layer, component)`` when present (a percentile bootstrap), else computes the CI over the prompts where
    ``var`` is defined: mean ± 1.96·SEM with ``ci="normal"``, the same percentile bootstrap with
    ``ci="bootstrap"``. The title names the method and the number of prompts behind the mean.
    """
    require(ds, var, "layer")
    layers = layers_of(ds)
    stored_ci = next((names for names in CI_NAMES if all(n in ds for n in names)), None)
    stored = var == "effect" and "mean_effect" in ds and stored_ci is not None
    method = BOOTSTRAP_CI if stored and stored_ci[0] == "effect_ci_low" else (
        "stored 95% CI" if stored else BOOTSTRAP_CI if ci == "bootstrap" else NORMAL_CI)
    parts = []
    comps = components(ds) or [None]
    for comp in comps:
        def sel(v: str, comp: str | None = comp) -> xr.DataArray:
            return ds[v].sel(component=comp) if comp is not None and "component" in ds[v].dims else ds[v]

        if stored:
            mean, lo, hi = sel("mean_effect"), sel(stored_ci[0]), sel(stored_ci[1])
        elif ci == "bootstrap":
            da = sel(var).transpose("prompt", "layer")
            m, a, b = metrics.bootstrap_ci(values(da).astype(float), axis=0)
            mean, lo, hi = (xr.DataArray(x, dims=["layer"]) for x in (m, a, b))
        else:
            mean, lo, hi = mean_ci(sel(var), "prompt")
        label = comp or var
        parts.append(band_and_curve(layers, values(mean.transpose("layer")), values(lo.transpose("layer")),
                                    values(hi.transpose("layer")), label, COMPONENT_COLORS.get(label, "#4c72b0"),
                                    vdim=var))
    zero = hv.HLine(0).opts(color="gray", line_dash="dotted", line_width=1)
    n = ds.sizes.get("prompt", 0)
    defined = int(np.isfinite(values(ds[var])).reshape(n, -1).any(1).sum()) if n else 0
    count = f"n={n} prompts" if defined == n else f"n={defined} of {n} prompts defined"
    return hv.Overlay([*parts, zero]).opts(
        title=title or f"Mean patching effect, {method} ({count})", width=WIDTH, height=HEIGHT,
        legend_position="top_left", xlabel="layer", ylabel=effect_label(ds) if var == "effect" else var)


def effect_heatmap(ds: xr.Dataset, component: str | None = "resid", var: str = "effect",
                   title: str | None = None) -> hv.HeatMap:
    """``var`` for every prompt (rows) and layer (columns) of one component; undefined (NaN) cells grey."""
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
    undefined = int((~np.isfinite(values(da))).all(1).sum())
    note = f"; grey = undefined ({undefined} prompts)" if undefined else ""
    return hm.opts(cmap="RdBu_r", symmetric=True, colorbar=True, tools=["hover"], width=WIDTH, height=height,
                   clipping_colors={"NaN": UNDEFINED_COLOR},
                   title=title or f"{component or var}: {var} per prompt × layer{note}", invert_yaxis=True,
                   xlabel="layer", ylabel="prompt")


def _delta(ds: xr.Dataset) -> xr.Dataset | None:
    """``ds`` with ``delta`` = patched − receiver logit difference (logits), or None without the inputs."""
    ends = _ends(ds)
    if ends is None or "patched_logit_diff" not in ds:
        return None
    out = ds.copy()
    out["delta"] = ds["patched_logit_diff"].astype(float) - ds[ends[0]].astype(float)
    return out


def _gap_name(ds: xr.Dataset) -> str:
    return "clean − noised" if _ends(ds) == ("corrupted_logit_diff", "base_logit_diff") else "cf − base"


def views(ds: xr.Dataset) -> dict[str, tuple[xr.Dataset, str]]:
    """The selectable views of a patching file: normalised effect over the pairs where it is defined, and the
    absolute change of the logit difference (logits) over those pairs and over all pairs.
    Returns ``{key: (dataset, variable)}``; keys name the pairs and their count."""
    n = ds.sizes["prompt"]
    ok = values(ds["effect_defined"]).astype(bool) if "effect_defined" in ds else \
        np.isfinite(values(ds["effect"])).reshape(n, -1).any(1)
    k = int(ok.sum())
    who = "content-sensitive pairs" if _gap_name(ds) == "cf − base" else "pairs with a normalisable gap"
    out = {f"normalised effect, {who} (n={k} of {n})": (ds, "effect")}
    d = _delta(ds)
    if d is not None:
        out[f"change of logit diff (logits), {who} (n={k} of {n})"] = (d.isel(prompt=np.flatnonzero(ok)), "delta")
        out[f"change of logit diff (logits), all pairs (n={n})"] = (d, "delta")
    return out


def effect_views(ds: xr.Dataset) -> hv.HoloMap | hv.Overlay:
    """:func:`effect_curve` for each of :func:`views` (a HoloMap with a "view" selector)."""
    frames = {}
    for key, (sub, var) in views(ds).items():
        if not sub.sizes["prompt"]:
            continue
        what = "Mean normalised effect" if var == "effect" else "Mean change of the logit difference"
        frames[key] = effect_curve(sub, var, ci="bootstrap", title=f"{what}, {BOOTSTRAP_CI} ({key.split(', ', 1)[1]})"
                                   ).opts(width=WIDE)
    if not frames:
        raise MissingData("patching: no prompt to average")
    if len(frames) == 1:
        return next(iter(frames.values()))
    return hv.HoloMap(fix_limits(frames, shared_y=False), kdims=["view"], sort=False)


def heatmap_views(ds: xr.Dataset, component: str | None) -> hv.HoloMap | hv.HeatMap:
    """:func:`effect_heatmap` for each of :func:`views`; the normalised view keeps every prompt (undefined ones
    grey), so the reader sees which pairs the mean leaves out."""
    frames = {}
    for key, (sub, var) in views(ds).items():
        if var == "effect":
            sub = ds
        if not sub.sizes["prompt"]:
            continue
        what = "normalised effect (grey: undefined)" if var == "effect" else "change of logit diff (logits)"
        frames[key] = effect_heatmap(sub.rename({var: "value"}), component, "value",
                                     title=f"{component or 'effect'}: {what}")
    if len(frames) == 1:
        return next(iter(frames.values()))
    frames = {k: v.opts(framewise=True) for k, v in frames.items()}  # each view its own colour range
    return hv.HoloMap(frames, kdims=["view"], sort=False)


def prompt_view(ds: xr.Dataset, prompts: Sequence[str] | None = None) -> hv.HoloMap:
    """Per prompt: the patched run's logit difference at every layer, one curve per component, against
    the unpatched base and counterfactual logit differences, with the layers that flip the decision
    marked (◆); a HoloMap over prompt. Falls back to ``effect`` when ``patched_logit_diff`` is absent."""
    var = "patched_logit_diff" if "patched_logit_diff" in ds else "effect"
    require(ds, var)
    prompts = list(prompts) if prompts is not None else [str(p) for p in values(ds["prompt"])]
    layers = layers_of(ds)
    comps = components(ds) or [None]
    ends = _ends(ds) if var == "patched_logit_diff" else None
    ylabel = "logit diff ('1' − '2')" if var == "patched_logit_diff" else effect_label(ds)

    def frame(p: str) -> hv.Overlay:
        one = ds.sel(prompt=p)
        parts = [reference_hline(0)]
        title = p
        if ends is not None:
            recv, src = float(one[ends[0]]), float(one[ends[1]])
            names = ("noised", "clean") if ends[0] == "corrupted_logit_diff" else ("base", "counterfactual")
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


def averaging_note(ds: xr.Dataset) -> str:
    """Over how many pairs the normalised effect is averaged, and why the others are left out."""
    n = ds.sizes["prompt"]
    if "effect_defined" not in ds:
        return f"Averaged over the {n} pairs of the file."
    k = int(values(ds["effect_defined"]).sum())
    gap = _gap_name(ds)
    desc = str(ds["effect_defined"].attrs.get("description", ""))
    min_gap = desc.split("min_gap = ")[-1] if "min_gap = " in desc else "min_gap"
    return (f"The normalised effect (patched − base) / ({gap}) is averaged over the {k} of {n} pairs whose |{gap}| "
            f"is at least {min_gap} logits; the other {n - k} are left out because dividing by a smaller gap "
            f"amplifies noise. The 'view' selector shows the absolute change of the logit difference instead, over "
            f"those pairs or over all {n}.")


def figures(ds: xr.Dataset, prompts: Sequence[str] | None = None) -> tuple[list[Figure], list[str]]:
    """The causal-tracing figures of ``patching.nc`` (figures whose inputs are missing are skipped)."""
    def heatmaps() -> list[Figure]:
        comps = components(ds) or [None]
        return [Figure(f"patching_heatmap_{c or 'effect'}", f"{c or 'effect'}: effect per prompt × layer",
                       heatmap_views(ds, c), SECTION) for c in comps]

    return collect([
        lambda: Figure("patching_mean_effect", "Mean effect by layer", effect_views(ds), SECTION,
                       note="Patching one component's output at one layer (last token) from the counterfactual "
                            "run into the base run. " + averaging_note(ds)),
        heatmaps,
        lambda: Figure("patching_per_prompt", "Per-prompt effect", prompt_view(ds, prompts), SECTION,
                       per_prompt=True),
        lambda: Figure("patching_summary", "Per-prompt summaries", summary_histograms(ds), SECTION),
        lambda: Figure("patching_atp", "Exact vs attribution patching", atp_scatter(ds), SECTION),
    ])


VARIANTS = {
    "patching_grid": "Counterfactual patching, one position at a time",
    "patching_all": "Counterfactual patching of every position at once",
    "patching_noise": "Noise restoration at the last token (causal tracing)",
    "patching_noise_grid": "Noise restoration by position × layer (causal tracing)",
    "patching_noise_all": "Noise restoration of every position at once",
}


def variant_figures(ds: xr.Dataset, name: str) -> tuple[list[Figure], list[str]]:
    """Figures of the other patching files (``patching_grid``, ``patching_noise``, ``patching_noise_grid``, ...):
    position × layer heatmaps (the ROME picture) when ``effect`` has a ``position`` dim, else the mean
    effect by layer and the resid heatmap."""
    what = VARIANTS.get(name, name.replace("_", " "))
    if "effect" in ds and "position" in ds["effect"].dims:
        def maps() -> list[Figure]:
            comps = components(ds) if "component" in ds["effect"].dims else [None]
            return [Figure(f"{name}_{c or 'effect'}", f"{what}" + (f" ({c})" if c else ""),
                           position_heatmap(ds, c, title=f"{c or 'effect'}: mean effect by token position × layer"),
                           SECTION) for c in comps]

        return collect([maps])

    def heatmap() -> Figure:
        comp = "resid" if "resid" in components(ds) else (components(ds) or [None])[0]
        return Figure(f"{name}_heatmap", f"{what}: per prompt × layer", effect_heatmap(ds, comp), SECTION)

    return collect([
        lambda: Figure(f"{name}_mean_effect", what, effect_curve(ds), SECTION,
                       note="effect: " + str(ds["effect"].attrs.get("description", "see the file's attributes"))),
        heatmap,
    ])


def position_figures(ds: xr.Dataset, kind: str) -> tuple[list[Figure], list[str]]:
    """Position × layer heatmaps of ``patching_grid.nc`` (kind 'grid') or a noise grid (kind 'noise')."""
    return variant_figures(ds, "patching_noise_grid" if kind == "noise" else "patching_grid")

"""Causal tracing (activation patching) figures from ``patching*.nc`` Datasets: the render contract.

``patching.nc``: dims prompt, layer, component; ``effect (prompt, layer, component)`` is the change of the
base prompt's logit difference when that component's output at that layer is replaced by the
counterfactual's, of the kind its ``effect_kind`` attr declares (normalised by the gap, or raw). The grid
variants (``patching_grid.nc``, ``patching_noise_grid.nc``) add a ``position`` dim (−1 = last token);
``patching_noise*.nc`` restore clean states into a noised run (ROME).

The pictures averaged over prompts are in :mod:`.figures_effect`, the per-prompt ones in
:mod:`.figures_prompt`; this module assembles them (``SECTION``, :func:`figures`, :func:`variant_figures`)
and draws the position × layer heatmaps."""

from __future__ import annotations

from collections.abc import Sequence

import holoviews as hv
import numpy as np
import xarray as xr

from ...render._base import WIDTH, Figure, MissingData, ci_label, collect, layers_of, require, values
from ...render.compare import SECTION as COMPARISON
from ...render.compare import Stores, box, curves
from .figures_effect import (
    BOOTSTRAP_CI,
    NORMAL_CI,
    UNDEFINED_COLOR,
    averaging_note,
    components,
    effect_curve,
    effect_heatmap,
    effect_kind,
    effect_label,
    effect_views,
    heatmap_views,
    views,
)
from .figures_prompt import atp_scatter, prompt_view, summary_histograms

__all__ = ["BOOTSTRAP_CI", "NORMAL_CI", "SECTION", "UNDEFINED_COLOR", "VARIANTS", "atp_scatter", "averaging_note",
           "components", "effect_curve", "effect_heatmap", "effect_kind", "effect_label", "effect_views", "figures",
           "heatmap_views", "position_figures", "position_heatmap", "prompt_view", "summary_histograms",
           "variant_figures", "views"]

SECTION = "Causal tracing"


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
    v = values(da)
    low = float(np.nanmin(v)) if np.isfinite(v).any() else 0.0  # all NaN: no pair with a defined effect
    return hm.redim.values(position=order).opts(
        cmap="Reds" if low >= 0 else "RdBu_r",
        symmetric=low < 0, colorbar=True, tools=["hover"], width=WIDTH, height=height,
        invert_yaxis=True,
        title=title or f"mean {var} by token position × layer", xlabel="layer", ylabel="token position (−1 = last)")


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


# ----------------------------------------------------------------------------------------------
# across models (``nnethics compare``)

def compare_figures(stores: Stores, relative: bool) -> list:
    """The comparison's patching figures: the mean effect by depth per component, and the peak layers."""
    def comp(c):
        return lambda ds: ds["effect"].sel(component=c) if "component" in ds["effect"].dims else ds["effect"]

    def effects() -> list[Figure]:
        comps = []
        for data in stores.values():
            if "patching" in data and "component" in data["patching"].dims:
                comps += [str(c) for c in values(data["patching"]["component"]) if str(c) not in comps]
        return [Figure(f"compare_patching_{c}", f"Mean patching effect ({c})",
                       curves(stores, "patching", comp(c), f"Mean patching effect by depth: {c} "
                              f"({ci_label('prompts')})", "effect", relative), COMPARISON) for c in (comps or ["resid"])]

    return [
        effects,
        lambda: Figure("compare_peak_layers", "Peak layers", box(stores, "patching", "peak_layer",
                                                                 "Peak patching layer per prompt", relative),
                       COMPARISON),
    ]

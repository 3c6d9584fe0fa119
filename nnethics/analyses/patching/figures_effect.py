"""Patching effects averaged over prompts: the mean effect by layer, the prompt × layer heatmaps, the views.

What ``effect`` means is read from the file (``effect_kind``, ``min_gap``: :mod:`nnethics.store.schema`),
never guessed from its values. The receiver is the run patched into (base, or the noised base), the
source the run patched from (counterfactual, or the clean base).
"""

from __future__ import annotations

import holoviews as hv
import numpy as np
import xarray as xr

from ... import metrics
from ...render._base import (
    COMPONENT_COLORS,
    HEIGHT,
    WIDE,
    WIDTH,
    MissingData,
    band_and_curve,
    ci_label,
    fix_limits,
    layers_of,
    mean_ci,
    require,
    values,
)
from ...store import schema


def components(ds: xr.Dataset) -> list[str]:
    return [str(c) for c in values(ds["component"])] if "component" in ds.dims else []


CI_NAMES = (("effect_ci_low", "effect_ci_high"), ("ci_low", "ci_high"))


def ends(ds: xr.Dataset) -> tuple[str, str] | None:
    """(receiver, source) logit-difference variables: the run patched into and the run patched from."""
    if "corrupted_logit_diff" in ds and "base_logit_diff" in ds:  # noise: clean states restored into the noised run
        return "corrupted_logit_diff", "base_logit_diff"
    if "base_logit_diff" in ds and "cf_logit_diff" in ds:
        return "base_logit_diff", "cf_logit_diff"
    return None


def effect_kind(ds: xr.Dataset) -> str | None:
    """``effect``'s declared kind: 'normalized' ((patched − receiver) / (source − receiver)), 'raw'
    (patched − receiver, in logit-difference units), or None when the file declares none."""
    return schema.effect_kind(ds, "effect")


def _effect_name(ds: xr.Dataset) -> str:
    """What ``effect`` is, in a view's name: its declared kind (a file that declares none says 'effect')."""
    return {schema.NORMALIZED: "normalised effect", schema.RAW: "raw effect (change of logit diff)"}.get(
        effect_kind(ds) or "", "effect")


def effect_label(ds: xr.Dataset) -> str:
    return {schema.NORMALIZED: "effect (1 = counterfactual's logit diff)",
            schema.RAW: "change of logit diff"}.get(effect_kind(ds) or "", "effect")


BOOTSTRAP_CI = ci_label("pairs")
NORMAL_CI = BOOTSTRAP_CI  # one CI method now (kept for importers of the old name)
UNDEFINED_COLOR = "#c8c8c8"


def stored_ci_method(ds: xr.Dataset, name: str) -> str:
    """How a stored CI was computed, from its attrs: files written before the BCa bootstrap (no
    ``ci_method`` attr) held a percentile bootstrap (``effect_ci_*``) or an unnamed method (``ci_*``)."""
    if ds[name].attrs.get("ci_method", "").startswith(metrics.MEAN_CI_METHOD):
        return ci_label("prompts")
    return "stored percentile-bootstrap 95% CI" if name == "effect_ci_low" else "stored 95% CI"


def effect_curve(ds: xr.Dataset, var: str = "effect", title: str | None = None) -> hv.Overlay:
    """Mean ``var`` per layer for each component, with a 95% CI band over prompts.

    Uses the stored ``mean_effect`` and ``effect_ci_low``/``effect_ci_high`` (or ``ci_low``/``ci_high``)
    ``(layer, component)`` when present, else computes the same BCa bootstrap CI (:func:`mean_ci`) over the
    prompts where ``var`` is defined. The title names the method and the number of prompts behind the mean.
    """
    require(ds, var, "layer")
    layers = layers_of(ds)
    stored_ci = next((names for names in CI_NAMES if all(n in ds for n in names)), None)
    stored = var == "effect" and "mean_effect" in ds and stored_ci is not None
    method = stored_ci_method(ds, stored_ci[0]) if stored else ci_label("prompts")
    parts = []
    comps = components(ds) or [None]
    for comp in comps:
        def sel(v: str, comp: str | None = comp) -> xr.DataArray:
            return ds[v].sel(component=comp) if comp is not None and "component" in ds[v].dims else ds[v]

        if stored:
            mean, lo, hi = sel("mean_effect"), sel(stored_ci[0]), sel(stored_ci[1])
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
    none = "\nno CI band: a CI needs 2 or more prompts" if defined < 2 else ""
    return hv.Overlay([*parts, zero]).opts(
        title=(title or f"Mean patching effect ({count})\n{method}") + none, width=WIDTH, height=HEIGHT,
        legend_position="top_left", xlabel="layer", ylabel=effect_label(ds) if var == "effect" else var)


HEATMAP_CELLS_MAX = 100  # prompts drawn as one cell each (hover names the prompt); above, one image


def effect_heatmap(ds: xr.Dataset, component: str | None = "resid", var: str = "effect",
                   title: str | None = None, rows: list[str] | None = None) -> hv.HeatMap | hv.Image:
    """``var`` for every prompt (rows) and layer (columns) of one component; undefined (NaN) cells grey.

    Over :data:`HEATMAP_CELLS_MAX` prompts it is an ``hv.Image`` (rows = prompt index, float32): a cell per
    prompt and layer with the prompt's name as a category made 1,000 pairs ~10 MB and ~15 s to open.
    ``rows`` (image only): the prompts to draw, in order; those ``ds`` lacks are grey.
    """
    require(ds, var)
    da = ds[var]
    if "component" in da.dims:
        if component not in components(ds):
            raise MissingData(f"patching: no component {component!r}")
        da = da.sel(component=component)
    da = da.transpose("prompt", "layer")
    prompts = [str(p) for p in values(ds["prompt"])]
    layers = layers_of(ds)
    height = int(min(900, max(240, 16 * len(rows or prompts) + 90)))
    undefined = int((~np.isfinite(values(da))).all(1).sum())
    note = f"; grey = undefined ({undefined} prompts)" if undefined else ""
    opts = dict(cmap="RdBu_r", symmetric=True, colorbar=True, tools=["hover"], width=WIDTH, height=height,
                clipping_colors={"NaN": UNDEFINED_COLOR}, title=title or f"{component or var}: {var} per prompt × layer{note}",
                invert_yaxis=True, xlabel="layer")
    if len(rows or prompts) > HEATMAP_CELLS_MAX:
        rows = rows or prompts
        z = values(da.assign_coords(prompt=prompts).reindex(prompt=rows)).astype(np.float32)
        img = hv.Image((layers, np.arange(len(rows)), z), kdims=["layer", "prompt"], vdims=[var])
        return img.opts(**opts, ylabel="prompt (row; 0 = first of the selector)")
    xs = np.tile(layers, len(prompts))
    ys = np.repeat(prompts, len(layers))
    hm = hv.HeatMap((xs, ys, values(da).ravel()), kdims=["layer", "prompt"], vdims=[var])
    return hm.opts(**opts, ylabel="prompt")


def _delta(ds: xr.Dataset) -> xr.Dataset | None:
    """``ds`` with ``delta`` = patched − receiver logit difference (logits), or None without the inputs."""
    pair = ends(ds)
    if pair is None or "patched_logit_diff" not in ds:
        return None
    out = ds.copy()
    out["delta"] = ds["patched_logit_diff"].astype(float) - ds[pair[0]].astype(float)
    return out


def gap_name(ds: xr.Dataset) -> str:
    return "clean − noised" if ends(ds) == ("corrupted_logit_diff", "base_logit_diff") else "cf − base"


def views(ds: xr.Dataset) -> dict[str, tuple[xr.Dataset, str]]:
    """The selectable views of a patching file: normalised effect over the pairs where it is defined, and the
    absolute change of the logit difference (logits) over those pairs and over all pairs.
    Returns ``{key: (dataset, variable)}``; keys name the pairs and their count."""
    n = ds.sizes["prompt"]
    ok = values(ds["effect_defined"]).astype(bool) if "effect_defined" in ds else \
        np.isfinite(values(ds["effect"])).reshape(n, -1).any(1)
    k = int(ok.sum())
    who = "content-sensitive pairs" if gap_name(ds) == "cf − base" else "pairs with a normalisable gap"
    out = {f"{_effect_name(ds)}, {who} (n={k} of {n})": (ds, "effect")}
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
        what = f"Mean {_effect_name(ds)}" if var == "effect" else "Mean change of the logit difference"
        frames[key] = effect_curve(sub, var, title=f"{what}, {BOOTSTRAP_CI} ({key.split(', ', 1)[1]})"
                                   ).opts(width=WIDE)
    if not frames:
        raise MissingData("patching: no prompt to average")
    if len(frames) == 1:
        return next(iter(frames.values()))
    return hv.HoloMap(fix_limits(frames, shared_y=False), kdims=["view"], sort=False)


def heatmap_views(ds: xr.Dataset, component: str | None) -> hv.HoloMap | hv.HeatMap:
    """:func:`effect_heatmap` for each of :func:`views`; the normalised view keeps every prompt (undefined ones
    grey), so the reader sees which pairs the mean leaves out. Drawn as images (over
    :data:`HEATMAP_CELLS_MAX` prompts), every view has every prompt's row; those a view leaves out are grey."""
    frames = {}
    rows = [str(p) for p in values(ds["prompt"])] if ds.sizes["prompt"] > HEATMAP_CELLS_MAX else None
    for key, (sub, var) in views(ds).items():
        if var == "effect":
            sub = ds
        if not sub.sizes["prompt"]:
            continue
        what = f"{_effect_name(ds)} (grey: undefined)" if var == "effect" else "change of logit diff (logits)"
        frames[key] = effect_heatmap(sub.rename({var: "value"}), component, "value",
                                     title=f"{component or 'effect'}: {what}", rows=rows)
    if len(frames) == 1:
        return next(iter(frames.values()))
    frames = {k: v.opts(framewise=True) for k, v in frames.items()}  # each view its own colour range
    return hv.HoloMap(frames, kdims=["view"], sort=False)


def averaging_note(ds: xr.Dataset) -> str:
    """Over how many pairs the normalised effect is averaged, and why the others are left out."""
    n = ds.sizes["prompt"]
    if "effect_defined" not in ds:
        return f"Averaged over the {n} pairs of the file."
    k = int(values(ds["effect_defined"]).sum())
    gap = gap_name(ds)
    gap_min = schema.min_gap(ds)
    min_gap = f"{gap_min:g}" if gap_min is not None else "min_gap"
    return (f"The normalised effect (patched − base) / ({gap}) is averaged over the {k} of {n} pairs whose |{gap}| "
            f"is at least {min_gap} logits; the other {n - k} are left out because dividing by a smaller gap "
            f"amplifies noise. The 'view' selector shows the absolute change of the logit difference instead, over "
            f"those pairs or over all {n}.")

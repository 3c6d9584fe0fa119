"""Direct logit attribution figures from ``attribution.nc``.

dims prompt, side (base, cf), layer, component (attn, mlp), option, head: ``logit_contribution
(prompt, side, layer, component, option)``, ``diff_contribution (prompt, side, layer, component)``
(option 1 − option 2), ``head_contribution (prompt, side, layer, head)``, ``attn_mlp_ratio``.
"""

from __future__ import annotations

from collections.abc import Sequence

import holoviews as hv
import numpy as np
import xarray as xr

from ...render._base import (
    COMPONENT_COLORS,
    HEIGHT,
    SIDE_DASH,
    WIDE,
    WIDTH,
    Figure,
    MissingData,
    band_and_curve,
    ci_label,
    collect,
    empty_curve,
    fix_limits,
    frame_limits,
    layers_of,
    mean_ci,
    reference_hline,
    reindexed,
    require,
    row_limits,
    side_name,
    values,
)
from ...render.carrier import PerPrompt
from ...render.compare import SECTION as COMPARISON
from ...render.compare import Stores, curves, label_text

SECTION = "Direct logit attribution"
NORMAL_CI = ci_label("pairs")  # the one CI method of the report (the old name kept for importers)
BOOTSTRAP_CI = NORMAL_CI


def _robust_ylim(arrays: Sequence[np.ndarray], layers: np.ndarray, ratio: float = 3.0
                 ) -> tuple[tuple[float, float] | None, str]:
    """y limits that leave out one layer whose |value| is over ``ratio`` times every other layer's (e.g. the
    last MLP writing +22 logits to a label), so the rest stays readable; and a note naming it."""
    a = np.stack([np.asarray(x, dtype=float) for x in arrays])  # [series, layer]
    peak = np.nanmax(np.abs(a), axis=0)
    if peak.size < 3 or not np.isfinite(peak).any():
        return None, ""
    top = int(np.nanargmax(peak))
    rest = np.delete(peak, top)
    if not np.nanmax(rest) > 0 or peak[top] < ratio * np.nanmax(rest):
        return None, ""
    others = np.delete(a, top, axis=1)
    lo, hi = float(np.nanmin(others)), float(np.nanmax(others))
    pad = 0.1 * (hi - lo or 1.0)
    value = a[:, top][np.nanargmax(np.abs(a[:, top]))]
    return (min(lo, 0.0) - pad, max(hi, 0.0) + pad), f"; L{int(layers[top])} off scale ({value:+.1f})"


def _sides(ds: xr.Dataset) -> list[str]:
    return [str(s) for s in values(ds["side"])] if "side" in ds.dims else [None]


def _side(da: xr.DataArray, side: str | None) -> xr.DataArray:
    return da.sel(side=side) if side is not None and "side" in da.dims else da


def _options(ds: xr.Dataset) -> list[str]:
    return [str(o) for o in values(ds["option"])]


def component_contributions(ds: xr.Dataset, option: str | None = None) -> hv.Layout:
    """The seed's "component contributions to '1'": attention, MLP and their total by layer (mean, BCa
    bootstrap 95% CI over pairs), one panel per side."""
    require(ds, "logit_contribution", "option")
    option = option or _options(ds)[0]
    layers = layers_of(ds)
    lc = ds["logit_contribution"].sel(option=option)
    panels = []
    for side in _sides(ds):
        d = _side(lc, side)
        parts = []
        series = {str(c): d.sel(component=c) for c in values(ds["component"])}
        series["total"] = d.sum("component")
        means = []
        for name, da in series.items():
            m, lo, hi = (values(x.transpose("layer")) for x in mean_ci(da, "prompt"))
            means.append(m)
            parts.append(band_and_curve(layers, m, lo, hi, f"{name} → {option!s}", COMPONENT_COLORS.get(name, "#444"),
                                        vdim="contribution", dash="dashed" if name == "total" else "solid"))
        parts.append(hv.HLine(0).opts(color="gray", line_dash="dotted", line_width=1))
        ylim, note = _robust_ylim(means, layers)
        panels.append(hv.Overlay(parts).opts(
            title=f"To '{option}', {side_name(side) if side else 'all'}{note}\n{ci_label('pairs', d.sizes['prompt'])}",
            width=WIDTH, height=HEIGHT, legend_position="top_left", xlabel="layer", ylabel="logit contribution",
            **({"ylim": ylim} if ylim else {})))
    return hv.Layout(panels).cols(2)


def split_views(ds: xr.Dataset) -> dict[str, xr.Dataset]:
    """All pairs, and the content-sensitive ones (when the file says which)."""
    n = ds.sizes["prompt"]
    out = {f"all pairs (n={n})": ds}
    if "content_sensitive" in ds:
        ok = np.flatnonzero(values(ds["content_sensitive"]).astype(bool))
        out[f"content-sensitive pairs (n={len(ok)} of {n})"] = ds.isel(prompt=ok)
    return out


def position_ethical_split(ds: xr.Dataset) -> hv.HoloMap | hv.Layout:
    """Per layer, what attention and MLP write toward label 1 whatever the content (position part) and toward
    the ethical option (ethical part), mean over pairs with a BCa bootstrap CI; a "pairs" selector
    switches between all pairs and the content-sensitive ones."""
    require(ds, "position_contribution", "ethical_contribution")
    layers = layers_of(ds)
    views = {k: v for k, v in split_views(ds).items() if v.sizes["prompt"]}
    panels = []
    for var, title in (("position_contribution", "Position part (+: label 1)"),
                       ("ethical_contribution", "Ethical part (+: ethical)")):
        frames = {}
        for key, sub in views.items():
            parts = [hv.HLine(0).opts(color="gray", line_dash="dotted", line_width=1)]
            for comp in values(ds["component"]):
                m, lo, hi = (values(x.transpose("layer")) for x in mean_ci(sub[var].sel(component=comp), "prompt"))
                parts.append(band_and_curve(layers, m, lo, hi, str(comp), COMPONENT_COLORS.get(str(comp), "#444"),
                                            vdim="logits"))
            other = var.replace("_contribution", "_other_contribution")
            total = float(np.nanmean(values(sub[var].sum(("layer", "component"))) + values(sub[other])))
            caption = ci_label("pairs", sub.sizes["prompt"])
            frames[key] = hv.Overlay(parts).opts(title=f"{title}; total {total:+.3g}\n{caption}")  # 2 lines: fits
        if len(frames) == 1:
            panels.append(next(iter(frames.values())).opts(width=WIDTH, height=HEIGHT, legend_position="top_left",
                                                           xlabel="layer", ylabel="logits"))
        else:
            panels.append(hv.HoloMap(fix_limits(frames, shared_y=False, width=WIDTH, height=HEIGHT,
                                                legend_position="top_left", xlabel="layer", ylabel="logits"),
                                     kdims=["pairs"], sort=False))
    return hv.Layout(panels).cols(2).opts(shared_axes=False)


def decision_differential(ds: xr.Dataset) -> hv.Bars:
    """Mean (attention + MLP) contribution to option 1 − option 2 per layer, base vs counterfactual."""
    require(ds, "diff_contribution")
    total = ds["diff_contribution"].sum("component") if "component" in ds["diff_contribution"].dims \
        else ds["diff_contribution"]
    mean = total.mean("prompt")
    rows = []
    for side in _sides(ds):
        m = values(_side(mean, side).transpose("layer"))
        rows += [(str(layer), side_name(side) if side else "all", float(v)) for layer, v in zip(layers_of(ds), m)]
    opts = _options(ds) if "option" in ds.dims else ["1", "2"]
    bars = hv.Bars(rows, kdims=["layer", "side"], vdims=["contribution diff"])
    return bars.opts(title=f"Layer-wise decision preference (+ = '{opts[0]}', − = '{opts[-1]}')", width=WIDE,
                     height=HEIGHT, tools=["hover"], xlabel="layer", ylabel=f"contribution '{opts[0]}' − '{opts[-1]}'",
                     multi_level=False, cmap={"base": "#4c72b0", "counterfactual": "#c44e52", "all": "#4c72b0"},
                     show_legend=True, legend_position="top_left")


def layer_component_heatmap(ds: xr.Dataset) -> hv.HeatMap:
    """Mean logit-difference contribution for each (side, component) row and layer column."""
    require(ds, "diff_contribution", "component")
    mean = ds["diff_contribution"].mean("prompt")
    layers = layers_of(ds)
    xs, ys, zs = [], [], []
    for side in _sides(ds):
        for comp in values(ds["component"]):
            v = values(_side(mean, side).sel(component=comp).transpose("layer")).astype(float)
            xs += layers.tolist()
            ys += [f"{side_name(side)} · {comp}" if side else str(comp)] * len(layers)
            zs += v.tolist()
    return hv.HeatMap((xs, ys, zs), kdims=["layer", "row"], vdims=["contribution diff"]).opts(
        cmap="RdBu_r", symmetric=True, colorbar=True, tools=["hover"], width=WIDTH, height=HEIGHT,
        invert_yaxis=True, title="Contribution heatmap (option 1 − option 2)", xlabel="layer", ylabel="")


def attn_mlp_ratio(ds: xr.Dataset) -> hv.Overlay:
    """Attention / (attention + MLP) by layer: above 0.5 attention dominates, below MLPs do."""
    if "attn_mlp_ratio" in ds:
        ratio = ds["attn_mlp_ratio"]
    else:
        require(ds, "logit_contribution")
        first = ds["logit_contribution"].sel(option=_options(ds)[0])
        a, m = abs(first.sel(component="attn")), abs(first.sel(component="mlp"))
        ratio = a / (a + m + 1e-8)
    layers = layers_of(ds)
    parts = [hv.HSpan(0.5, 1).opts(color="#4c72b0", alpha=0.06), hv.HSpan(0, 0.5).opts(color="#dd8452", alpha=0.06),
             hv.HLine(0.5).opts(color="gray", line_dash="dashed", line_width=1)]
    for side in _sides(ds):
        m, lo, hi = (values(x.transpose("layer")) for x in mean_ci(_side(ratio, side), "prompt"))
        parts.append(band_and_curve(layers, m, lo, hi, side_name(side) if side else "all", "#8172b3", vdim="ratio",
                                    dash=SIDE_DASH.get(side, "solid")))
    return hv.Overlay(parts).opts(title=f"Attention / (attention + MLP): >0.5 attention-dominant\n{ci_label('pairs')}",
                                  width=WIDTH, height=HEIGHT, ylim=(0, 1), legend_position="top_left",
                                  xlabel="layer", ylabel="attention share")


def head_heatmap(ds: xr.Dataset) -> hv.Layout:
    """Mean per-head contribution to option 1 − option 2 (layer × head), one panel per side."""
    require(ds, "head_contribution", "head")
    mean = ds["head_contribution"].mean("prompt")
    layers = layers_of(ds)
    heads = values(ds["head"]).astype(int)
    panels = []
    for side in _sides(ds):
        d = values(_side(mean, side).transpose("layer", "head")).astype(float)
        hm = hv.HeatMap((np.repeat(layers, len(heads)), np.tile(heads, len(layers)), d.ravel()),
                        kdims=["layer", "head"], vdims=["contribution diff"])
        panels.append(hm.opts(cmap="RdBu_r", symmetric=True, colorbar=True, tools=["hover"], width=WIDTH,
                              height=int(min(600, max(240, 14 * len(heads) + 100))),
                              title=f"Head contributions ({side_name(side) if side else 'all'})"))
    return hv.Layout(panels).cols(2)


def prompt_view(ds: xr.Dataset, prompts: Sequence[str] | None = None) -> PerPrompt:
    """Per-prompt attention and MLP contributions to option 1 − option 2 by layer (base solid, cf dashed),
    carried once per prompt (:class:`PerPrompt`)."""
    require(ds, "diff_contribution")
    prompts = list(prompts) if prompts is not None else [str(p) for p in values(ds["prompt"])]
    layers = layers_of(ds)
    sides, comps = _sides(ds), [str(c) for c in values(ds["component"])]
    have = {str(p) for p in values(ds["prompt"])}
    opts = dict(width=WIDE, height=HEIGHT, legend_position="top_left", xlabel="layer", ylabel="contribution diff")
    span = float(layers.max() - layers.min()) or 1.0
    xlim = (float(layers.min()) - 0.05 * span, float(layers.max()) + 0.05 * span)

    def title(p: str, lds: Sequence[float] | None) -> str:
        if p not in have:
            return f"{p}: no attribution"
        out = f"{p}: contributions to option 1 − option 2"
        if lds is not None:
            out += " (logit diff " + ", ".join(f"{side_name(s)} {v:+.2f}" for s, v in zip(sides, lds)) + ")"
        return out

    def overlay(curves: Sequence[np.ndarray]) -> hv.Overlay:
        parts, k = [], 0
        for side in sides:
            for comp in comps:
                parts.append(hv.Curve((layers, curves[k]), "layer", "contribution diff",
                                      label=f"{comp} ({side_name(side) if side else 'all'})").opts(
                    color=COMPONENT_COLORS.get(comp, "#444"), line_dash=SIDE_DASH.get(side, "solid"),
                    line_width=2, tools=["hover"]))
                k += 1
        return hv.Overlay([*parts, reference_hline(0)])

    def frame(p: str) -> hv.Overlay:
        if p not in have:
            return frame_limits(empty_curve("no attribution", "layer", "contribution diff")(p), xlim, **opts)
        one = ds.sel(prompt=p)
        curves = [values(_side(one["diff_contribution"], s).sel(component=c).transpose("layer")).astype(float)
                  for s in sides for c in comps]
        lds = [float(_side(one["logit_diff"], s)) for s in sides] if "logit_diff" in one else None
        return frame_limits(overlay(curves).opts(title=title(p, lds)), xlim, **opts)

    dims = ("side", "component", "layer") if sides[0] is not None else ("component", "layer")
    y = reindexed(ds["diff_contribution"], prompts, *dims).reshape(len(prompts), -1, len(layers))
    lds = reindexed(ds["logit_diff"], prompts, *dims[:-2]).reshape(len(prompts), -1) \
        if "logit_diff" in ds else None
    titles = [title(p, None if lds is None else lds[i]) for i, p in enumerate(prompts)]
    first = next((i for i, p in enumerate(prompts) if p in have), 0)
    columns = {(k, "contribution diff"): y[:, k] for k in range(y.shape[1])}
    return PerPrompt(prompts, frame, overlay(list(y[first])), columns, {}, titles, row_limits(y),
                     opts={**opts, "xlim": xlim})


def figures(ds: xr.Dataset, prompts: Sequence[str] | None = None) -> tuple[list[Figure], list[str]]:
    """The attribution figures (figures whose inputs are missing are skipped)."""
    if "prompt" not in ds.dims:
        raise MissingData("attribution: no prompt dim")
    n = ds.sizes["prompt"]
    k = int(values(ds["content_sensitive"]).sum()) if "content_sensitive" in ds else None
    who = (f" Averages are over all {n} pairs" + (f" ({k} of them content-sensitive); the per-side figures mix "
                                                  "what a layer writes for a position with what it writes for "
                                                  "the content, the split above separates them." if k is not None
                                                  else "."))
    return collect([
        lambda: Figure("attribution_split", "Position part vs ethical part", position_ethical_split(ds), SECTION,
                       note="Each layer's direct contribution to logit(label 1) − logit(label 2), averaged over the "
                            "two orders of a pair (position part: what it writes for label 1 whatever the options "
                            "say) and signed toward the ethical option before averaging (ethical part). The totals "
                            "are the mean position bias and ethical preference of the decisions section."),
        lambda: Figure("attribution_components", "Component contributions", component_contributions(ds), SECTION,
                       note="Direct logit attribution at the last token: each layer's attention and MLP output "
                            "projected through the final norm and unembedding onto the label tokens." + who),
        lambda: Figure("attribution_differential", "Decision differential", decision_differential(ds), SECTION),
        lambda: Figure("attribution_heatmap", "Layer × component heatmap", layer_component_heatmap(ds), SECTION),
        lambda: Figure("attribution_ratio", "Attention/MLP ratio", attn_mlp_ratio(ds), SECTION),
        lambda: Figure("attribution_heads", "Head contributions", head_heatmap(ds), SECTION),
        lambda: Figure("attribution_per_prompt", "Per-prompt attribution", prompt_view(ds, prompts), SECTION,
                       per_prompt=True),
    ])


# ----------------------------------------------------------------------------------------------
# across models (``nnethics compare``)

def compare_figures(stores: Stores, relative: bool) -> list:
    """The comparison's attribution figures: the attention and the MLP contribution by depth (base prompts)."""
    def profile(component: str):
        def pick(ds):
            return ds["diff_contribution"].sel(component=component, side="base")
        return lambda: Figure(f"compare_attribution_{component}", f"Attribution profile ({component})",
                              curves(stores, "attribution", pick,
                                     f"{component} contribution to {label_text(stores, 'attribution')} "
                                     f"(base prompts, {ci_label('prompts')})",
                                     "contribution", relative), COMPARISON)

    return [profile("attn"), profile("mlp")]

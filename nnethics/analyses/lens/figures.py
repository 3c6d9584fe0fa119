"""Logit-lens / tuned-lens figures from ``lens.nc``.

dims prompt, side, lens (logit, tuned), layer, k, option: ``top_token (prompt, side, lens, layer, k)``,
``top_prob``, ``label_logit (prompt, side, lens, layer, option)``, ``kl_to_final (prompt, side, lens,
layer)``, ``crossing_layer (prompt, side, lens)`` (−1 when the options never cross).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import holoviews as hv
import numpy as np
import xarray as xr

from ...render._base import (
    HEIGHT,
    LENS_DASH,
    OPTION_COLORS,
    WIDE,
    WIDTH,
    Figure,
    MissingData,
    band_and_curve,
    ci_label,
    collect,
    empty_curve,
    frame_limits,
    layers_of,
    mean_ci,
    reindexed,
    require,
    row_limits,
    side_name,
    values,
)
from ...render.carrier import PerPrompt, PerPromptLayout
from ...render.compare import SECTION as COMPARISON
from ...render.compare import Stores, box, curves
from ...store.schema import upgrade

SECTION = "Logit lens"
SAMPLES = "prompts and sides"
LENS_COLORS = {"logit": "#4c72b0", "tuned": "#c44e52"}


def _sides(ds: xr.Dataset) -> list[str]:
    return [str(s) for s in values(ds["side"])]


def _lenses(ds: xr.Dataset) -> list[str]:
    return [str(x) for x in values(ds["lens"])]


def display_token(tok: str, width: int = 12) -> str:
    """A token as readable text: leading-space markers (Ġ, ▁) as ␣, newlines as ↵, long ones cut."""
    t = str(tok)
    if t[:1] in ("Ġ", "▁"):
        t = "␣" + t[1:]
    t = t.replace("Ċ", "↵").replace("\n", "↵").replace("\t", "⇥")
    if t == "":
        t = "∅"
    return t if len(t) <= width else t[: width - 1] + "…"


def display_text(text: str, width: int = 12) -> str:
    """A decoded token quoted, with escapes for what is invisible: ``" A"``, ``"\\n"``; long ones cut."""
    t = json.dumps(str(text), ensure_ascii=False)
    return t if len(t) <= width else t[: width - 2] + "…\""


def _crossing(one: xr.Dataset, side: str, lens: str) -> int | None:
    if "crossing_layer" not in one:
        return None
    v = float(one["crossing_layer"].sel(side=side, lens=lens))
    return int(v) if np.isfinite(v) and v >= 0 else None


def _xlim(values_: np.ndarray, pad: float = 0.05) -> tuple[float, float]:
    span = float(values_.max() - values_.min()) or 1.0
    return float(values_.min()) - pad * span, float(values_.max()) + pad * span


def trajectories(ds: xr.Dataset, prompts: Sequence[str] | None = None) -> PerPromptLayout:
    """Per-prompt label-logit trajectories across layers, each lens (solid logit, dashed tuned), the
    crossing layer marked; one panel per side, both following the prompt selector (carried once per prompt)."""
    require(ds, "label_logit")
    prompts = list(prompts) if prompts is not None else [str(p) for p in values(ds["prompt"])]
    layers = layers_of(ds)
    options = [str(o) for o in values(ds["option"])]
    lenses = _lenses(ds)
    have = {str(p) for p in values(ds["prompt"])}
    opts = dict(width=WIDTH, height=HEIGHT, legend_position="top_left", xlabel="layer", ylabel="label logit")
    xlim = _xlim(layers)
    panels = []
    for side in _sides(ds):
        def overlay(curves: Sequence[np.ndarray], cross: Sequence[float | None], full: bool) -> hv.Overlay:
            parts, k = [], 0
            for j, lens in enumerate(lenses):
                for i, opt in enumerate(options):
                    parts.append(hv.Curve((layers, curves[k]), "layer", "logit", label=f"'{opt}' ({lens} lens)")
                                 .opts(color=OPTION_COLORS[i % len(OPTION_COLORS)],
                                       line_dash=LENS_DASH.get(lens, "dotdash"), line_width=2, tools=["hover"]))
                    k += 1
                if cross[j] is not None or full:
                    parts.append(hv.VLine(cross[j] if cross[j] is not None else 0).opts(
                        color="black", line_dash=LENS_DASH.get(lens, "dotdash"), line_width=1.2, alpha=0.7))
            return hv.Overlay(parts)

        def title(p: str, cross: Sequence[float | None], side: str = side) -> str:
            if p not in have:
                return f"{p}: no lens data ({side_name(side)})"
            crosses = [f"{c if c is not None else '–'} ({lens} lens)" for c, lens in zip(cross, lenses)]
            return f"{p} ({side_name(side)}): final choice leads from layer " + ", ".join(crosses)

        def frame(p: str, side: str = side, overlay=overlay, title=title) -> hv.Overlay:
            if p not in have:
                return frame_limits(empty_curve(f"no lens data ({side_name(side)})", "layer", "logit")(p), xlim, **opts)
            one = ds.sel(prompt=p)
            curves = [values(one["label_logit"].sel(side=side, lens=lens, option=opt).transpose("layer")).astype(float)
                      for lens in lenses for opt in options]
            cross = [_crossing(one, side, lens) for lens in lenses]
            return frame_limits(overlay(curves, cross, False).opts(title=title(p, cross)), xlim, **opts)

        y = reindexed(ds["label_logit"].sel(side=side), prompts, "lens", "option", "layer")
        y = y.reshape(len(prompts), -1, len(layers))
        cl = (reindexed(ds["crossing_layer"].sel(side=side, lens=lenses), prompts, "lens") if "crossing_layer" in ds
              else np.full((len(prompts), len(lenses)), np.nan))
        cl = np.where(cl >= 0, cl, np.nan)
        cross = [[int(c) if np.isfinite(c) else None for c in row] for row in cl]
        first = next((i for i, p in enumerate(prompts) if p in have), 0)
        per_lens = len(options) + 1  # the option curves, then the crossing line
        columns = {(j * per_lens + i, "logit"): y[:, j * len(options) + i]
                   for j in range(len(lenses)) for i in range(len(options))}
        spans = {j * per_lens + len(options): cl[:, j] for j in range(len(lenses))}
        panels.append(PerPrompt(prompts, frame, overlay(list(y[first]), cross[first], True), columns, spans,
                                [title(p, c) for p, c in zip(prompts, cross)], row_limits(y),
                                opts={**opts, "xlim": xlim}))
    return PerPromptLayout(panels, 2)


def top_tokens(ds: xr.Dataset, prompts: Sequence[str] | None = None, lens: str | None = None) -> PerPromptLayout:
    """Per-prompt top-k tokens at every layer (rows) and rank (columns), coloured by probability (carried once
    per prompt: probabilities float32, token texts dictionary-coded).

    Long because the one-prompt frame, the template and the vectorised carried arrays must describe the same
    elements in the same order; kept in one place so they stay in step."""
    require(ds, "top_token", "top_prob")
    lenses = _lenses(ds)
    lens = lens if lens is not None else lenses[0]
    if lens not in lenses:
        raise MissingData(f"lens: no {lens!r} lens")
    prompts = list(prompts) if prompts is not None else [str(p) for p in values(ds["prompt"])]
    layers = layers_of(ds)
    ranks = values(ds["k"]).astype(int) if "k" in ds.coords else np.arange(ds.sizes["k"])
    height = int(min(1000, max(260, 18 * len(layers) + 90)))
    need = 80 * len(ranks) + 160  # room for the token text
    width = WIDTH if need <= WIDTH + 60 else int(min(WIDE, need))
    have = {str(p) for p in values(ds["prompt"])}
    xs, ys = np.tile(ranks + 1, len(layers)), np.repeat(layers, len(ranks))
    by_rank = np.lexsort((ys, xs))  # HoloViews' HeatMap data source is sorted by x, then y; its Labels are not
    opts = dict(width=width, height=height, xlabel="rank", ylabel="layer")
    lims = dict(xlim=(float(xs.min()) - 0.5, float(xs.max()) + 0.5), ylim=(float(ys.min()) - 0.5, float(ys.max()) + 0.5))

    def cells(prob: np.ndarray, toks: np.ndarray, texts: np.ndarray | None, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Per-cell columns of ``(..., layer, k)`` arrays, flattened over (layer, k)."""
        lead = prob.shape[:-2]
        shown = texts if texts is not None else toks
        show = np.vectorize(display_text if texts is not None else display_token, otypes=[object])
        return {"probability": prob.reshape(*lead, -1), "text": show(shown).reshape(*lead, -1),
                "token": toks.reshape(*lead, -1), "token id": ids.reshape(*lead, -1),
                "ink": np.where(prob > 0.55, "white", "black").reshape(*lead, -1)}  # readable on dark cells too

    def overlay(c: dict[str, np.ndarray]) -> hv.Overlay:
        hm = hv.HeatMap((xs, ys, c["probability"], c["text"], c["token"], c["token id"]), kdims=["rank", "layer"],
                        vdims=["probability", "text", "token", "token id"]).opts(cmap="Blues", clim=(0, 1),
                                                                                  colorbar=True, tools=["hover"])
        labels = hv.Labels((xs, ys, c["text"], c["ink"]), kdims=["rank", "layer"], vdims=["text", "ink"]).opts(
            text_font_size="8pt", text_color="ink")
        return hm * labels

    def arrays(sel: dict, reindex: Sequence[str] | None) -> dict[str, np.ndarray]:
        def get(name: str, fill: Any) -> np.ndarray | None:
            if name not in ds:
                return None
            da = ds[name].sel(**sel)
            if reindex is not None:
                da = da.assign_coords(prompt=[str(p) for p in values(da["prompt"])]).reindex(
                    prompt=list(reindex), fill_value=fill)
            return values(da.transpose(*(["prompt"] if reindex is not None else []), "layer", "k"))

        ids = get("top_token_id", -1)
        toks = get("top_token", "").astype(str)
        return cells(get("top_prob", np.nan).astype(float), toks, None if "top_token_text" not in ds
                     else get("top_token_text", "").astype(str), ids if ids is not None else np.full(toks.shape, -1))

    panels = []
    for side in _sides(ds):
        def title(p: str, side: str = side) -> str:
            if p not in have:
                return f"{p} ({side_name(side)}): no lens data"
            return f"{p} ({side_name(side)}): top-{len(ranks)} tokens, {lens} lens"

        def frame(p: str, side: str = side, title=title) -> hv.Overlay:
            if p not in have:
                empty = hv.Overlay([hv.HeatMap(([], [], []), kdims=["rank", "layer"], vdims=["probability"])])
                return frame_limits(empty.opts(title=title(p)), None, **opts).opts(hv.opts.Overlay(**lims))
            return frame_limits(overlay(arrays(dict(prompt=p, side=side, lens=lens), None)).opts(title=title(p)),
                                None, **opts).opts(hv.opts.Overlay(**lims))

        c = arrays(dict(side=side, lens=lens), prompts)
        first = next((i for i, p in enumerate(prompts) if p in have), 0)
        template = overlay({k: v[first] for k, v in c.items()})
        prob = c["probability"][:, by_rank]  # one carried array for the colour and the hover value
        columns = {(0, "zvalues"): prob, (0, "probability"): prob,
                   (0, "text"): c["text"][:, by_rank], (0, "token"): c["token"][:, by_rank],
                   (0, "token_id"): c["token id"][:, by_rank], (1, "text"): c["text"], (1, "ink"): c["ink"]}
        panels.append(PerPrompt(prompts, frame, template, columns, titles=[title(p) for p in prompts],
                                fields={(1, "text_color"): "ink"}, opts={**opts, **lims}))
    return PerPromptLayout(panels, 2 if width == WIDTH else 1)


def decision_emergence(ds: xr.Dataset) -> hv.Overlay:
    """Mean label-logit difference across layers, signed so the final layer's choice is positive:
    how early each lens sees the eventual decision (mean, BCa bootstrap 95% CI over prompts and sides)."""
    require(ds, "label_logit")
    o = ds["label_logit"]
    diff = o.isel(option=0) - o.isel(option=-1)
    final = np.sign(diff.isel(layer=-1))
    aligned = (diff * final.where(final != 0, 1)).stack(sample=("prompt", "side"))
    layers = layers_of(ds)
    parts = []
    for lens in _lenses(ds):
        m, lo, hi = (values(x.transpose("layer")) for x in mean_ci(aligned.sel(lens=lens), "sample"))
        parts.append(band_and_curve(layers, m, lo, hi, f"{lens} lens", LENS_COLORS.get(lens, "#444"),
                                    vdim="aligned logit diff", dash=LENS_DASH.get(lens, "solid")))
    parts.append(hv.HLine(0).opts(color="gray", line_dash="dotted", line_width=1))
    return hv.Overlay(parts).opts(title=f"Logit diff toward the final choice by layer\n{ci_label(SAMPLES)}", width=WIDTH,
                                  height=HEIGHT, legend_position="top_left", xlabel="layer",
                                  ylabel="logit diff (final choice +)")


def kl_by_layer(ds: xr.Dataset) -> hv.Overlay:
    """Mean KL(final ‖ lens) per layer for each lens (BCa bootstrap 95% CI over prompts and sides)."""
    require(ds, "kl_to_final")
    kl = ds["kl_to_final"].stack(sample=("prompt", "side")) if "side" in ds["kl_to_final"].dims \
        else ds["kl_to_final"].rename(prompt="sample")
    layers = layers_of(ds)
    parts = []
    for lens in _lenses(ds):
        m, lo, hi = (values(x.transpose("layer")) for x in mean_ci(kl.sel(lens=lens), "sample"))
        parts.append(band_and_curve(layers, m, lo, hi, f"{lens} lens", LENS_COLORS.get(lens, "#444"), vdim="KL",
                                    dash=LENS_DASH.get(lens, "solid")))
    return hv.Overlay(parts).opts(title=f"KL(final ‖ lens) by layer\n{ci_label(SAMPLES)}", width=WIDTH, height=HEIGHT,
                                  legend_position="top_right", xlabel="layer", ylabel="KL (nats)")


def crossing_histogram(ds: xr.Dataset) -> hv.Overlay:
    """How many prompts (both sides) settle on their final option from each layer, per lens."""
    require(ds, "crossing_layer")
    n_layers = ds.sizes["layer"]
    parts = []
    edges = np.arange(-0.5, n_layers + 0.5)
    for lens in _lenses(ds):
        v = values(ds["crossing_layer"].sel(lens=lens)).astype(float).ravel()
        v = v[np.isfinite(v) & (v >= 0)]
        freq, _ = np.histogram(v, bins=edges)
        parts.append(hv.Histogram((edges, freq), kdims=["crossing layer"], vdims=["prompts × sides"], label=f"{lens} lens").opts(
            color=LENS_COLORS.get(lens, "#444"), alpha=0.5, tools=["hover"]))
    return hv.Overlay(parts).opts(title="Layer from which the final choice leads", width=WIDTH, height=HEIGHT,
                                  legend_position="top_left")


def figures(ds: xr.Dataset, prompts: Sequence[str] | None = None) -> tuple[list[Figure], list[str]]:
    """The lens figures (figures whose inputs are missing are skipped); files of an older schema are read too."""
    ds = upgrade(ds)
    if "prompt" not in ds.dims or "lens" not in ds.dims:
        raise MissingData("lens: no prompt/lens dims")
    note = ("Hidden states at the last token decoded at every layer by the logit lens (final norm + unembedding)"
            " and, when trained, the tuned lens.")
    if "tuned" not in _lenses(ds):
        note += (" This file has no tuned lens: 'nnethics lens train' trains one for the model (on the built-in "
                 "model about 10 minutes on 2 CPU cores: 16k tokens, 200 steps) and later runs use it.")
    return collect([
        lambda: Figure("lens_emergence", "Decision emergence", decision_emergence(ds), SECTION, note=note),
        lambda: Figure("lens_kl", "KL to the final output", kl_by_layer(ds), SECTION),
        lambda: Figure("lens_crossing", "Crossing layers", crossing_histogram(ds), SECTION),
        lambda: Figure("lens_trajectories", "Label-logit trajectories", trajectories(ds, prompts), SECTION,
                       per_prompt=True),
        lambda: Figure("lens_top_tokens", "Top tokens per layer", top_tokens(ds, prompts), SECTION,
                       per_prompt=True),
    ])


# ----------------------------------------------------------------------------------------------
# across models (``nnethics compare``)

def compare_figures(stores: Stores, relative: bool) -> list:
    """The comparison's lens figures: the first lens' KL to the final output by depth, and the crossing layers."""
    def lens_kl():
        def pick(ds):
            return ds["kl_to_final"].sel(lens=str(values(ds["lens"])[0])).stack(sample=("prompt", "side"))
        return Figure("compare_lens_kl", "Lens KL to the final output",
                      curves(stores, "lens", pick, f"KL to the final output by depth (first lens, "
                             f"{ci_label('prompts')})", "KL", relative, dim="sample"), COMPARISON)

    return [
        lens_kl,
        lambda: Figure("compare_crossing", "Crossing layers", box(
            stores, "lens", "crossing_layer", "Layer from which the final choice leads (first lens)", relative,
            transform=lambda da: da.isel(lens=0) if "lens" in da.dims else da), COMPARISON),
    ]

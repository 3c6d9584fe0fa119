"""Logit-lens / tuned-lens figures from ``lens.nc``.

dims prompt, side, lens (logit, tuned), layer, k, option: ``top_token (prompt, side, lens, layer, k)``,
``top_prob``, ``label_logit (prompt, side, lens, layer, option)``, ``kl_to_final (prompt, side, lens,
layer)``, ``crossing_layer (prompt, side, lens)`` (−1 when the options never cross).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import holoviews as hv
import numpy as np
import xarray as xr

from ..store.schema import upgrade
from ._base import (
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
    layers_of,
    mean_ci,
    prompt_map,
    require,
    side_name,
    values,
)

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


def trajectories(ds: xr.Dataset, prompts: Sequence[str] | None = None) -> hv.Layout:
    """Per-prompt label-logit trajectories across layers, each lens (solid logit, dashed tuned), the
    crossing layer marked; one panel per side, both following the prompt selector."""
    require(ds, "label_logit")
    prompts = list(prompts) if prompts is not None else [str(p) for p in values(ds["prompt"])]
    layers = layers_of(ds)
    options = [str(o) for o in values(ds["option"])]
    panels = []
    for side in _sides(ds):
        def frame(p: str, side: str = side) -> hv.Overlay:
            one = ds.sel(prompt=p)
            parts, crosses = [], []
            for lens in _lenses(ds):
                for i, opt in enumerate(options):
                    v = values(one["label_logit"].sel(side=side, lens=lens, option=opt).transpose("layer"))
                    parts.append(hv.Curve((layers, v.astype(float)), "layer", "logit", label=f"'{opt}' ({lens} lens)")
                                 .opts(color=OPTION_COLORS[i % len(OPTION_COLORS)], line_dash=LENS_DASH.get(lens, "dotdash"),
                                       line_width=2, tools=["hover"]))
                c = _crossing(one, side, lens)
                crosses.append(f"{c if c is not None else '–'} ({lens} lens)")
                if c is not None:
                    parts.append(hv.VLine(c).opts(color="black", line_dash=LENS_DASH.get(lens, "dotdash"),
                                                  line_width=1.2, alpha=0.7))
            return hv.Overlay(parts).opts(title=f"{p} ({side_name(side)}): final choice leads from layer "
                                                + ", ".join(crosses))

        panels.append(prompt_map(prompts, frame, [str(p) for p in values(ds["prompt"])],
                                 empty_curve(f"no lens data ({side_name(side)})", "layer", "logit"), width=WIDTH,
                                 height=HEIGHT, legend_position="top_left", xlabel="layer", ylabel="label logit"))
    return hv.Layout(panels).cols(2)


def top_tokens(ds: xr.Dataset, prompts: Sequence[str] | None = None, lens: str | None = None) -> hv.Layout:
    """Per-prompt top-k tokens at every layer (rows) and rank (columns), coloured by probability."""
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
    panels = []
    for side in _sides(ds):
        def frame(p: str, side: str = side) -> hv.Overlay:
            one = ds.sel(prompt=p, side=side, lens=lens)
            toks = values(one["top_token"].transpose("layer", "k")).astype(str)
            prob = values(one["top_prob"].transpose("layer", "k")).astype(float)
            xs = np.tile(ranks + 1, len(layers))
            ys = np.repeat(layers, len(ranks))
            if "top_token_text" in one:  # decoded text; files from before it existed show the BPE symbols
                texts = values(one["top_token_text"].transpose("layer", "k")).astype(str).ravel()
                shown = np.array([display_text(t) for t in texts], dtype=object)
            else:
                shown = np.array([display_token(t) for t in toks.ravel()], dtype=object)
            ids = values(one["top_token_id"].transpose("layer", "k")).ravel() if "top_token_id" in one else \
                np.full(toks.size, -1)
            hm = hv.HeatMap((xs, ys, prob.ravel(), shown, toks.ravel(), ids), kdims=["rank", "layer"],
                            vdims=["probability", "text", "token", "token id"]).opts(cmap="Blues", clim=(0, 1), colorbar=True,
                                                                 tools=["hover"])
            ink = np.where(prob.ravel() > 0.55, "white", "black")  # readable on dark cells too
            labels = hv.Labels((xs, ys, shown, ink), kdims=["rank", "layer"], vdims=["text", "ink"]).opts(
                text_font_size="8pt", text_color="ink")
            return (hm * labels).opts(title=f"{p} ({side_name(side)}): top-{len(ranks)} tokens, {lens} lens")

        def empty(p: str, side: str = side) -> hv.Element:
            return hv.Overlay([hv.HeatMap(([], [], []), kdims=["rank", "layer"], vdims=["probability"])]).opts(
                title=f"{p} ({side_name(side)}): no lens data")

        panels.append(prompt_map(prompts, frame, [str(p) for p in values(ds["prompt"])], empty, shared_y=True,
                                 width=width, height=height, xlabel="rank", ylabel="layer"))
    return hv.Layout(panels).cols(2 if width == WIDTH else 1)


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


"""Per-head activation patching figures from ``heads.nc``: the render contract.

``heads.nc``: ``mean_effect``/``effect_ci_low``/``effect_ci_high``/``mean_head_dla (layer, head)`` (after the
analysis' finalize), ``effect (prompt, layer, head)``; the top heads' attention from the decision position
``attention (prompt, side, rank, token)`` with ``top_layer``/``top_head (rank)`` and ``token_text (prompt, side,
token)``. Two figures: a layer × head heatmap of the mean effect (hover: its BCa bootstrap CI and the head's mean
DLA), and per prompt the base prompt's tokens shaded by each top head's attention."""

from __future__ import annotations

from collections.abc import Sequence

import holoviews as hv
import numpy as np
import xarray as xr

from ... import metrics
from ...render._base import WIDE, Figure, MissingData, collect, layers_of, prompt_map, require, values

SECTION = "Attention heads"
PER_LINE = 24      # tokens per line of the attention text view
MAX_CHARS = 7      # characters of a token shown in its cell (hover shows the whole token)


def effect_heatmap(ds: xr.Dataset) -> hv.HeatMap:
    """Mean effect of patching each head at the decision position (layer × head), with CI and DLA on hover."""
    require(ds, "mean_effect", "effect_ci_low", "effect_ci_high", "head")
    layers = layers_of(ds)
    heads = values(ds["head"]).astype(int)
    cols = {v: values(ds[v].transpose("layer", "head")).astype(float).ravel()
            for v in ("mean_effect", "effect_ci_low", "effect_ci_high")}
    dla = (values(ds["mean_head_dla"].transpose("layer", "head")).astype(float).ravel() if "mean_head_dla" in ds
           else np.full(len(layers) * len(heads), np.nan))
    names = [f"H{h}" for h in heads]  # categorical rows (a numeric axis would tick at half heads)
    data = (np.repeat(layers, len(heads)), np.tile(names, len(layers)), cols["mean_effect"], cols["effect_ci_low"],
            cols["effect_ci_high"], dla)
    hm = hv.HeatMap(data, kdims=["layer", "head"],
                    vdims=[hv.Dimension("mean_effect", label="mean effect"), hv.Dimension("ci_low", label="CI low"),
                           hv.Dimension("ci_high", label="CI high"), hv.Dimension("dla", label="mean DLA (logit)")])
    return hm.redim.values(head=names).opts(cmap="RdBu_r", symmetric=True, colorbar=True, tools=["hover"], width=WIDE,
                   height=int(min(600, max(240, 18 * len(heads) + 110))), xlabel="layer", ylabel="head",
                   title="Mean effect of patching one head (decision position, counterfactual into base)")


def _token_cells(att: np.ndarray, text: np.ndarray, row0: float) -> tuple[list, list, float]:
    """Rectangles ``(x0, y0, x1, y1, shade, weight, token)`` and labels ``(x, y, text)`` of one head's tokens,
    from ``row0`` downward; returns them and the next free row."""
    ok = np.isfinite(att)
    att, text = att[ok], text[ok]
    top = float(att.max()) if att.size and att.max() > 0 else 1.0
    rects, labels = [], []
    for i, (w, t) in enumerate(zip(att, text)):
        x, y = i % PER_LINE, row0 - i // PER_LINE
        shown = str(t).replace("\n", "⏎").replace("\t", "⇥")
        rects.append((x, y - 1, x + 1, y, float(w) / top, float(w), shown))
        labels.append((x + 0.5, y - 0.5, shown.strip()[:MAX_CHARS] or "␣"))
    return rects, labels, row0 - (len(att) + PER_LINE - 1) // PER_LINE - 1.2


def attention_text(ds: xr.Dataset, prompts: Sequence[str] | None = None, side: str = "base") -> hv.HoloMap:
    """Per prompt: the ``side`` prompt's tokens once per top head, each shaded by that head's attention from the
    decision position (shade: weight / the head's largest weight on this prompt; hover: the weight)."""
    require(ds, "attention", "token_text", "top_layer", "top_head")
    prompts = list(prompts) if prompts is not None else [str(p) for p in values(ds["prompt"])]
    ranks = values(ds["rank"]).astype(int)
    heads = [f"L{int(la)}H{int(h)}" for la, h in zip(values(ds["top_layer"]), values(ds["top_head"]))]

    def frame(p: str) -> hv.Overlay:
        one = ds.sel(prompt=p, side=side)
        text = values(one["token_text"])
        rects, labels, titles, row = [], [], [], 0.0
        for r, name in zip(ranks, heads):
            titles.append((0, row + 0.45, f"#{r} {name}"))
            cells, words, row = _token_cells(values(one["attention"].sel(rank=r)).astype(float), text, row)
            rects += [c + (name,) for c in cells]
            labels += words
        boxes = hv.Rectangles(rects, vdims=["shade", "attention", "token", "head"]).opts(
            color="shade", cmap="Oranges", clim=(0, 1), line_color="#dddddd", tools=["hover"])
        words = hv.Labels(labels, ["x", "y"], "text").opts(text_font_size="7pt", text_color="black")
        names = hv.Labels(titles, ["x", "y"], "text").opts(text_font_size="8pt", text_align="left",
                                                           text_color="#333333")
        return (boxes * words * names).opts(title=f"{p}: attention of the top heads from the decision position "
                                                  f"({side} prompt)")

    def empty(p: str) -> hv.Overlay:
        return hv.Overlay([hv.Rectangles([], vdims=[])]).opts(title=f"{p}: not computed")

    n_tok = max(1, int(np.isfinite(values(ds["attention"])).sum(-1).max()))
    height = int(min(2400, 60 + len(ranks) * ((n_tok + PER_LINE - 1) // PER_LINE + 1.2) * 22))
    return prompt_map(prompts, frame, [str(p) for p in values(ds["prompt"])], empty, width=WIDE, height=height,
                      xaxis=None, yaxis=None, shared_y=True)


def figures(ds: xr.Dataset, prompts: Sequence[str] | None = None) -> tuple[list[Figure], list[str]]:
    """The attention-head figures (figures whose inputs are missing are skipped)."""
    if "prompt" not in ds.dims:
        raise MissingData("heads: no prompt dim")
    n = ds.sizes["prompt"]
    k = int(values(ds["effect_defined"]).sum()) if "effect_defined" in ds else n
    return collect([
        lambda: Figure("heads_mean_effect", "Mean effect per head", effect_heatmap(ds), SECTION,
                       note="Each cell: the base run with one head's output (its slice of o_proj's input, query "
                            "heads) at the decision position taken from the counterfactual; effect = (patched − "
                            f"base) / (cf − base), mean over the {k} of {n} pairs whose gap is at least min_gap, "
                            f"{metrics.ci_label('pairs', k)}. Hover: the CI and the head's mean direct logit "
                            "attribution."),
        lambda: Figure("heads_attention", "What the top heads read", attention_text(ds, prompts), SECTION,
                       per_prompt=True,
                       note="For the heads with the largest mean |effect| (ties: |DLA|), the base prompt's tokens "
                            "shaded by the head's attention from the decision position (darkest: the head's largest "
                            "weight on this prompt; hover: the weight)."),
    ])

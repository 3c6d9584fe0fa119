"""Across framings: the decision in every wording, label set and label order, and content swap versus label swap.

Reads ``framings.nc`` (:mod:`nnethics.framings_verdict`; dims ``framing``, ``prompt``, ``side``): per (framing,
prompt) ``ethical_preference`` and ``position_bias``; per framing their means with BCa 95% CIs
(``mean_<stem>``, ``<stem>_ci_low``, ``<stem>_ci_high``) and ``n_pairs``; ``pooled_ethical_preference (prompt)``
(the mean over framings), ``sign_agreement`` and ``krippendorff_alpha``; the cloze readout's ``cloze_margin
(prompt)`` and ``cloze_mc_agreement``; the ``framings_verdict`` attr. A statistic the file lacks is computed here
with the same methods (:func:`nnethics.metrics.mean_ci`, :func:`nnethics.metrics.proportion_ci`).

The second section (:mod:`.counterfactual_kinds`) reads ``framings/<id>/patching.nc`` of a content framing
(``<t>.<l>.fwd``, else ``.rev``) and of the label swap of the same template and labels (``<t>.<l>.swap``).

:func:`load_files` is what the report reads from a model folder beside the analyses' files; :func:`figures`
draws ``framings.nc`` and :func:`folder_figures` everything (both sections) from what :func:`load_files` gave.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import holoviews as hv
import numpy as np
import xarray as xr

from . import counterfactual_kinds
from ._base import (
    HEIGHT,
    WIDE,
    WIDTH,
    Figure,
    MissingData,
    ci_label,
    collect,
    mean_ci,
    require,
    share,
    values,
)

SECTION = "Across framings"
BINDING_SECTION = counterfactual_kinds.SECTION
#: Where each section goes in the report: after the named section (else at the end).
AFTER = {SECTION: "What the model decided", BINDING_SECTION: "Causal tracing"}
SUMMARY = "framings"  # store/<model>/framings.nc (nnethics.framings_run.SUMMARY)
BINDING, FOLDER = counterfactual_kinds.BINDING, counterfactual_kinds.FOLDER
TEMPLATE_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")
POOLED = "pooled (mean over framings)"
VERDICT_MAX = 440  # px of verdict text shown before it scrolls


def load_files(folder: str | Path) -> tuple[dict[str, xr.Dataset], list[str]]:
    """What a model folder holds for these sections: ``framings.nc`` as ``"framings"``, ``binding.nc`` as
    ``"binding"``, and ``"framings/<id>/patching"`` for each content/label pair of framings
    (:func:`.counterfactual_kinds.kind_pairs`); with notes on unreadable files."""
    from ..store import load

    folder = Path(folder)
    out: dict[str, xr.Dataset] = {}
    notes: list[str] = []
    paths = {name: folder / f"{name}.nc" for name in (SUMMARY, BINDING)}
    ids = sorted(p.name for p in (folder / FOLDER).glob("*") if (p / "patching.nc").is_file())
    for content, label in counterfactual_kinds.kind_pairs(ids):
        for fid in (content, label):
            paths[f"{FOLDER}/{fid}/patching"] = folder / FOLDER / fid / "patching.nc"
    for key, path in paths.items():
        if not path.is_file():
            continue
        try:
            out[key] = load(path)
        except (OSError, ValueError) as e:
            notes.append(f"{path.relative_to(folder)}: unreadable ({e})")
    return out, notes


def with_sections(names: Sequence[str]) -> list[str]:
    """The report's ``names`` of sections with these two placed after the sections :data:`AFTER` names."""
    out = [n for n in names if n not in AFTER]
    for section, after in AFTER.items():
        out.insert(out.index(after) + 1 if after in out else len(out), section)
    return out


# ------------------------------------------------------------------------------------------------ statistics

def _framing_ids(ds: xr.Dataset) -> list[str]:
    require(ds, "framing")
    return [str(f) for f in values(ds["framing"])]


def _coord(ds: xr.Dataset, name: str, part: int | None) -> list[str]:
    """A per-framing coordinate (``template``...), else that ``part`` of the id ``<template>.<labels>.<order>``
    ("" for none)."""
    if name in ds.variables and ds[name].dims == ("framing",):
        return [str(v) for v in values(ds[name])]
    return [(f.split(".") + ["", "", ""])[part] if part is not None else "" for f in _framing_ids(ds)]


def stat(ds: xr.Dataset, stem: str, per_pair: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mean, low, high)`` of ``stem`` as stored (``mean_<stem>``, ``<stem>_ci_low``, ``<stem>_ci_high``), else
    the BCa bootstrap over pairs of ``per_pair`` (default ``stem``), computed here."""
    names = (f"mean_{stem}", f"{stem}_ci_low", f"{stem}_ci_high")
    if all(n in ds.variables for n in names):
        return tuple(np.atleast_1d(values(ds[n]).astype(float)) for n in names)
    source = per_pair or stem
    require(ds, source)
    return tuple(np.atleast_1d(values(a).astype(float)) for a in mean_ci(ds[source], "prompt"))


def n_pairs(ds: xr.Dataset, var: str = "ethical_preference") -> np.ndarray:
    """Pairs behind each framing's mean: ``n_debiased`` (the pairs that swap the ethical label, which the means are
    over) or ``n_pairs`` as stored, else the finite ``var`` values per framing."""
    for name in ("n_debiased", "n_pairs"):
        if name in ds.variables and ds[name].dims == ("framing",):
            return values(ds[name]).astype(int)
    require(ds, var)
    return values(np.isfinite(ds[var]).sum("prompt")).astype(int)


def content_framings(ds: xr.Dataset) -> list[str]:
    """The content-swap framings (``counterfactual_kind`` coordinate; ids ending ``.swap`` are label swaps): the
    pooled preference and the agreement are over these."""
    kinds = _coord(ds, "counterfactual_kind", None)
    return [f for f, k in zip(_framing_ids(ds), kinds) if (k or ("label" if f.endswith(".swap") else "content"))
            == "content"]


# ------------------------------------------------------------------------------------------------ figures

def verdict_div(ds: xr.Dataset) -> hv.Div:
    """The ``framings_verdict`` paragraph of ``framings.nc`` (escaped), with what it rests on."""
    text = ds.attrs.get("framings_verdict")
    if not text:
        raise MissingData("framings: no framings_verdict attr")
    fids = _framing_ids(ds)
    templates = sorted(set(_coord(ds, "template", 0)))
    lines = len(str(text)) // 125 + 1 + str(text).count("\n")  # ~125 characters a line at 15px
    box = int(min(VERDICT_MAX, 22 * lines + 22))  # a longer verdict (many framings) scrolls in its box
    body = (f"<div style='font-size:15px;line-height:1.45;max-width:{WIDE - 20}px;background:#f4f6fa;"
            f"border-left:4px solid #55a868;padding:10px 14px;max-height:{box}px;overflow-y:auto'>"
            f"{html.escape(str(text))}</div>"
            f"<p style='font-size:12px;color:#555;margin:4px 0'>{len(fids)} framings ({len(templates)} templates: "
            f"{html.escape(', '.join(templates))}), {ds.sizes.get('prompt', 0)} pairs"
            f"{' (the paragraph scrolls)' if 22 * lines + 22 > VERDICT_MAX else ''}. Each framing's preference is "
            "debiased over its two content orders; the label orders (fwd, rev) swap which label stands beside which "
            "option. Intervals: BCa bootstrap 95% CI over pairs for means, Wilson score for shares.</p>")
    return hv.Div(body).opts(width=WIDE, height=box + 75)


@dataclass
class Row:
    """One row of a forest plot: a label, its colour group, the mean with its CI and the n behind it."""

    label: str
    group: str
    mean: float
    low: float
    high: float
    n: int
    block: str = ""  # rows of one block sit together (a gap between blocks); default: the group
    tick: str | None = None  # the y tick (default: the label)


def forest_rows(ds: xr.Dataset, stem: str, pooled: bool = True) -> list[Row]:
    """One row per framing (grouped by template, then label set, then order, each in first-seen order) and, with
    ``pooled``, the pooled estimate (``pooled_<stem>``) last."""
    fids = _framing_ids(ds)
    mean, lo, hi = stat(ds, stem)
    n = n_pairs(ds, stem if stem in ds.variables else "ethical_preference")
    templates, label_sets, orders = (_coord(ds, c, i) for i, c in enumerate(("template", "label_set", "order")))
    content = set(content_framings(ds))
    rows = [Row(f, t, float(m), float(a), float(b), int(k), tick=None if f in content else f"{f} (label swap)")
            for f, t, m, a, b, k in zip(fids, templates, mean, lo, hi, n)]
    # by template, then label set, then order (each in first-seen order): a label set's two orders side by side
    rank = [{v: i for i, v in enumerate(dict.fromkeys(c))} for c in (templates, label_sets, orders)]
    key = {f: tuple(r[v] for r, v in zip(rank, parts)) for f, *parts in zip(fids, templates, label_sets, orders)}
    rows.sort(key=lambda r: key[r.label])
    if pooled and f"pooled_{stem}" in ds.variables:
        m, a, b = (float(x[0]) for x in stat(ds, f"pooled_{stem}"))
        k = int(values(ds["n_pooled"])) if "n_pooled" in ds.variables else int(
            np.isfinite(values(ds[f"pooled_{stem}"])).sum())
        rows.append(Row(POOLED, POOLED, m, a, b, k))
    elif pooled:  # an empty row, so that panels side by side keep their rows aligned
        rows.append(Row(POOLED, POOLED, np.nan, np.nan, np.nan, 0, tick="pooled: not stored"))
    return rows


def row_positions(rows: Sequence[Row]) -> np.ndarray:
    """y of each row, top to bottom (0, −1, ...), with a gap of half a row where the block (group) changes."""
    y, out, prev = 0.0, [], None
    for r in rows:
        block = r.block or r.group
        if prev is not None and block != prev:
            y -= 0.5
        out.append(y)
        y -= 1.0
        prev = block
    return np.array(out)


def forest(rows: Sequence[Row], title: str, xlabel: str, colors: Mapping[str, str] | None = None,
           legend: bool = True, width: int = WIDTH, legend_position: str = "right") -> hv.Overlay:
    """Means (dots) with their CIs (horizontal segments), one row each, coloured by group; a line at 0. The pooled
    row is a black diamond. Hover gives the row, the mean, the CI and n."""
    ys = row_positions(rows)
    groups = list(dict.fromkeys(r.group for r in rows))
    colors = dict(colors or {})
    for i, g in enumerate(x for x in groups if x not in colors):
        colors[g] = "#222222" if g == POOLED else TEMPLATE_COLORS[i % len(TEMPLATE_COLORS)]
    parts: list = [hv.VLine(0).opts(color="gray", line_dash="dotted", line_width=1)]
    for g in groups:
        idx = [i for i, r in enumerate(rows) if r.group == g]
        sel = [rows[i] for i in idx]
        y = ys[idx]
        lo = np.array([r.low for r in sel])
        hi = np.array([r.high for r in sel])
        ok = np.isfinite(lo) & np.isfinite(hi)
        parts.append(hv.Segments((lo[ok], y[ok], hi[ok], y[ok]), kdims=["x0", "y0", "x1", "y1"]).opts(
            color=colors[g], line_width=2))
        parts.append(hv.Points((np.array([r.mean for r in sel]), y, [r.label for r in sel], lo, hi,
                                np.array([r.n for r in sel])),
                               kdims=[xlabel, "row"], vdims=["framing", "ci low", "ci high", "n"], label=g).opts(
            color=colors[g], size=11 if g == POOLED else 8, marker="diamond" if g == POOLED else "circle",
            tools=["hover"]))
    finite = [v for r in rows for v in (r.mean, r.low, r.high) if np.isfinite(v)] + [0.0]
    span = (max(finite) - min(finite)) or 1.0
    blocks = len({r.block or r.group for r in rows})
    return hv.Overlay(parts).opts(
        title=title, width=width, height=int(max(HEIGHT, 22 * len(rows) + 11 * blocks + 110)),
        yticks=[(float(y), r.label if r.tick is None else r.tick) for y, r in zip(ys, rows)], ylim=(float(ys.min()) - 0.8, 0.8),
        xlim=(min(finite) - 0.08 * span, max(finite) + 0.08 * span), xlabel=xlabel, ylabel="",
        show_legend=legend, legend_position=legend_position, show_grid=True)


def forest_plots(ds: xr.Dataset) -> hv.Layout:
    """Left: the ethical preference per framing and pooled; right: the position bias per framing (what a model
    that ignores the content shows), each with its BCa 95% CI over pairs."""
    pref = forest_rows(ds, "ethical_preference")
    bias = forest_rows(ds, "position_bias", pooled=False)
    # pooled, the position bias is the label-token prior: each couple's fwd and rev biases average the slot out
    got = {s: [float(x[0]) for x in stat(ds, f"pooled_{s}")] if f"mean_pooled_{s}" in ds.variables else [np.nan] * 3
           for s in ("token_prior", "slot_bias")}
    bias.append(Row(POOLED, POOLED, *got["token_prior"], int(values(ds.get("n_pooled_slot", xr.DataArray(0)))),
                    tick="pooled: label-token prior"))
    sm, slo, shi = got["slot_bias"]
    slot = f"\npooled slot bias {sm:+.3g} logits [{slo:+.3g}, {shi:+.3g}]" if np.isfinite(sm) else ""
    n = sorted({r.n for r in pref if r.group != POOLED})
    n_txt = f"n={n[0]} pairs" if len(n) == 1 else f"n={n[0]}-{n[-1]} pairs per framing"
    left = forest(pref, f"Ethical preference per framing ({n_txt})\n{ci_label('pairs')}",
                  "ethical preference (logits; > 0: leans ethical)", legend=False)
    right = forest(bias, f"Position bias per framing ({n_txt})\n{ci_label('pairs')}{slot}",
                   "position bias (logits; > 0: favours label a, the set's first)", legend=False)
    return hv.Layout([left, right]).cols(2).opts(shared_axes=False)


def cloze_scatter(ds: xr.Dataset) -> hv.Overlay:
    """Each pair's pooled multiple-choice preference (x, logits) against its cloze margin (y, nats), quadrant lines
    at 0; points where the two agree in sign are green, the others red. The title gives the agreement share."""
    require(ds, "pooled_ethical_preference", "cloze_margin")
    x = values(ds["pooled_ethical_preference"].transpose("prompt")).astype(float)
    y = values(ds["cloze_margin"].transpose("prompt")).astype(float)
    prompts = values(ds["prompt"]).astype(str)
    both = np.isfinite(x) & np.isfinite(y)
    agree = both & (np.sign(x) == np.sign(y))
    s = share(ds, "cloze_mc_agreement", int(agree.sum()), int(both.sum()), "n_cloze_mc")
    xl, yl = "multiple choice: pooled ethical preference (logits)", "cloze: ethical margin (nats)"
    parts: list = [hv.HLine(0).opts(color="gray", line_dash="dotted", line_width=1),
                   hv.VLine(0).opts(color="gray", line_dash="dotted", line_width=1)]
    for name, mask, color in (("same sign", agree, "#55a868"), ("opposite sign", both & ~agree, "#c44e52")):
        parts.append(hv.Points((x[mask], y[mask], prompts[mask]), kdims=[xl, yl], vdims=["prompt"],
                               label=f"{name} ({int(mask.sum())})").opts(color=color, size=8, alpha=0.8,
                                                                        tools=["hover"]))
    return hv.Overlay(parts).opts(
        title=f"Multiple choice vs cloze per pair: same sign on {s.k} of {s.n} pairs\n({s.text()})", width=WIDTH, height=HEIGHT + 60, legend_position="bottom_right",
        xlabel=xl, ylabel=yl, show_legend=True)


HEATMAP_LABELS_MAX = 60  # prompt ids on the x axis up to this many pairs; above, hover only


def agreement_heatmap(ds: xr.Dataset) -> hv.HeatMap:
    """The ethical preference of every (framing, pair): framings as rows (in file order, first at the top), pairs
    as columns (ordered by their pooled preference when stored, else file order). The colour's sign is the lean;
    its scale is symmetric, capped at the 95th percentile of |preference| so a few large values do not wash out
    the signs of the rest. The title gives the share of pairs leaning the same way in every framing and
    Krippendorff's alpha."""
    require(ds, "ethical_preference")
    content = set(content_framings(ds))
    if not content:
        raise MissingData("framings: no content framing to compare")
    # rows in the forest plot's order (template, label set, order), so the two figures read alike
    fids = [r.label for r in forest_rows(ds, "ethical_preference", pooled=False) if r.label in content]
    da = ds["ethical_preference"].sel(framing=fids).transpose("framing", "prompt")
    v = values(da).astype(float)
    prompts = [str(p) for p in values(ds["prompt"])]
    cols = list(range(len(prompts)))
    if "pooled_ethical_preference" in ds.variables:
        pooled = values(ds["pooled_ethical_preference"].transpose("prompt")).astype(float)
        cols = sorted(cols, key=lambda j: (not np.isfinite(pooled[j]), pooled[j] if np.isfinite(pooled[j]) else 0))
    xs = np.tile([prompts[j] for j in cols], len(fids))
    ys = np.repeat(fids, len(cols))
    vals = v[:, cols].ravel()
    full = np.isfinite(v).all(0)
    signs = np.sign(v[:, full])  # as nnethics.framings_verdict.sign_agreement: the same sign (−, 0, +) throughout
    s = share(ds, "sign_agreement", int((signs == signs[:1]).all(0).sum()), int(full.sum()), "n_agreement")
    if "krippendorff_alpha" not in ds.variables:
        a_txt = "Krippendorff's α: not stored"
    else:
        alpha = float(values(ds["krippendorff_alpha"]))
        a_txt = (f"Krippendorff's α = {alpha:.2f}" if np.isfinite(alpha) else
                 "Krippendorff's α undefined (fewer than 2 framings, or one sign throughout)")
    cap = float(np.nanpercentile(np.abs(vals), 95)) if np.isfinite(vals).any() else 1.0
    cap = cap if cap > 0 else 1.0
    hm = hv.HeatMap((xs, ys, vals), kdims=["pair", "framing"], vdims=["ethical preference"])
    hm = hm.redim.values(pair=[prompts[j] for j in cols], framing=fids)
    many = len(prompts) > HEATMAP_LABELS_MAX
    return hm.opts(
        cmap="RdBu", clim=(-cap, cap), colorbar=True, tools=["hover"], invert_yaxis=True,
        width=WIDE, height=int(min(900, max(240, 20 * len(fids) + 150))), xrotation=90,
        xaxis="bare" if many else "bottom", clipping_colors={"NaN": "#e0e0e0"},
        title=f"Ethical preference per framing × pair (blue: leans ethical)\nsame sign in all {len(fids)} content "
              f"framings on {s.k} of {s.n} pairs ({s.text()}); {a_txt}",
        xlabel="pair" + (" (hover for the id)" if many else ""), ylabel="")


# ------------------------------------------------------------------------------------------------ assembly

def figures(ds: xr.Dataset, prompts: Sequence[str] | None = None) -> tuple[list[Figure], list[str]]:
    """The figures of ``framings.nc`` (those whose inputs are missing are skipped)."""
    return collect([
        lambda: Figure("framings_verdict", "Verdict across framings", verdict_div(ds), SECTION),
        lambda: Figure("framings_forest", "Preference and position bias per framing", forest_plots(ds), SECTION,
                       note="One row per framing (template.labels.order), coloured by template; the pooled row is "
                            "each pair's mean over the content framings, averaged over the pairs all of them hold. The position bias is what a "
                            "model that ignores the content would show; the preference is debiased over the two "
                            "content orders of each pair."),
        lambda: Figure("framings_agreement", "Agreement across framings", agreement_heatmap(ds), SECTION,
                       note="Each cell is one pair's ethical preference in one framing; a column of one colour is a "
                            "pair the model decides the same way however it is asked. Hover for the values."),
        lambda: Figure("framings_cloze", "Multiple choice versus cloze", cloze_scatter(ds), SECTION,
                       note="Cloze: the log-probability of the ethical option's own text minus the other's after the "
                            "scenario, no labels at all. A pair in the upper right or lower left leans the same way "
                            "in both formats."),
    ])


def folder_figures(data: Mapping[str, xr.Dataset], prompts: Sequence[str] | None = None
                   ) -> tuple[list[Figure], list[str]]:
    """Every figure of both sections from what :func:`load_files` read (none when the folder has no framings)."""
    figs: list[Figure] = []
    skipped: list[str] = []
    if SUMMARY in data:
        figs, skipped = figures(data[SUMMARY], prompts)
    f, s = counterfactual_kinds.figures(data)
    return figs + f, skipped + s


def file_items(data: Mapping[str, xr.Dataset]) -> list[str]:
    """The report's provenance list entries for the files :func:`load_files` read."""
    out = []
    for key, ds in data.items():
        if key == SUMMARY or key == BINDING or key.startswith(f"{FOLDER}/"):
            dims = ", ".join(f"{k}={v}" for k, v in ds.sizes.items())
            out.append(f"<li><b>{html.escape(key)}.nc</b> ({html.escape(dims)}; "
                       f"{html.escape(str(ds.attrs.get('created', '')))})</li>")
    return out

"""Content swap versus label swap: the mean patching effect per layer of both counterfactual kinds on one figure.

A framed run (:mod:`nnethics.framings_run`) writes ``store/<model>/framings/<id>/patching.nc`` per framing. For a
template and label set with both a content framing (``<t>.<l>.fwd``, else ``.rev``: the counterfactual exchanges the
options, each keeping the label beside it) and the label swap (``<t>.<l>.swap``: only the two labels are exchanged),
:func:`kind_curves` draws both kinds' mean effect per layer with their CI bands, n in the legend and a ``component``
selector; the binding sentence and crossing layers (``binding.nc`` of these framings, else
:func:`nnethics.binding.binding_dataset` of the two files, imported lazily) go into the note and the figure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import holoviews as hv
import numpy as np
import xarray as xr

from ._base import HEIGHT, WIDE, Figure, MissingData, band_and_curve, ci_label, collect, mean_ci, require, values

SECTION = "Content swap versus label swap"
BINDING = "binding"  # store/<model>/binding.nc (nnethics.binding), when present
FOLDER = "framings"  # store/<model>/framings/<id>/
KIND_COLORS = {"content": "#4c72b0", "label": "#dd8452"}


def kind_pairs(ids: Sequence[str]) -> list[tuple[str, str]]:
    """``(content framing id, label-swap framing id)`` for each ``<t>.<l>.swap`` in ``ids`` whose template and labels
    also have a content framing (``fwd`` preferred, else ``rev``), in ``ids`` order."""
    have = set(ids)
    out = []
    for fid in ids:
        stem, _, order = fid.rpartition(".")
        if order != "swap":
            continue
        content = next((f"{stem}.{o}" for o in ("fwd", "rev") if f"{stem}.{o}" in have), None)
        if content is not None:
            out.append((content, fid))
    return out


def kind_effect(ds: xr.Dataset, component: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """``(layers, mean, low, high, n)`` of one patching file's ``effect`` for ``component``: the stored mean and CI
    when present, else the BCa bootstrap over pairs; n = pairs with a defined effect."""
    from ..analyses.patching.figures_effect import CI_NAMES

    require(ds, "effect", "layer")
    eff = ds["effect"].sel(component=component) if "component" in ds["effect"].dims else ds["effect"]
    eff = eff.transpose("prompt", "layer")
    n = int(np.isfinite(values(eff)).any(1).sum())
    stored = next((c for c in CI_NAMES if all(x in ds.variables for x in c)), None)
    if stored is not None and "mean_effect" in ds.variables:
        def sel(v: str) -> np.ndarray:
            da = ds[v].sel(component=component) if "component" in ds[v].dims else ds[v]
            return values(da.transpose("layer")).astype(float)
        mean, lo, hi = sel("mean_effect"), sel(stored[0]), sel(stored[1])
    else:
        mean, lo, hi = (values(a.transpose("layer")).astype(float) for a in mean_ci(eff, "prompt"))
    return values(ds["layer"]).astype(int), mean, lo, hi, n


def binding_info(data: Mapping[str, xr.Dataset], content: xr.Dataset, label: xr.Dataset, ids: tuple[str, str]
                 ) -> tuple[str, xr.Dataset | None]:
    """``(sentence, binding Dataset)`` for these two files: ``binding.nc`` when it is of these framings, else
    :func:`nnethics.binding.binding_dataset` of the two (imported here: the figure does not need it). Without
    either, ``("", None)``; where the module refuses the files, the sentence says why and the Dataset is None."""
    stored = data.get(BINDING)
    if stored is not None and (str(stored.attrs.get("content_framing") or ids[0]), str(
            stored.attrs.get("label_framing") or ids[1])) == ids:
        return str(stored.attrs.get("binding", "")), stored
    try:
        from .. import binding
    except ImportError:
        return "", None
    try:
        ds = binding.binding_dataset(content, label)
    except (ValueError, KeyError) as e:
        return f"No binding sentence for these files: {e}.", None
    return str(ds.attrs.get("binding", "")), ds


def crossing_marks(bds: xr.Dataset | None, component: str) -> list:
    """The rule's threshold (a dashed horizontal line) and each kind's crossing layer of ``component`` (a dashed
    vertical line in the kind's colour) from a binding Dataset; none without one or where a layer is not reached."""
    if bds is None or "patch_crossing_layer" not in bds or component not in [str(c) for c in values(bds["component"])]:
        return []
    cross = bds["patch_crossing_layer"].sel(component=component)
    if "position" in cross.dims:
        if -1 not in values(bds["position"]).tolist():
            return []
        cross = cross.sel(position=-1)
    never = int(bds.attrs.get("never", -1))
    out = [hv.HLine(float(bds.attrs.get("threshold", 0.5))).opts(color="#888", line_dash="dashed", line_width=1)]
    for kind in (k for k in KIND_COLORS if k in [str(x) for x in values(bds["kind"])]):
        layer = int(cross.sel(kind=kind))
        if layer != never:
            out.append(hv.VLine(float(layer)).opts(color=KIND_COLORS[kind], line_dash="dashed", line_width=1.5))
    return out


def kind_curves(content: xr.Dataset, label: xr.Dataset, ids: tuple[str, str], binding: xr.Dataset | None = None
                ) -> hv.HoloMap:
    """Mean patching effect per layer of the content swap and of the label swap of one template and label set, with
    their CI bands and n in the legend, and the crossing layers of ``binding`` (:func:`crossing_marks`); a
    ``component`` selector (resid first)."""
    from ..analyses.patching.figures_effect import effect_kind, effect_label

    if effect_kind(content) != effect_kind(label):
        raise MissingData(f"framings: {ids[0]} and {ids[1]} patching hold effects of different kinds "
                          f"({effect_kind(content)}, {effect_kind(label)}); rerun one with the other's options")
    comps = [str(c) for c in values(content["component"])] if "component" in content.dims else ["effect"]
    comps = sorted(comps, key=lambda c: (c != "resid", comps.index(c)))
    stem = ids[0].rpartition(".")[0]
    frames = {}
    for comp in comps:
        if "component" in label.dims and comp not in [str(c) for c in values(label["component"])]:
            continue
        parts = []
        for kind, fid, ds in (("content", ids[0], content), ("label", ids[1], label)):
            layers, mean, lo, hi, n = kind_effect(ds, comp)
            what = "content swap (options exchanged)" if kind == "content" else "label swap (labels exchanged)"
            parts.append(band_and_curve(layers, mean, lo, hi, f"{what}, {fid} (n={n} pairs)", KIND_COLORS[kind],
                                        vdim="effect"))
        parts.append(hv.HLine(0).opts(color="gray", line_dash="dotted", line_width=1))
        parts += crossing_marks(binding, comp)
        frames[comp] = hv.Overlay(parts).opts(
            title=f"{stem}: mean patching effect by layer, {comp}\n{ci_label('pairs')}", width=WIDE, height=HEIGHT + 40,
            legend_position="top_left", xlabel="layer", ylabel=effect_label(content))
    if not frames:
        raise MissingData(f"framings: no component in common between {ids[0]} and {ids[1]} patching")
    return hv.HoloMap(frames, kdims=[hv.Dimension("component")], sort=False)


def figures(data: Mapping[str, xr.Dataset]) -> tuple[list[Figure], list[str]]:
    """One figure per content/label pair among the ``"framings/<id>/patching"`` entries of ``data``."""
    figs: list[Figure] = []
    skipped: list[str] = []
    ids = sorted(k.split("/")[1] for k in data if k.startswith(f"{FOLDER}/") and k.endswith("/patching"))
    for content_id, label_id in kind_pairs(ids):
        content, label = (data[f"{FOLDER}/{i}/patching"] for i in (content_id, label_id))
        stem = content_id.rpartition(".")[0]

        def build(content=content, label=label, ids=(content_id, label_id), stem=stem) -> Figure:
            sentence, bds = binding_info(data, content, label, ids)
            note = ("Patching from the counterfactual into the base run, per layer, for two counterfactuals of the "
                    "same pairs: the content swap exchanges the options (the label beside each stays), the label "
                    "swap exchanges only the two labels. Where the label-swap curve rises, the model reads which "
                    "label goes with which option.")
            if bds is not None:
                note += (f" Dashed: the threshold {float(bds.attrs.get('threshold', 0.5)):g} and each kind's "
                         "crossing layer (the first layer whose mean effect reaches it).")
            return Figure(f"framings_kinds_{stem.replace('.', '_')}", f"Content swap vs label swap ({stem})",
                          kind_curves(content, label, ids, bds), SECTION,
                          note=(sentence + " " if sentence else "") + note)

        f, s = collect([build])
        figs += f
        skipped += s
    return figs, skipped

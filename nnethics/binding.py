"""Content versus binding: where the choice between the options and the label beside it reach the decision.

Two patching files of one model and one template and label set are compared (README: "Content versus binding:
the label swap"):

* the **content swap** (``<template>.<labels>.fwd``): the counterfactual shows the options in the other order
  under the same labels; the patched difference is the content at each slot;
* the **label swap** (``<template>.<labels>.swap``): the counterfactual shows the options where the base does and
  exchanges their labels; the patched difference is the two label tokens beside the options.

Per kind and component, the **crossing layer** is the first layer whose mean (normalised) patching effect
reaches :attr:`BindingRules.threshold` (0.5: the patched cell carries half of the counterfactual's change).
Its uncertainty is read off the stored 95% CI band (BCa bootstrap over the pairs, per layer, as stored in
``effect_ci_low``/``effect_ci_high``) as a layer range: from the first layer whose CI upper bound reaches the
threshold (the earliest crossing the band allows) to the first layer whose CI lower bound reaches it (the layer
by which the band says it has surely crossed). A bootstrap of the crossing layer itself would resample an integer
argmin with many ties, where BCa's jackknife is undefined; the band is the one CI method already stored and
drawn, and the range is exactly where a reader sees it meet the 0.5 line. It is a pointwise band, not a
simultaneous one (see the README's limits). :data:`NEVER` (−1) stands for a threshold not reached in the stored
layers (and, for the range, for a band that is undefined with under 2 pairs).

:func:`binding_order` applies the rule (:class:`BindingRules`) to the residual stream at the decision position;
:func:`binding_text` writes the sentence; :func:`binding_dataset` is what ``store/<model>/binding.nc`` holds.
No text is written per model. NumPy and xarray only (no torch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import xarray as xr

from . import metrics

CONTENT, LABEL = "content", "label"
KINDS = (CONTENT, LABEL)
NEVER = -1  # a crossing (or a range end) not reached in the stored layers
DECIDES_FIRST = "decides before it binds"
BINDS_FIRST = "binds before it decides"
UNRESOLVED = "cannot tell apart at this n"
LAST = -1  # the decision position in a grid file (positions counted from the end)

_WHAT = {CONTENT: "the options exchange places, the labels stay",
         LABEL: "the labels exchange places, the options stay"}
_COMPONENT = {"resid": "the residual stream", "attn": "attention", "mlp": "the MLP"}
_SHORT = {"resid": "residual stream", "attn": "attention", "mlp": "MLP"}


@dataclass(frozen=True)
class BindingRules:
    """The rule the binding sentence follows (documented in the README).

    * The **crossing layer** of a component is the first layer whose mean effect is at least ``threshold``;
      its range runs from the first layer whose CI upper bound is at least ``threshold`` to the first layer
      whose CI lower bound is.
    * "decides before it binds" when the content swap's ``component`` range (at the decision position) ends
      strictly before the label swap's begins; "binds before it decides" the reverse; otherwise (ranges that
      share a layer, a range that never ends in the stored layers, or a kind with fewer than ``min_pairs``
      pairs whose effect is defined) "cannot tell apart at this n".
    * A caution is added when, in either kind, fewer than ``min_consistent`` of the pairs behind the means
      choose the same option on both sides (``chose_ethical_base == chose_ethical_cf``): there the choice does not
      follow the content, and the swap moves a label or slot preference rather than a decision.
    """

    threshold: float = 0.5
    component: str = "resid"
    min_pairs: int = 2  # a CI needs 2 values (metrics.mean_ci gives NaN under 2)
    min_consistent: float = 0.5


def first_layer(values: np.ndarray, layers: Sequence[int], threshold: float = 0.5, axis: int = -1) -> np.ndarray:
    """The first of ``layers`` (ascending, along ``axis``) where ``values >= threshold``; :data:`NEVER` where none
    (NaN never reaches). Returns an int32 array with ``axis`` removed."""
    lay = np.asarray(layers, dtype=np.int64)
    if lay.size > 1 and np.any(np.diff(lay) <= 0):
        raise ValueError(f"layers must be strictly ascending, got {lay.tolist()}")
    v = np.moveaxis(np.asarray(values, dtype=np.float64), axis, -1)
    if v.shape[-1] != lay.size:
        raise ValueError(f"{v.shape[-1]} values along the layer axis but {lay.size} layers")
    with np.errstate(invalid="ignore"):
        hit = np.isfinite(v) & (v >= threshold)
    if lay.size == 0:
        return np.full(v.shape[:-1], NEVER, dtype=np.int32)
    return np.where(hit.any(axis=-1), lay[hit.argmax(axis=-1)], NEVER).astype(np.int32)


def _check(ds: xr.Dataset, kind: str) -> None:
    missing = [v for v in ("mean_effect", "effect_ci_low", "effect_ci_high", "effect_defined") if v not in ds]
    if missing:
        raise ValueError(f"the {kind} swap's patching Dataset lacks {', '.join(missing)}; pass a finalised "
                         "patching.nc or patching_grid.nc (nnethics.store.load)")
    got = ds.attrs.get("counterfactual_kind")
    if got is not None and got != kind:
        raise ValueError(f"the Dataset passed as the {kind} swap is a {got} swap (framing "
                         f"{ds.attrs.get('framing', '?')}); pass the content swap first, the label swap second")
    effect_kind = ds["effect"].attrs.get("effect_kind") if "effect" in ds else None
    if effect_kind not in (None, "normalized"):
        raise ValueError(f"the {kind} swap's effects are {effect_kind!r}; the crossing layer needs normalised "
                         "effects (1 = the counterfactual's logit difference)")
    if "corrupted_logit_diff" in ds:
        raise ValueError(f"the {kind} swap's file is a noise (causal tracing) file; pass counterfactual patching")


def _behind(ds: xr.Dataset) -> np.ndarray:
    ok = np.asarray(ds["effect_defined"].values, dtype=bool)
    if "skipped" in ds:
        ok &= ~np.asarray(ds["skipped"].values, dtype=bool)
    return ok


def defined_pairs(ds: xr.Dataset) -> int:
    """Pairs behind the means: ``effect_defined`` and not ``skipped`` (a grid file's pairs of unequal lengths)."""
    return int(_behind(ds).sum())


def consistent_pairs(ds: xr.Dataset) -> int | None:
    """Pairs behind the means whose base and counterfactual runs choose the same option (the choice follows the
    content: ``chose_ethical_base == chose_ethical_cf``); None where the file does not say what was chosen."""
    if "chose_ethical_base" not in ds or "chose_ethical_cf" not in ds:
        return None
    same = np.asarray(ds["chose_ethical_base"].values, dtype=bool) == np.asarray(ds["chose_ethical_cf"].values,
                                                                                 dtype=bool)
    return int((same & _behind(ds)).sum())


def crossings(ds: xr.Dataset, threshold: float = 0.5) -> xr.Dataset:
    """One patching Dataset's crossing layers: ``patch_crossing_layer`` (first layer with mean effect ≥
    ``threshold``), ``patch_crossing_ci_first`` (first layer with CI upper bound ≥ it) and
    ``patch_crossing_ci_last`` (first layer with CI lower bound ≥ it), dims ``component`` (and ``position`` for a
    grid file); :data:`NEVER` where not reached."""
    layers = ds["layer"].values
    out = {}
    for name, var in (("patch_crossing_layer", "mean_effect"), ("patch_crossing_ci_first", "effect_ci_high"),
                      ("patch_crossing_ci_last", "effect_ci_low")):
        da = ds[var]
        dims = [d for d in da.dims if d != "layer"]
        out[name] = (dims, first_layer(da.values, layers, threshold, axis=da.dims.index("layer")))
    return xr.Dataset(out, coords={d: ds[d].values for d in ds["mean_effect"].dims if d != "layer"})


def _one(ds: xr.Dataset, kind: str, threshold: float) -> xr.Dataset:
    _check(ds, kind)
    out = crossings(ds, threshold)
    if "position" in ds["mean_effect"].dims:
        out = out.transpose("position", "component")
        early = ds["mean_effect"].isel(layer=0).transpose("position", "component").values.astype(np.float64)
        out["early_effect"] = (("position", "component"), early.astype(np.float32))
        ok = np.isfinite(early)
        top = ds["position"].values[np.argmax(np.where(ok, early, -np.inf), axis=0)]
        out["top_position"] = (("component",), np.where(ok.any(axis=0), top, 0).astype(np.int32))
    out["n_pairs"] = ((), np.int32(ds.sizes["prompt"]))
    out["n_defined"] = ((), np.int32(defined_pairs(ds)))
    consistent = consistent_pairs(ds)
    if consistent is not None:
        out["n_consistent"] = ((), np.int32(consistent))
    out["n_skipped"] = ((), np.int32(np.asarray(ds["skipped"].values, dtype=bool).sum() if "skipped" in ds else 0))
    out["min_gap"] = ((), np.float32(ds["effect_defined"].attrs.get("min_gap", metrics.DEFAULT_MIN_GAP)))
    return out


_INTS = ("patch_crossing_layer", "patch_crossing_ci_first", "patch_crossing_ci_last", "n_pairs", "n_defined",
         "n_consistent",
         "n_skipped", "top_position")


def binding_dataset(content: xr.Dataset, label: xr.Dataset, rules: BindingRules = BindingRules()) -> xr.Dataset:
    """``binding.nc``: dims ``kind`` (content, label) × ``component`` (× ``position`` for grid files) with the
    crossing layers and their CI ranges, the pairs behind them, and (grid) the mean effect at the first stored
    layer per position and the position where it is largest; attrs ``binding_order`` (the rule's result),
    ``binding`` (the sentence), ``threshold``, the CI method and both framings."""
    parts = [_one(content, CONTENT, rules.threshold), _one(label, LABEL, rules.threshold)]
    if sum("n_consistent" in p for p in parts) == 1:  # only one file says what was chosen
        parts = [p.drop_vars("n_consistent", errors="ignore") for p in parts]
    grids = {"position" in p.dims for p in parts}
    if len(grids) > 1:
        raise ValueError("one of the two files is a grid file (patching_grid.nc) and the other is not; pass two "
                         "patching.nc or two patching_grid.nc")
    for dim in ("layer", "component"):
        a, b = content[dim].values.tolist(), label[dim].values.tolist()
        if a != b:
            raise ValueError(f"the two files patch different {dim}s ({a} vs {b}); run both with the same options")
    grid = grids == {True}
    if grid:
        union = np.union1d(parts[0]["position"].values, parts[1]["position"].values)
        fill = {"patch_crossing_layer": NEVER, "patch_crossing_ci_first": NEVER, "patch_crossing_ci_last": NEVER,
                "early_effect": np.nan}
        parts = [p.reindex(position=union, fill_value=fill) for p in parts]
    ds = xr.concat(parts, dim="kind", join="exact").assign_coords(kind=np.array(KINDS, dtype=str))
    for name in _INTS:
        if name in ds:
            ds[name] = ds[name].astype(np.int32)
    ci = content["effect_ci_low"].attrs.get("ci_method") or metrics.ci_attrs()["ci_method"]
    ds.attrs = {"threshold": float(rules.threshold), "rule_component": rules.component,
                "min_pairs": int(rules.min_pairs), "ci_method": str(ci), "ci_level": metrics.CI_LEVEL,
                "content_framing": str(content.attrs.get("framing", "")),
                "label_framing": str(label.attrs.get("framing", "")), "positions": "grid" if grid else "last",
                "never": NEVER}
    if grid:
        ds.attrs["early_layer"] = int(content["layer"].values[0])
    model = content.attrs.get("model_id") or label.attrs.get("model_id")
    if model:
        ds.attrs["model_id"] = str(model)
    order, why = _order(ds, rules)
    ds.attrs["binding_order"] = order
    ds.attrs["binding"] = _sentence(ds, rules, order, why)
    return ds


def _at_decision(ds: xr.Dataset) -> xr.Dataset | None:
    """``ds`` at the decision position (a grid file's position −1; a last-position file as it is), or None."""
    if "position" not in ds.dims:
        return ds
    return ds.sel(position=LAST) if LAST in ds["position"].values else None


def _order(ds: xr.Dataset, rules: BindingRules) -> tuple[str, str]:
    """``(rule result, why)`` from a binding Dataset: the ranges of ``rules.component`` at the decision position."""
    if rules.component not in ds["component"].values:
        raise ValueError(f"the rule reads the {rules.component!r} component, which the files do not hold "
                         f"({', '.join(map(str, ds['component'].values))})")
    cell = _at_decision(ds)
    if cell is None:
        return UNRESOLVED, "the files do not hold the decision position (-1)"
    cell = cell.sel(component=rules.component)
    few = [k for k in KINDS if int(ds["n_defined"].sel(kind=k)) < rules.min_pairs]
    if few:
        return UNRESOLVED, " and ".join(f"the {k} swap" for k in few) + (
            f" {'has' if len(few) == 1 else 'have'} fewer than {rules.min_pairs} pairs whose effect is defined, "
            "so no CI band")
    inf = np.iinfo(np.int64).max

    def end(k: str, which: str) -> int:
        v = int(cell[f"patch_crossing_ci_{which}"].sel(kind=k))
        return inf if v == NEVER else v

    if end(CONTENT, "last") < end(LABEL, "first"):
        return DECIDES_FIRST, "the content swap's range ends before the label swap's begins"
    if end(LABEL, "last") < end(CONTENT, "first"):
        return BINDS_FIRST, "the label swap's range ends before the content swap's begins"
    open_ = [k for k in KINDS if end(k, "last") == inf]
    if open_:
        whose = " and ".join(f"the {k} swap's" for k in open_)
        return UNRESOLVED, (f"{whose} CI lower bound never reaches {rules.threshold:g} in the stored layers, so "
                            f"{'its range does' if len(open_) == 1 else 'their ranges do'} not end there")
    return UNRESOLVED, "the two ranges share at least one layer"


def binding_order(content: xr.Dataset, label: xr.Dataset, rules: BindingRules = BindingRules()) -> str:
    """:data:`DECIDES_FIRST`, :data:`BINDS_FIRST` or :data:`UNRESOLVED` (see :class:`BindingRules`)."""
    return str(binding_dataset(content, label, rules).attrs["binding_order"])


def _layer(v: int) -> str:
    return "never" if v == NEVER else f"layer {v}"


def _range(first: int, last: int) -> str:
    if first == NEVER:
        return "its CI band never reaches it"
    if last == NEVER:
        return f"its CI band allows layer {first} onward; the lower bound never reaches it"
    return f"its CI band allows layers {first} to {last}" if first != last else f"its CI band allows layer {first} only"


def _describe_kind(ds: xr.Dataset, cell: xr.Dataset, kind: str, rules: BindingRules, at: str) -> str:
    k = ds.sel(kind=kind)
    n, total, skipped = int(k["n_defined"]), int(k["n_pairs"]), int(k["n_skipped"])
    c = cell.sel(kind=kind, component=rules.component)
    layer, first, last = (int(c[v]) for v in ("patch_crossing_layer", "patch_crossing_ci_first",
                                              "patch_crossing_ci_last"))
    gap = float(k["min_gap"])
    head = (f"{kind.capitalize()} swap ({_WHAT[kind]}; n = {n} of {total} pairs, those whose swap moves the logit "
            f"difference by at least {gap:g} logits{'' if not skipped else f' and are not skipped ({skipped} are)'}): ")
    what = _COMPONENT.get(rules.component, rules.component)
    if layer == NEVER:
        return head + f"the mean effect of {what}{at} never reaches {rules.threshold:g} in the stored layers."
    band = "no CI band with fewer than 2 pairs" if n < 2 else _range(first, last)
    return head + f"the mean effect of {what}{at} first reaches {rules.threshold:g} at layer {layer} ({band})."


_VERDICT = {DECIDES_FIRST: "so it decides before it binds: the choice between the options reaches the decision "
                           "position before the label beside the chosen option does.",
            BINDS_FIRST: "so it binds before it decides: the label beside the chosen option reaches the decision "
                         "position before the choice between the options does.",
            UNRESOLVED: "so the order of choice and binding stays open: cannot tell apart at this n."}


def _sentence(ds: xr.Dataset, rules: BindingRules, order: str, why: str) -> str:
    thr = f"{rules.threshold:g}"
    grid = "position" in ds.dims
    at = " at the decision position" + (" (position -1)" if grid else "")
    cell = _at_decision(ds)
    s = [f"Crossing layer: the first layer whose mean patching effect reaches {thr} (the patched state carries "
         f"{'half' if rules.threshold == 0.5 else 'a share ' + thr} of the counterfactual's change); its range runs "
         f"from the first layer whose 95% CI upper bound reaches {thr} to the first whose lower bound does "
         f"({metrics.MEAN_CI_METHOD} over the pairs, per layer)."]
    if cell is not None:
        s += [_describe_kind(ds, cell, k, rules, at) for k in KINDS]
    s.append(f"{why[0].upper() + why[1:]}, {_VERDICT[order]}")
    others = [str(c) for c in ds["component"].values if c != rules.component]
    if others and cell is not None:
        bits = [f"{_SHORT.get(c, c)}: {_layer(int(cell['patch_crossing_layer'].sel(kind=CONTENT, component=c)))} "
                f"(content) vs {_layer(int(cell['patch_crossing_layer'].sel(kind=LABEL, component=c)))} (label)"
                for c in others]
        s.append(f"First mean effect of {thr} or more{at} (never: not in the stored layers): " + "; ".join(bits)
                 + ".")
    if grid:
        tops = []
        for k in KINDS:
            p = int(ds["top_position"].sel(kind=k, component=rules.component))
            e = float(ds["early_effect"].sel(kind=k, component=rules.component, position=p))
            tops.append(f"at position {p} for the {k} swap (mean effect {e:+.2f})" if np.isfinite(e)
                        else f"nowhere for the {k} swap (no defined effect)")
        what = _COMPONENT.get(rules.component, rules.component)
        s.append(f"One position at a time (counted from the end), at layer {int(ds.attrs['early_layer'])} the effect "
                 f"of {what} is largest {tops[0]} and {tops[1]}.")
        s.append("Pairs whose base and counterfactual tokenize to different lengths are skipped: "
                 f"{int(ds['n_skipped'].sel(kind=CONTENT))} of {int(ds['n_pairs'].sel(kind=CONTENT))} content-swap "
                 f"pairs, {int(ds['n_skipped'].sel(kind=LABEL))} of {int(ds['n_pairs'].sel(kind=LABEL))} label-swap "
                 "pairs.")
    if "n_consistent" in ds:
        k = {kind: (int(ds["n_consistent"].sel(kind=kind)), int(ds["n_defined"].sel(kind=kind))) for kind in KINDS}
        if any(n and c < rules.min_consistent * n for c, n in k.values()):
            s.append(f"Caution: the base and the counterfactual choose the same option (the choice follows the "
                     f"content) in {k[CONTENT][0]} of {k[CONTENT][1]} content-swap and {k[LABEL][0]} of "
                     f"{k[LABEL][1]} label-swap pairs behind the means; in the others the swap moves a preference "
                     "for a label or a slot, not a choice between the options, and there neither 'decides' nor "
                     "'binds' describes what the layers carry.")
    s.append("A crossing layer says from where the decision position carries the swap's effect, not where the "
             "content or the label is first computed; the two kinds' means are over different pairs.")
    return " ".join(s)


def binding_text(content: xr.Dataset, label: xr.Dataset, rules: BindingRules = BindingRules()) -> str:
    """The sentence on content versus binding from a content-swap and a label-swap patching Dataset (both
    ``patching.nc`` or both ``patching_grid.nc``): crossing layers with their CI ranges, n and the CI method,
    and the rule's result. The same words for every model."""
    return str(binding_dataset(content, label, rules).attrs["binding"])


__all__ = ["BINDS_FIRST", "CONTENT", "DECIDES_FIRST", "KINDS", "LABEL", "NEVER", "UNRESOLVED", "BindingRules",
           "binding_dataset", "binding_order", "binding_text", "consistent_pairs", "crossings", "defined_pairs",
           "first_layer"]

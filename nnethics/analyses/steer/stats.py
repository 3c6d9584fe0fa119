"""The steer analysis' numbers that need no model: the chunk's Dataset, the crossing layers, the fold directions,
the rows of the grid and the statistics over it (numpy and xarray only)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from ... import metrics
from ...prompts import SIDES, PromptPair
from ...verdict import split_sides
from . import directions as dirs

THRESHOLD = 0.5  # the mean resid patching effect whose crossing picks the default layers
MARGIN = 2  # layers either side of a crossing
ONE_LOGIT = 1.0  # the change in ethical preference the summary's alpha reaches


#: The variables of steer.nc with a prompt dim (every other one has none).
PER_PROMPT = ("logit_diff", "ethical_option", "patched_logit_diff", "category", "forward_path", "patch_effect",
              "effect_defined", "fold", "state", "answer_state", "steered_logit_diff", "steered_kl",
              "steered_label_top", "unsteered_logit_diff", "unsteered_label_top", "steered_ethical_margin",
              "preference_change", "bias_change")


def unbroadcast(ds: xr.Dataset) -> xr.Dataset:
    """A finished file gathered again (a rerun: the store concatenates what is done along ``prompt``, which gives
    every variable a prompt dim): the variables that have none in steer.nc lose it again (the same values for
    every prompt)."""
    extra = [v for v in ds.data_vars if "prompt" in ds[v].dims and v not in PER_PROMPT]
    return ds.assign({v: ds[v].isel(prompt=0, drop=True) for v in extra}) if extra else ds


def chunk_dataset(pairs: Sequence[PromptPair], labels: Sequence[str], label_ld: np.ndarray, patched: np.ndarray,
                  states: np.ndarray, answers: np.ndarray, state_layers: Sequence[int], forward_path: str,
                  state_dtype: str) -> xr.Dataset:
    """One chunk: ``label_ld [n, 2]`` (side 0 base), ``patched [n, L]`` (the base with the cf's state after layer
    l), ``states [n, 2, S, d]`` (the output of the layers ``state_layers`` at the decision position),
    ``answers [n, 2, 2, S, d]`` (at an appended answer token, label 1 then label 2)."""
    n, L = patched.shape
    ethical = np.array([[p.ethical(s) for s in SIDES] for p in pairs], dtype=str)
    ds = xr.Dataset(
        {"logit_diff": (("prompt", "side"), label_ld.astype(np.float32)),
         "ethical_option": (("prompt", "side"), ethical),
         "patched_logit_diff": (("prompt", "patch_layer"), patched.astype(np.float32)),
         "state_all": (("prompt", "side", "state_layer", "hidden"), states.astype(np.float32)),
         "answer_state_all": (("prompt", "side", "answer", "state_layer", "hidden"), answers.astype(np.float32)),
         "category": (("prompt",), np.array([p.category for p in pairs], dtype=str)),
         "forward_path": (("prompt",), np.array([forward_path] * n, dtype=str))},
        coords={"prompt": [p.prompt_id for p in pairs], "side": list(SIDES), "option": list(labels),
                "answer": list(labels),
                "patch_layer": np.arange(L, dtype=np.int32),
                "state_layer": np.asarray(state_layers, dtype=np.int32)})
    ds.attrs["state_dtype"] = state_dtype
    return ds


def ethical_sign(ds: xr.Dataset) -> np.ndarray:
    """``[n, 2]``: +1 where the side's ethical option is label 1, -1 where it is label 2."""
    first = str(ds["option"].values[0])
    return np.where(ds["ethical_option"].transpose("prompt", "side").values.astype(str) == first, 1.0, -1.0)


def patch_statistics(ds: xr.Dataset, min_gap: float) -> xr.Dataset:
    """``patch_effect (prompt, patch_layer)`` (normalised as patching's), ``effect_defined (prompt)`` and
    ``mean_patch_effect`` with its BCa CI ``(patch_layer)``."""
    ld = ds["logit_diff"].transpose("prompt", "side").values.astype(np.float64)
    effect, defined = metrics.normalized_effect(ds["patched_logit_diff"].values, ld[:, 0], ld[:, 1], min_gap)
    mean, low, high = metrics.mean_ci(effect, axis=0)
    out = ds.assign(patch_effect=(("prompt", "patch_layer"), effect.astype(np.float32)),
                    effect_defined=(("prompt",), defined),
                    mean_patch_effect=(("patch_layer",), mean.astype(np.float32)),
                    patch_effect_ci_low=(("patch_layer",), low.astype(np.float32)),
                    patch_effect_ci_high=(("patch_layer",), high.astype(np.float32)))
    for end in ("low", "high"):
        out[f"patch_effect_ci_{end}"].attrs.update(metrics.ci_attrs())
    return out


def default_layers(mean_effect: np.ndarray, threshold: float = THRESHOLD, margin: int = MARGIN
                   ) -> tuple[tuple[int, ...], str]:
    """The layers where the mean patching effect crosses ``threshold`` (from below or from above, between layer
    ``l - 1`` and ``l``; layer 0 counts when it starts at or above it), each with ``margin`` layers either side;
    where it never crosses (or no pair is normalisable), the layer of the largest mean effect and its margin.
    Returns the layers and the rule that chose them, in words."""
    m = np.asarray(mean_effect, dtype=np.float64)
    L = m.size
    above = np.where(np.isfinite(m), m >= threshold, False)
    cross = [i for i in range(L) if above[i] and (i == 0 or not above[i - 1])] + \
            [i for i in range(1, L) if not above[i] and above[i - 1]]
    if cross:
        rule = f"mean resid patching effect crosses {threshold:g} at layer {', '.join(map(str, sorted(cross)))}, " \
               f"+-{margin}"
    elif np.isfinite(m).any():
        cross = [int(np.nanargmax(m))]
        rule = f"mean resid patching effect never crosses {threshold:g}: its largest at layer {cross[0]}, +-{margin}"
    else:
        cross = [L // 2]
        rule = f"no pair with a normalisable gap: the middle layer {cross[0]}, +-{margin}"
    layers = sorted({j for c in cross for j in range(c - margin, c + margin + 1) if 0 <= j < L})
    return tuple(layers), rule


def fold_directions(ds: xr.Dataset, layers: Sequence[int], kinds: Sequence[str], k: int, null_seeds: int
                    ) -> xr.Dataset:
    """``fold (prompt)``, ``direction (fold, layer, kind, hidden)`` (unit), ``direction_norm`` (its raw norm),
    ``scale (fold, layer)`` (the mean norm of the fold's training states) and ``state (prompt, side, layer,
    hidden)`` and ``answer_state`` at ``layers``; kinds ``kinds`` then ``random0..`` (the null, one seed each, the
    same in every fold and layer), with ``signed (direction_kind)`` (:data:`.directions.SIGNED`). The all-layer
    states of the chunk parts are dropped."""
    ids = [str(p) for p in ds["prompt"].values]
    fold = dirs.folds(ids, k)
    k = int(fold.max()) + 1  # more folds than pairs: leave-one-out
    h = ds["state_all"].sel(state_layer=list(layers)).transpose("prompt", "side", "state_layer", "hidden").values
    answers = ds["answer_state_all"].sel(state_layer=list(layers)).transpose(
        "prompt", "side", "answer", "state_layer", "hidden").values
    e = ethical_sign(ds)
    ethical = np.where(e > 0, 0, 1)
    names = list(kinds) + [f"random{s}" for s in range(null_seeds)]
    d = h.shape[-1]
    rand = dirs.random_directions(d, list(range(null_seeds)))
    unit = np.zeros((k, len(layers), len(names), d))
    norm = np.zeros((k, len(layers), len(names)))
    scale = np.zeros((k, len(layers)))
    for f in range(k):
        train = fold != f
        for j in range(len(layers)):
            got = dirs.directions(h[:, :, j], ethical, train, answers[:, :, :, j])
            for c, kind in enumerate(kinds):
                unit[f, j, c], norm[f, j, c] = got[kind]
            unit[f, j, len(kinds):] = rand
            norm[f, j, len(kinds):] = 1.0
            scale[f, j] = dirs.scale(h[:, :, j], train)
    out = ds.drop_vars(["state_all", "answer_state_all", "state_layer"]).assign_coords(
        layer=np.asarray(layers, dtype=np.int32), direction_kind=names, fold_id=np.arange(k, dtype=np.int32),
        is_null=("direction_kind", np.array([n.startswith("random") for n in names])),
        signed=("direction_kind", np.array([dirs.SIGNED.get(n, True) for n in names])))
    return out.assign(fold=(("prompt",), fold.astype(np.int32)),
                      direction=(("fold_id", "layer", "direction_kind", "hidden"), unit.astype(np.float32)),
                      direction_norm=(("fold_id", "layer", "direction_kind"), norm.astype(np.float32)),
                      scale=(("fold_id", "layer"), scale.astype(np.float32)),
                      state=(("prompt", "side", "layer", "hidden"), h.astype(np.float32)),
                      answer_state=(("prompt", "side", "answer", "layer", "hidden"), answers.astype(np.float32)))


def coefficient(alpha: float, scale: float, sign: float) -> float:
    """The multiple of a unit direction a row adds: ``alpha`` in units of the layer's mean residual norm, toward the
    side's ethical label (``sign`` +1: label 1; the directions point toward label 1)."""
    return float(alpha) * float(scale) * float(sign)


def grid_statistics(ds: xr.Dataset, n_resamples: int = metrics.N_RESAMPLES, seed: int = 0) -> xr.Dataset:
    """From ``steered_logit_diff``/``steered_kl``/``steered_label_top (layer, kind, alpha, prompt, side)`` and
    ``unsteered_logit_diff``/``unsteered_label_top (layer, prompt, side)``: the steered ``ethical_margin``, the
    per-pair ``preference_change`` and ``bias_change``, and per (layer, kind, alpha) their means (preference: with
    a BCa CI), ``steered_flip_rate``, ``label_top_share`` and ``mean_kl``; the null band per (layer, alpha); see README."""
    e = ethical_sign(ds)  # [n, 2]
    ld = ds["steered_logit_diff"].transpose("layer", "direction_kind", "alpha", "prompt", "side").values.astype(np.float64)
    ld0 = ds["unsteered_logit_diff"].transpose("layer", "prompt", "side").values.astype(np.float64)
    ld0 = ld0[:, None, None]
    margin = e * ld
    # split_sides wants [n, 2, ...]: move prompt and side first
    bias, pref = split_sides(np.moveaxis(ld, (3, 4), (0, 1)), e)
    bias0, pref0 = split_sides(np.moveaxis(np.broadcast_to(ld0, ld.shape), (3, 4), (0, 1)), e)
    d_pref = np.moveaxis(pref - pref0, 0, -1)  # [layer, kind, alpha, prompt]
    d_bias = np.moveaxis(bias - bias0, 0, -1)
    cell = ("layer", "direction_kind", "alpha")
    mean, low, high = metrics.mean_ci(d_pref, axis=-1, n_resamples=n_resamples, seed=seed)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a cell whose pairs all keep their ethical label: NaN
        mean_bias = np.nanmean(d_bias, axis=-1)
    flipped = np.sign(ld) != np.sign(np.broadcast_to(ld0, ld.shape))
    top = ds["steered_label_top"].transpose(*cell, "prompt", "side").values
    kl = ds["steered_kl"].transpose(*cell, "prompt", "side").values.astype(np.float64)
    out = ds.assign(
        steered_ethical_margin=(cell + ("prompt", "side"), margin.astype(np.float32)),
        preference_change=(cell + ("prompt",), d_pref.astype(np.float32)),
        bias_change=(cell + ("prompt",), d_bias.astype(np.float32)),
        mean_preference_change=(cell, mean.astype(np.float32)),
        preference_change_ci_low=(cell, low.astype(np.float32)),
        preference_change_ci_high=(cell, high.astype(np.float32)),
        mean_bias_change=(cell, mean_bias.astype(np.float32)),
        steered_flip_rate=(cell, flipped.mean(axis=(-2, -1)).astype(np.float32)),
        label_top_share=(cell, top.mean(axis=(-2, -1)).astype(np.float32)),
        mean_kl=(cell, kl.mean(axis=(-2, -1)).astype(np.float32)),
    )
    low_null, high_null = null_range(out, "mean_preference_change")
    out = out.assign(null_low=(("layer", "alpha"), low_null), null_high=(("layer", "alpha"), high_null))
    for end in ("low", "high"):
        out[f"preference_change_ci_{end}"].attrs.update(metrics.ci_attrs(seed, n_resamples))
    return out


def one_logit_alpha(alphas: np.ndarray, change: np.ndarray, sign: float = 1.0, target: float = ONE_LOGIT) -> float:
    """The alpha of the smallest size, on the side ``sign`` of zero (+1: positive alphas, -1: negative), where the
    mean change first reaches ``target``, linearly interpolated between grid points (from (0, 0) before the first);
    NaN where it never does."""
    a = np.asarray(alphas, dtype=np.float64)
    c = np.asarray(change, dtype=np.float64)
    side = a * sign > 0
    order = np.argsort(np.abs(a[side]))
    xs = np.concatenate([[0.0], a[side][order]])
    ys = np.concatenate([[0.0], c[side][order]])
    for i in range(1, xs.size):
        if np.isfinite(ys[i]) and ys[i] >= target:
            y0 = ys[i - 1] if np.isfinite(ys[i - 1]) else 0.0
            return float(xs[i - 1] + (target - y0) / (ys[i] - y0) * (xs[i] - xs[i - 1]))
    return float("nan")


def kind_summary(ds: xr.Dataset, kind: str) -> dict[str, Any]:
    """A real kind's summary at the (layer, alpha != 0) where it moves the ethical preference up the most, either
    sign of alpha (a direction that works subtracted is found too; the sign says so): that change with its CI and
    the null band there, whether it beats the band (the CI's lower end above the band's top), the change in position
    bias there, and the alpha of that sign that moves the preference by one logit at that layer."""
    alphas = ds["alpha"].values.astype(np.float64)

    def grid(name: str, kind: str | None = None) -> np.ndarray:  # [layer, alpha], whatever order the file keeps
        da = ds[name] if kind is None else ds[name].sel(direction_kind=kind)
        return da.transpose("layer", "alpha").values.astype(np.float64)

    m = grid("mean_preference_change", kind)
    score = np.where(np.isfinite(m) & (alphas[None] != 0), m, -np.inf)
    j, a = np.unravel_index(int(np.argmax(score)), score.shape)
    low = float(grid("preference_change_ci_low", kind)[j, a])
    null_high = float(grid("null_high")[j, a])
    return {"kind": kind, "layer": int(ds["layer"].values[j]), "alpha": float(alphas[a]),
            "change": float(m[j, a]), "ci_low": low,
            "ci_high": float(grid("preference_change_ci_high", kind)[j, a]),
            "null_low": float(grid("null_low")[j, a]), "null_high": null_high,
            "bias_change": float(grid("mean_bias_change", kind)[j, a]),
            "kl": float(grid("mean_kl", kind)[j, a]), "kl_null": tuple(float(r[j, a]) for r in null_range(ds, "mean_kl")),
            "one_logit_alpha": one_logit_alpha(alphas, m[j], 1.0 if alphas[a] > 0 else -1.0),
            "beats_null": bool(np.isfinite(low) and np.isfinite(null_high) and low > null_high)}


def null_range(ds: xr.Dataset, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The lowest and highest of ``name (layer, direction_kind, alpha)`` over the random directions, ``[layer,
    alpha]`` each (NaN without any): the stored null band of the preference, and the figures' and the summary's
    ranges of the other quantities."""
    null = ds["is_null"].values.astype(bool)
    v = ds[name].transpose("layer", "direction_kind", "alpha").values
    if not null.any():
        nan = np.full((v.shape[0], v.shape[2]), np.nan, dtype=v.dtype)
        return nan, nan.copy()
    return v[:, null].min(axis=1), v[:, null].max(axis=1)

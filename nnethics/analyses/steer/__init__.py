"""Steering: write a direction into the residual stream at the decision position and measure how the decision
moves, with a dose-response over alpha, held-out pairs, a random-direction null and a position baseline.

Directions (:mod:`.directions`) per layer from *training* pairs: ``content`` (the mean over pairs of cf - base at
the decision position, signed toward "the ethical option is label 1"), ``caa`` (contrastive activation addition
at the answer token, as Rimsky et al.: after the ethical answer minus after the other; applied unsigned),
``position`` (the same answer-token states by label: after label 1 minus after label 2; content-free) and
``random0..`` (seeded Gaussian directions: the null). Pairs are dealt into ``folds`` by the sha256 of their id; a
pair is steered only with its fold's directions, made from the other folds. A row adds ``alpha x scale x sign x
unit`` after layer ``l`` at the decision position: ``scale`` the mean norm of the fold's training states at that
layer (alpha in units of the mean residual norm), ``sign`` +1 where the side's ethical option is label 1, -1 where
it is label 2 (1 for caa), so a positive alpha pushes every prompt toward its ethical option (through the
direction's reading of it) and a negative one away.

Three passes. The chunk pass (:mod:`.chunk`) reads the chunk's shared trace (every layer's state at the decision
position, the label logits) and, in its session, runs the base rows with the counterfactual's state after each
layer (resid patching at the decision position: ``patched_logit_diff``, whose mean effect crossing 0.5 picks the
default layers) and the answer-token rows, over the trace's prefix cache. ``finalize`` normalises the crossing.
The ``complete`` pass (one session, one request remotely, per chunk; :mod:`.grid`) picks the layers, makes the
fold directions and runs the grid: per pair, side and layer one unsteered row and one row per (kind, alpha != 0),
each one token over the prefix cache from layer ``l + 1`` (:mod:`.engine`). The file is
``store/<slug>/steer.nc``; its variables are in the README.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr

from ... import metrics
from ...store.variables import LD, LOGIT, NATS, ONE
from ..base import Analysis, OptionError, SharedReads, check_layers, format_layers, recorded_option, register
from . import stats
from .directions import FoldError
from .options import SteerOptions

__all__ = ["ANALYSIS", "SteerOptions", "complete", "finalize", "summarize"]


def shares(model: Any, options: SteerOptions, prepared: dict) -> SharedReads:
    """The chunk pass reads the shared trace and runs its rows in the trace's session (:mod:`.chunk`)."""
    from . import chunk

    return SharedReads(start=chunk.start, read=chunk.read, rows=chunk.rows, build=chunk.build)


def finalize(ds: xr.Dataset) -> xr.Dataset:
    """The resid patching effect per layer (a finished file: as it was written)."""
    if "steered_logit_diff" in ds:
        return stats.unbroadcast(ds)
    return stats.patch_statistics(ds, float(recorded_option(ds, "min_gap", metrics.DEFAULT_MIN_GAP)))


def complete(model: Any, ds: xr.Dataset, pairs: Any, options: SteerOptions, label_ids: Any = None,
             batch_size: int = 8, **_: Any) -> xr.Dataset:
    """The layers, the fold directions and the grid (a finished file: unchanged); see the module docstring."""
    if "steered_logit_diff" in ds:
        return ds
    from .grid import run_grid

    if options.layers is not None:
        layers, rule = tuple(options.layers), "given (--layers)"
    else:
        layers, rule = stats.default_layers(ds["mean_patch_effect"].values)
    check_layers("layers", layers, ds.sizes["patch_layer"])
    ds = stats.fold_directions(ds, layers, options.kinds, options.folds, options.null_seeds)
    ds = ds.assign_coords(alpha=np.asarray(options.alphas, dtype=np.float64))
    ds["layer"].attrs["rule"] = rule  # on the coordinate: a rerun's provenance replaces the file's own attrs
    ds = run_grid(model, ds, pairs, options, label_ids, batch_size)
    return stats.grid_statistics(ds)


def check_folds(options: SteerOptions, prompt_ids: list[str]) -> None:
    try:
        from .directions import folds

        folds(prompt_ids, options.folds)
    except FoldError as e:
        raise OptionError("folds", str(e)) from None


def check_pairs(options: SteerOptions, pairs: Any) -> None:
    """Before the model loads: every fold keeps at least 2 training pairs."""
    check_folds(options, [p.prompt_id for p in pairs])


def check_model(model: Any, options: SteerOptions) -> None:
    check_layers("layers", options.layers, model.n_layers)


def summarize(ds: xr.Dataset) -> str:
    """A header (pairs, folds, layers and their rule, the unsteered baselines, the null) and a line per kind: where
    it moves the ethical preference up the most (:func:`.stats.kind_summary`), that change with its CI against the
    null band there, the alpha that moves the preference by one logit, and the change in position bias."""
    n = ds.sizes["prompt"]
    if "mean_preference_change" not in ds:
        return f"{n} pairs (no steering grid)"
    kinds = [str(k) for k, null in zip(ds["direction_kind"].values, ds["is_null"].values) if not null]
    e = stats.ethical_sign(ds)
    ld0 = ds["unsteered_logit_diff"].transpose("layer", "prompt", "side").values.astype(np.float64)
    pref0, bias0 = float(np.nanmean((e[None] * ld0).mean(-1))), float(np.nanmean(ld0.mean(-1)))
    lines = [f"{n} pairs in {ds.sizes['fold_id']} folds; layers {format_layers(ds['layer'].values)} "
             f"({ds['layer'].attrs.get('rule', '')}); unsteered: ethical preference {pref0:+.3f}, position bias "
             f"{bias0:+.2f} logits; null band: {int(ds['is_null'].values.sum())} random directions of the same norm"]
    for kind in kinds:
        if not float(np.abs(ds["direction_norm"].sel(direction_kind=kind).values).max()):
            lines.append(f"{kind:<9} no direction: every fold's is zero (content: no training pair swaps the "
                         "ethical label)")
            continue
        s = stats.kind_summary(ds, kind)
        one = "not reached" if not np.isfinite(s["one_logit_alpha"]) else f"at alpha {s['one_logit_alpha']:+.2f}"
        own = float((ds["direction_norm"].sel(direction_kind=kind, layer=s["layer"]) /
                     ds["scale"].sel(layer=s["layer"])).mean())  # the direction's own size in units of alpha
        lines.append(f"{kind:<9} most at layer {s['layer']}, alpha {s['alpha']:+g} (x the mean residual norm; the "
                     f"direction's own norm is {own:.3g} of it): ethical "
                     f"preference {s['change']:+.3f} ({metrics.format_ci(s['ci_low'], s['ci_high'], '+.3f')}) "
                     f"against a null of {s['null_low']:+.3f} to {s['null_high']:+.3f}: "
                     f"{'beats the null' if s['beats_null'] else 'not beyond the null'}; +1 logit {one}; position "
                     f"bias {s['bias_change']:+.3f}; KL {s['kl']:.2f} nats (random {s['kl_null'][0]:.2f} to "
                     f"{s['kl_null'][1]:.2f})")
    return "\n    ".join(lines)


def tables(name: str, ds: xr.Dataset, data: Mapping[str, xr.Dataset]) -> dict[str, Any]:
    """``steer``: one row per (layer, kind, alpha) with the means; ``steer_rows``: one per (layer, kind, alpha,
    prompt, side)."""
    cell = ["mean_preference_change", "preference_change_ci_low", "preference_change_ci_high", "mean_bias_change",
            "steered_flip_rate", "label_top_share", "mean_kl"]
    per = ["steered_logit_diff", "steered_ethical_margin", "steered_kl", "steered_label_top"]
    if "mean_preference_change" not in ds:
        return {}
    return {"steer": lambda: ds[cell].to_dataframe().reset_index(),
            "steer_rows": lambda: ds[per].to_dataframe().reset_index()}


VARIABLES = {
    "patch_layer": ("layer whose output at the decision position is patched (resid patching)", ONE),
    "patch_effect": ("resid patching effect at the decision position, (patched - base) / (cf - base)", ONE),
    "mean_patch_effect": ("mean resid patching effect over pairs with a normalisable gap", ONE),
    "patch_effect_ci_low": ("mean resid patching effect, 95% CI lower bound", ONE),
    "patch_effect_ci_high": ("mean resid patching effect, 95% CI upper bound", ONE),
    "state_all": ("residual stream after a layer at the decision position (chunk parts only)", ONE),
    "state_layer": ("layer of a chunk part's states (--layers, or every layer)", ONE),
    "state": ("residual stream after the layer at the decision position", ONE),
    "answer_state_all": ("residual stream after a layer at an appended answer token (chunk parts only)", ONE),
    "answer_state": ("residual stream after the layer at an appended answer token (the caa direction's input)",
                     ONE),
    "answer": ("the label token appended after the prompt", ONE),
    "hidden": ("residual stream dimension", ONE),
    "direction_kind": ("steering direction (random*: the null)", ONE),
    "is_null": ("whether the direction is a random one (the null)", ONE),
    "signed": ("whether the direction points toward label 1 (applied times the side's ethical sign; caa: no)", ONE),
    "alpha": ("steering strength, in units of the layer's mean residual norm at the decision position", ONE),
    "fold_id": ("fold of pairs (held out together)", ONE),
    "fold": ("the pair's fold: it is steered with directions from the other folds", ONE),
    "direction": ("unit steering direction (toward label 1) from the fold's training pairs", ONE),
    "direction_norm": ("norm of the direction before it was made a unit vector", ONE),
    "scale": ("mean norm of the fold's training states at the layer: one unit of alpha", ONE),
    "unsteered_logit_diff": (f"{LD} of the unsteered row (alpha 0) of the layer's path", LOGIT),
    "unsteered_label_top": ("whether a label is the top-1 token of the unsteered row", ONE),
    "steered_logit_diff": (f"{LD} with alpha x scale x sign x direction added after the layer", LOGIT),
    "steered_ethical_margin": ("logit(ethical option's label) - logit(other label), steered", LOGIT),
    "steered_kl": ("KL(unsteered || steered) of the next-token distribution", NATS),
    "steered_label_top": ("whether a label is the steered row's top-1 token", ONE),
    "preference_change": ("change in the pair's ethical preference (mean ethical margin of its sides)", LOGIT),
    "bias_change": ("change in the pair's position bias (mean LD of its sides)", LOGIT),
    "mean_preference_change": ("mean change in ethical preference over pairs", LOGIT),
    "preference_change_ci_low": ("mean change in ethical preference, 95% CI lower bound", LOGIT),
    "preference_change_ci_high": ("mean change in ethical preference, 95% CI upper bound", LOGIT),
    "mean_bias_change": ("mean change in position bias over pairs that swap the ethical label", LOGIT),
    "steered_flip_rate": ("share of prompts whose chosen label differs from the unsteered row's", ONE),
    "label_top_share": ("share of prompts where a label stays the top-1 token", ONE),
    "mean_kl": ("mean KL(unsteered || steered) over prompts", NATS),
    "null_low": ("lowest mean change in ethical preference over the random directions", LOGIT),
    "null_high": ("highest mean change in ethical preference over the random directions", LOGIT),
}


ANALYSIS = register(Analysis(
    variables=VARIABLES,
    name="steer", options=SteerOptions, shares=shares, summarize=summarize, finalize=finalize, complete=complete,
    check=check_model, check_pairs=check_pairs, default=False,
    help="Steering at the decision position: content, CAA and position directions from held-out folds, a "
         "dose-response over alpha against random directions; writes STORE/<model>/steer.nc.",
    tables=tables, render=("nnethics.analyses.steer.figures",)))

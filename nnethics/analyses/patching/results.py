"""Patching results as labelled Datasets: per-prompt variables, summaries, cross-prompt statistics.

Pure NumPy/xarray (no torch, no model), so it is testable on hand-made arrays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from ... import metrics
from ...store import schema

COMPONENTS = ("resid", "attn", "mlp")  # what activation patching can patch, in its order

LD_DESCRIPTION = "logit(label 1) - logit(label 2) at the decision position (the last prompt token)"


def build_dataset(*, prompt_ids: Sequence[str], categories: Sequence[str], layers: Sequence[int],
                  components: Sequence[str], positions: Sequence[int] | None, corruption: str,
                  receiver_ld: np.ndarray, source_ld: np.ndarray, patched_ld: np.ndarray,
                  atp_delta: np.ndarray | None, min_gap: float, base_ethical: Sequence[bool],
                  cf_ethical: Sequence[bool] | None, per_prompt: dict[str, tuple[tuple[str, ...], np.ndarray]]
                  ) -> xr.Dataset:
    """Assemble one chunk's Dataset.

    ``patched_ld`` is ``[prompt, layer, component]`` or, with ``positions``, ``[prompt, position,
    layer, component]``; ``receiver_ld``/``source_ld`` are ``[prompt]``. The receiver is the run
    patched into (base, or the noised base); the source is the run patched from (counterfactual,
    or the clean base).
    """
    cell_dims = ("prompt", "layer", "component") if positions is None else ("prompt", "position", "layer", "component")
    recv = np.asarray(receiver_ld, dtype=np.float64)
    src = np.asarray(source_ld, dtype=np.float64)
    patched = np.asarray(patched_ld, dtype=np.float64)
    effect, defined = metrics.normalized_effect(patched, recv, src, min_gap)
    flipped = metrics.flips(patched, recv)
    noise = corruption == "noise"
    data: dict[str, tuple] = {
        "base_logit_diff": (("prompt",), (src if noise else recv).astype(np.float32)),
        ("corrupted_logit_diff" if noise else "cf_logit_diff"): (("prompt",), (recv if noise else src).astype(np.float32)),
        "patched_logit_diff": (cell_dims, patched.astype(np.float32)),
        "effect": (cell_dims, effect.astype(np.float32)),
        "effect_defined": (("prompt",), defined),
        "flipped": (cell_dims, flipped),
        "chose_ethical_base": (("prompt",), np.asarray(base_ethical, dtype=bool)),
        "category": (("prompt",), np.asarray(list(categories), dtype=str)),
    }
    if cf_ethical is not None:
        data["chose_ethical_cf"] = (("prompt",), np.asarray(cf_ethical, dtype=bool))
    if atp_delta is not None:
        atp = np.asarray(atp_delta, dtype=np.float64)
        atp_eff, _ = metrics.normalized_effect(recv.reshape(recv.shape + (1,) * (atp.ndim - 1)) + atp, recv, src, min_gap)
        data["atp_delta"] = (cell_dims, atp.astype(np.float32))
        data["atp_effect"] = (cell_dims, atp_eff.astype(np.float32))
        exact = patched - recv.reshape(recv.shape + (1,) * (patched.ndim - 1))
        data["atp_correlation"] = (("prompt",), np.array(
            [metrics.pearson(atp[i], exact[i]) for i in range(len(recv))], dtype=np.float32))
    if positions is None:
        data.update(profile_summary(patched, recv, flipped, layers))
    for name, (dims, values) in per_prompt.items():
        data[name] = (dims, values)
    coords: dict = {"prompt": list(prompt_ids), "layer": np.asarray(layers, dtype=np.int32),
                    "component": list(components)}
    if positions is not None:
        coords["position"] = np.asarray(positions, dtype=np.int32)
    ds = xr.Dataset(data, coords=coords)
    _describe(ds, noise, min_gap)
    return ds


def profile_summary(patched: np.ndarray, recv: np.ndarray, flipped: np.ndarray,
                    layers: Sequence[int]) -> dict[str, tuple]:
    """The seed's per-prompt columns, per component, from ``|patched - receiver|`` over layers."""
    delta = np.abs(patched - recv[:, None, None])          # [prompt, layer, component]
    prof = np.moveaxis(delta, 1, -1)                         # [prompt, component, layer]
    peak = metrics.peak_layer(prof, axis=-1)
    layer_arr = np.asarray(layers, dtype=np.int32)
    dims = ("prompt", "component")
    return {
        "peak_layer": (dims, np.where(peak >= 0, layer_arr[np.clip(peak, 0, None)], -1).astype(np.int32)),
        "num_choice_flips": (dims, metrics.count_flips(np.moveaxis(flipped, 1, -1), axis=-1).astype(np.int32)),
        "gini_coefficient": (dims, metrics.gini(prof, axis=-1).astype(np.float32)),
        "top5_concentration": (dims, metrics.top_k_concentration(prof, 5, axis=-1).astype(np.float32)),
    }


def _describe(ds: xr.Dataset, noise: bool, min_gap: float) -> None:
    recv = "corrupted_logit_diff" if noise else "base_logit_diff"
    src = "base_logit_diff" if noise else "cf_logit_diff"
    ds["base_logit_diff"].attrs["description"] = ("clean base run: " if noise else "base run: ") + LD_DESCRIPTION
    ds[recv if noise else src].attrs["description"] = (
        "base run with its noise span corrupted: " if noise else "counterfactual run: ") + LD_DESCRIPTION
    ds["patched_logit_diff"].attrs["description"] = (
        "LD of the corrupted run with the clean state restored" if noise
        else "LD of the base run with the counterfactual's state patched in")
    ds["effect"].attrs["description"] = f"(patched - {recv}) / ({src} - {recv}); NaN where effect_defined is false"
    ds["effect"].attrs[schema.EFFECT_KIND] = schema.NORMALIZED
    ds["effect_defined"].attrs["description"] = f"|{src} - {recv}| >= min_gap = {min_gap}"
    ds["effect_defined"].attrs[schema.MIN_GAP] = float(min_gap)
    ds["flipped"].attrs["description"] = f"the patched run chooses the other label than the {recv.split('_')[0]} run"
    if "atp_delta" in ds:
        ds["atp_delta"].attrs["description"] = "attribution patching estimate of patched - base: (cf - base) . dLD/dstate"
        ds["atp_effect"].attrs["description"] = "atp_delta normalised like effect"
        ds["atp_effect"].attrs[schema.EFFECT_KIND] = schema.NORMALIZED
        ds["atp_correlation"].attrs["description"] = "Pearson correlation of atp_delta and patched - base over layers x components"
    if "peak_layer" in ds:
        ds["peak_layer"].attrs["description"] = "layer with the largest |patched - receiver LD| (-1: none)"
        ds["gini_coefficient"].attrs["description"] = (
            "Gini of |patched - receiver LD| over layers: 0 spread evenly, (n-1)/n all in one layer")
        ds["top5_concentration"].attrs["description"] = "share of sum |patched - receiver LD| in the 5 largest layers"
        ds["num_choice_flips"].attrs["description"] = "number of layers whose patch flips the choice"


def finalize(ds: xr.Dataset, n_resamples: int = metrics.N_RESAMPLES, seed: int = 0) -> xr.Dataset:
    """Cross-prompt statistics: the mean effect per cell with a BCa bootstrap 95% CI over prompts,
    the flip rate, and the AtP-vs-exact correlation per component and pooled."""
    ds = ds.copy()
    cell = [d for d in ds["effect"].dims if d != "prompt"]
    mean, low, high = metrics.mean_ci(ds["effect"].values, axis=0, n_resamples=n_resamples, seed=seed)
    ds["mean_effect"] = (cell, mean.astype(np.float32))
    ds["effect_ci_low"] = (cell, low.astype(np.float32))
    ds["effect_ci_high"] = (cell, high.astype(np.float32))
    ds["mean_effect"].attrs["description"] = "mean effect over prompts where it is defined"
    for end in ("low", "high"):
        ds[f"effect_ci_{end}"].attrs["description"] = (f"{metrics.ci_label('prompts where effect is defined')} "
                                                      f"({n_resamples} resamples, seed {seed})")
        ds[f"effect_ci_{end}"].attrs.update(metrics.ci_attrs(seed, n_resamples))
    ds["flip_rate"] = (cell, ds["flipped"].values.mean(axis=0).astype(np.float32))
    if "atp_delta" in ds:
        recv = ds["base_logit_diff"].values
        exact = ds["patched_logit_diff"].values - recv.reshape(recv.shape + (1,) * (ds["patched_logit_diff"].ndim - 1))
        atp = ds["atp_delta"].values
        comp_axis = ds["patched_logit_diff"].dims.index("component")
        ds["atp_exact_correlation"] = (("component",), np.array(
            [metrics.pearson(np.take(atp, i, comp_axis), np.take(exact, i, comp_axis))
             for i in range(ds.sizes["component"])], dtype=np.float32))
        ds["atp_exact_correlation_pooled"] = ((), np.float32(metrics.pearson(atp, exact)))
        ds["mean_atp_effect"] = (cell, _nanmean0(ds["atp_effect"].values).astype(np.float32))
        ds["atp_exact_correlation"].attrs["description"] = "Pearson correlation of atp_delta and exact patched - base over prompts and cells"
    return ds


def _nanmean0(a: np.ndarray) -> np.ndarray:
    ok = ~np.isnan(a)
    n = ok.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.where(ok, a, 0).sum(0) / np.where(n > 0, n, 1), np.nan)


def arrival_layer(mean: np.ndarray, layers: Sequence[int], threshold: float = 0.5) -> int | None:
    """The first layer whose mean effect reaches ``threshold`` (where the decision "arrives"), or None."""
    m = np.asarray(mean, dtype=np.float64)
    hit = np.flatnonzero(np.isfinite(m) & (m >= threshold))
    return int(np.asarray(layers)[hit[0]]) if hit.size else None


def summarize(ds: xr.Dataset) -> str:
    """One line: pairs behind the means; where the residual effect first passes 0.5 (the patched residual at the
    last layer is the counterfactual's output, so its effect there is 1 by construction); the attention and MLP
    layers with the largest mean effect; AtP agreement."""
    n = ds.sizes["prompt"]
    k = int(ds["effect_defined"].sum())
    means = "no means" if k == 0 else "means over that one" if k == 1 else f"means over those {k}"
    parts = [f"{n} pairs, {k} with a normalisable gap ({means})"]
    if "mean_effect" in ds and "position" not in ds["mean_effect"].dims:
        ci = ("effect_ci_low" in ds and "effect_ci_high" in ds)
        for comp in ds["component"].values:
            m = ds["mean_effect"].sel(component=comp)
            if not np.isfinite(m.values).any():
                continue
            if comp == "resid":
                layer = arrival_layer(m.values, m["layer"].values)
                if layer is None:
                    parts.append("resid: the mean effect never reaches 0.5")
                    continue
                text = f"resid: the decision arrives at layer {layer} (first mean effect >= 0.5: {float(m.sel(layer=layer)):+.2f}"
                if ci:
                    text += ", " + metrics.format_ci(float(ds["effect_ci_low"].sel(component=comp, layer=layer)),
                                                     float(ds["effect_ci_high"].sel(component=comp, layer=layer)))
                parts.append(text + ")")
                continue
            peak = int(m["layer"].values[int(np.nanargmax(np.abs(m.values)))])
            text = f"{comp} largest at layer {peak} (mean effect {float(m.sel(layer=peak)):+.2f}"
            if ci:
                text += ", " + metrics.format_ci(float(ds["effect_ci_low"].sel(component=comp, layer=peak)),
                                                 float(ds["effect_ci_high"].sel(component=comp, layer=peak)))
            parts.append(text + ")")
    if "atp_exact_correlation_pooled" in ds:
        parts.append(f"AtP vs exact r = {float(ds['atp_exact_correlation_pooled']):.3f}")
    if "skipped" in ds and int(ds["skipped"].sum()):
        parts.append(f"{int(ds['skipped'].sum())} skipped")
    return "; ".join(parts)

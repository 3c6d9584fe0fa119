"""The tables of the patching analysis and its variants (``nnethics export``): ``detailed_layer_data`` (the
seed's ``causal_score`` as ``effect``), ``summary_results``, ``<variant>`` and ``<file>_means``."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import xarray as xr

from ...export import ExportError, Tables, component, long_table, vals

SUMMARY_FIRST = ("prompt_id", "peak_layer", "num_choice_flips", "gini_coefficient", "top5_concentration",
                 "chose_ethical_base")


def detailed_layer_data(ds: xr.Dataset) -> pd.DataFrame:
    """One row per (prompt, layer, component) of ``patching.nc``: ``effect`` (the seed's ``causal_score``),
    ``patched_logit_diff``, ``flipped``, ``atp_effect`` and the prompt's base/cf/corrupted logit differences."""
    if "effect" not in ds:
        raise ExportError("patching.nc has no 'effect' variable")
    names = ("effect", "patched_logit_diff", "flipped", "atp_effect", "base_logit_diff", "cf_logit_diff",
             "corrupted_logit_diff")
    return long_table(ds, ("prompt", "layer", "component"), [n for n in names if n in ds])


def mean_table(ds: xr.Dataset) -> pd.DataFrame:
    """The means over prompts (``mean_effect``, its CI, ``flip_rate``, ...): one row per (layer, component[, position])."""
    cell = [d for d in ds["effect"].dims if d != "prompt"]
    names = [n for n, v in ds.data_vars.items() if v.dims and "prompt" not in v.dims and set(v.dims) == set(cell)]
    if not names:
        raise ExportError("no means over prompts in this file (rerun it to add them)")
    df = ds[names].to_dataframe(dim_order=cell).reset_index()
    df.attrs["constants"] = {}
    return df


def summary_results(ds: xr.Dataset, decisions: xr.Dataset | None = None) -> pd.DataFrame:
    """One row per prompt: the per-prompt patching summaries (+ early/middle/late mean resid effect)."""
    df = long_table(ds, ("prompt",), [n for n, v in ds.data_vars.items() if v.dims == ("prompt",)])
    for name, da in ds.data_vars.items():
        if da.dims == ("prompt", "component"):
            wide = da.to_pandas()
            for comp in wide.columns:
                df[f"{name}_{comp}"] = wide[comp].to_numpy()
            df[name] = component(da).to_numpy()
    if "effect" in ds and "layer" in ds["effect"].dims:
        eff = component(ds["effect"]).transpose("prompt", "layer")
        thirds = np.array_split(np.arange(eff.sizes["layer"]), 3)
        for label, idx in zip(("early_mean", "middle_mean", "late_mean"), thirds):
            df[label] = vals(eff.isel(layer=idx).mean("layer")).astype(float) if len(idx) else np.nan
    if decisions is not None and "category" in decisions and "category" not in df:
        df["category"] = df["prompt_id"].map(decisions["category"].to_series().rename(index=str))
    first = [c for c in SUMMARY_FIRST if c in df.columns]
    out = df[first + [c for c in df.columns if c not in first]]
    out.attrs["constants"] = df.attrs.get("constants", {})
    return out


def position_table(ds: xr.Dataset) -> pd.DataFrame:
    """``patching_grid.nc`` / ``patching_noise_grid.nc`` in long form: one row per (prompt, [position,] layer,
    [component,] position); the means over prompts are in :func:`mean_table`."""
    if "effect" not in ds or "position" not in ds["effect"].dims:
        raise ExportError("no variable with a position dim")
    return long_table(ds, ds["effect"].dims, [n for n, v in ds.data_vars.items() if set(v.dims) == set(ds["effect"].dims)])


def tables(name: str, ds: xr.Dataset, data: Mapping[str, xr.Dataset]) -> Tables:
    if name == "patching":
        jobs: Tables = {"detailed_layer_data": lambda: detailed_layer_data(ds),
                        "summary_results": lambda: summary_results(ds, data.get("decisions"))}
    else:
        has_position = "effect" in ds and "position" in ds["effect"].dims
        jobs = {name: (lambda: position_table(ds)) if has_position else (lambda: detailed_layer_data(ds))}
    if "effect" in ds and any(v.dims and "prompt" not in v.dims and "layer" in v.dims for v in ds.data_vars.values()):
        jobs[f"{name}_means"] = lambda: mean_table(ds)
    return jobs

"""The tables of the decisions analysis (``nnethics export``): ``decisions``, ``verdict_pairs``, ``verdict_groups``."""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd
import xarray as xr

from ...export import ExportError, Tables, long_table, vals


def decisions_table(ds: xr.Dataset) -> pd.DataFrame:
    """One row per (prompt, side); label logits/probabilities as ``logit_<label>``/``prob_<label>``."""
    names = ["category", "chosen", "ethical_option", "chose_ethical", "logit_diff", "ethical_margin", "label_is_top",
             "n_tokens", "consistent"]
    df = long_table(ds, ("prompt", "side"), [n for n in names if n in ds])
    for var, prefix in (("label_logit", "logit"), ("label_prob", "prob")):
        if var in ds:
            for o in vals(ds["option"]):  # rows in the file's (prompt, side) order, as long_table's
                df[f"{prefix}_{o}"] = vals(ds[var].sel(option=o).transpose("prompt", "side")).ravel()
    return df


PAIR_VARS = ("ethical_preference", "p_ethical", "position_bias", "swaps_ethical_label", "content_gap",
             "content_sensitive")


def verdict_pairs(ds: xr.Dataset) -> pd.DataFrame:
    """One row per pair: the verdict's per-pair quantities and both sides' logit differences."""
    missing = [v for v in PAIR_VARS if v not in ds]
    if missing:
        raise ExportError(f"decisions.nc has no {', '.join(missing)} (written before the verdict existed; rerun "
                          f"'nnethics run --analyses decisions')")
    df = long_table(ds, ("prompt",), [v for v in ("category", *PAIR_VARS) if v in ds])
    sides = ds["logit_diff"].transpose("prompt", "side").to_pandas()
    for side in sides.columns:
        df.insert(df.columns.get_loc(PAIR_VARS[0]), f"logit_diff_{side}", sides[side].to_numpy(dtype=float))
    return df


def verdict_groups(ds: xr.Dataset) -> pd.DataFrame:
    """One row per group (``(all)`` and each category): the cross-pair statistics behind the verdict."""
    if "group" not in ds.dims:
        raise ExportError("decisions.nc has no 'group' statistics (rerun 'nnethics run --analyses decisions')")
    names = [n for n, v in ds.data_vars.items() if v.dims == ("group",)]
    return ds[names].to_dataframe().reset_index()


def tables(name: str, ds: xr.Dataset, data: Mapping[str, xr.Dataset]) -> Tables:
    jobs: Tables = {"decisions": lambda: decisions_table(ds)}
    if all(v in ds for v in PAIR_VARS):
        jobs["verdict_pairs"] = lambda: verdict_pairs(ds)
    if "group" in ds.dims:
        jobs["verdict_groups"] = lambda: verdict_groups(ds)
    return jobs

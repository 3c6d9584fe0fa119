"""The tables of the attribution analysis (``nnethics export``): ``attribution`` and ``attribution_heads``."""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd
import xarray as xr

from ...export import ExportError, Tables, long_table, vals


def attribution_table(ds: xr.Dataset) -> pd.DataFrame:
    """One row per (prompt, side, layer): the original scripts' ``attn_to_1``, ``mlp_to_1``, ``total_to_1`` ..."""
    if "logit_contribution" not in ds:
        raise ExportError("attribution.nc has no 'logit_contribution' variable")
    lc = ds["logit_contribution"]
    cols: dict[str, xr.DataArray] = {}
    for o in vals(ds["option"]):
        by = lc.sel(option=o, drop=True)
        for c in vals(ds["component"]):
            cols[f"{c}_to_{o}"] = by.sel(component=c, drop=True)
        cols[f"total_to_{o}"] = by.sum("component")
    if "diff_contribution" in ds:
        for c in vals(ds["component"]):
            cols[f"{c}_diff"] = ds["diff_contribution"].sel(component=c, drop=True)
        cols["total_diff"] = ds["diff_contribution"].sum("component")
    if "attn_mlp_ratio" in ds:
        cols["attn_mlp_ratio"] = ds["attn_mlp_ratio"]
    return long_table(xr.Dataset(cols).assign_coords({d: ds[d] for d in ("prompt", "side", "layer")}),
                      ("prompt", "side", "layer"))


def head_table(ds: xr.Dataset) -> pd.DataFrame:
    if "head_contribution" not in ds:
        raise ExportError("attribution.nc has no 'head_contribution' variable")
    return long_table(ds, ("prompt", "side", "layer", "head"), ["head_contribution"])


def tables(name: str, ds: xr.Dataset, data: Mapping[str, xr.Dataset]) -> Tables:
    jobs: Tables = {"attribution": lambda: attribution_table(ds)}
    if "head_contribution" in ds:
        jobs["attribution_heads"] = lambda: head_table(ds)
    return jobs

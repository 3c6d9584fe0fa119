"""The tables of the lens analysis (``nnethics export``): ``token_trajectories`` and ``<lens>_lens_topk.json``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
import xarray as xr

from ...export import ExportError, Tables, json_only, jsonable, long_table, vals
from ...store.schema import upgrade

TOPK = {"top_token": "top_tokens", "top_token_text": "top_token_texts", "top_token_id": "top_token_ids",
        "top_prob": "top_probs", "top_logit": "top_logits"}


def lens_topk(ds: xr.Dataset, lens: str) -> pd.DataFrame:
    """The top-k tokens of one lens: one record per (prompt, side, layer), each a list over k."""
    if "top_token" not in ds:
        raise ExportError("lens.nc has no 'top_token' variable")
    one = ds.sel(lens=lens, drop=True)
    names = [n for n in TOPK if n in one]
    long = long_table(one, ("prompt", "side", "layer", "k"), names)
    df = long.groupby(["prompt_id", "side", "layer"], sort=False)[names].agg(list).reset_index()
    df = df.rename(columns=TOPK)
    df.attrs["constants"] = {"lens": lens}
    return df


def lens_topk_records(ds: xr.Dataset) -> list[dict[str, Any]]:
    """Every lens' top-k records (with a ``lens`` field), as the API's plain-Python view of the JSON files."""
    return [{"lens": str(lens), **rec} for lens in vals(ds["lens"])
            for rec in jsonable(lens_topk(ds, str(lens)).to_dict(orient="records"))]


def trajectory_table(ds: xr.Dataset) -> pd.DataFrame:
    """One row per (prompt, side, lens, layer): label logits/probabilities, their difference, KL, crossing.
    Files of an older schema (``option_logit``) are read too."""
    ds = upgrade(ds)
    if "label_logit" not in ds:
        raise ExportError("lens.nc has no 'label_logit' variable")
    cols: dict[str, xr.DataArray] = {}
    for o in vals(ds["option"]):
        cols[f"logit_{o}"] = ds["label_logit"].sel(option=o, drop=True)
        if "label_prob" in ds:
            cols[f"prob_{o}"] = ds["label_prob"].sel(option=o, drop=True)
    cols["logit_diff"] = ds["label_logit"].isel(option=0, drop=True) - ds["label_logit"].isel(option=-1, drop=True)
    for v in ("kl_to_final", "crossing_layer"):
        if v in ds:
            cols[v] = ds[v]
    return long_table(xr.Dataset(cols), ("prompt", "side", "lens", "layer"))


def tables(name: str, ds: xr.Dataset, data: Mapping[str, xr.Dataset]) -> Tables:
    jobs: Tables = {"token_trajectories": lambda: trajectory_table(ds)}
    if "top_token" in ds:  # one file per lens, named after it (always JSON: each record holds lists over k)
        for lens in vals(ds["lens"]):
            jobs[f"{lens}_lens_topk"] = lambda lens=str(lens): lens_topk(ds, lens).pipe(json_only)
    return jobs

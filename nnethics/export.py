"""Flat CSV/JSON exports of a model folder, in the file layout of the original scripts.

``export_store(store/<model-slug>, fmt="csv")`` writes under ``store/<model-slug>/export/``:

- ``decisions.csv``: one row per (prompt, side): chosen label, ethical label, label logits/probabilities.
- ``verdict_pairs.csv``: one row per pair: logit differences of both sides, ``ethical_preference``,
  ``p_ethical``, ``position_bias``, ``swaps_ethical_label``, ``content_gap``, ``content_sensitive`` and the category.
- ``verdict_groups.csv``: one row per group (``(all)`` and each category): pairs, mean ethical preference and
  position bias with their BCa bootstrap 95% CIs, shares leaning ethical / content-sensitive with Wilson
  intervals, the sign test. The verdict paragraph itself is the ``verdict`` attr of ``decisions.nc``.
- ``detailed_layer_data.csv``: one row per (prompt, layer, component) of ``patching.nc``
  (``causal_score`` = patching effect on the logit difference, ``patched_logit_diff``, ``flipped``, ``atp_effect``).
- ``summary_results.csv``: one row per prompt: ``peak_layer``, ``num_choice_flips``, ``gini_coefficient``,
  ``top5_concentration``, ``chose_ethical_base``, base/cf logit differences, ``early_mean``/``middle_mean``/
  ``late_mean`` (mean resid effect over each third of the layers) and the category.
- ``patching_grid.csv``, ``patching_noise_grid.csv``: one row per (prompt, layer, [component,] position);
  ``patching_all.csv``, ``patching_noise.csv``, ``patching_noise_all.csv``: like ``detailed_layer_data.csv``.
- ``attribution.csv``: one row per (prompt, side, layer): ``attn_to_<label>``, ``mlp_to_<label>``,
  ``total_to_<label>`` for each label, ``attn_diff``/``mlp_diff``/``total_diff`` (label 1 − label 2) and
  ``attn_mlp_ratio``; ``attribution_heads.csv``: one row per (prompt, side, layer, head).
- ``tuned_lens.json``: top-k tokens per (prompt, side, lens, layer) (always JSON);
  ``token_trajectories.csv``: label logits/probabilities per (prompt, side, lens, layer), KL, crossing layer.

With ``fmt="json"`` every table is written as a JSON list of records instead of CSV. Reads NetCDF only
(no torch, no plotting). Each analysis owns its tables (``Analysis.tables``, below: ``decisions_tables``, ...);
``export_store`` writes those of every registered analysis whose file is in the folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from .store.atomic import write_text_atomic
from .store.schema import upgrade

FORMATS = ("csv", "json")
SUMMARY_FIRST = ("prompt_id", "peak_layer", "num_choice_flips", "gini_coefficient", "top5_concentration",
                 "chose_ethical_base")


class ExportError(ValueError):
    """Nothing to export (bad user input)."""


def _vals(da: xr.DataArray) -> np.ndarray:
    return np.asarray(da.values)


def _py(v: Any) -> Any:
    """A JSON-safe Python scalar (NaN becomes None)."""
    if isinstance(v, (np.floating, float)):
        return None if not np.isfinite(v) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, np.str_):
        return str(v)
    return v


def _component(da: xr.DataArray, prefer: str = "resid") -> xr.DataArray:
    if "component" not in da.dims:
        return da
    comps = [str(c) for c in _vals(da["component"])]
    return da.sel(component=prefer if prefer in comps else comps[0])


def decisions_table(ds: xr.Dataset) -> pd.DataFrame:
    """One row per (prompt, side)."""
    rows = []
    options = [str(o) for o in _vals(ds["option"])] if "option" in ds.coords else []
    for p in _vals(ds["prompt"]):
        one = ds.sel(prompt=p)
        for side in _vals(ds["side"]):
            s = one.sel(side=side)
            row: dict[str, Any] = {"prompt_id": str(p), "side": str(side)}
            if "category" in one:
                row["category"] = str(one["category"].values)
            for v in ("chosen", "ethical_option", "chose_ethical", "logit_diff", "ethical_margin", "label_is_top",
                      "n_tokens"):
                if v in s:
                    row[v] = _py(s[v].values.item())
            if "consistent" in one:
                row["consistent"] = bool(one["consistent"].values)
            for o in options:
                if "label_logit" in s:
                    row[f"logit_{o}"] = _py(s["label_logit"].sel(option=o).values.item())
                if "label_prob" in s:
                    row[f"prob_{o}"] = _py(s["label_prob"].sel(option=o).values.item())
            rows.append(row)
    return pd.DataFrame(rows)


PAIR_VARS = ("ethical_preference", "p_ethical", "position_bias", "swaps_ethical_label", "content_gap",
             "content_sensitive")


def verdict_pairs(ds: xr.Dataset) -> pd.DataFrame:
    """One row per pair: the verdict's per-pair quantities."""
    missing = [v for v in PAIR_VARS if v not in ds]
    if missing:
        raise ExportError(f"decisions.nc has no {', '.join(missing)} (written before the verdict existed; rerun "
                          f"'nnethics run --analyses decisions')")
    df = pd.DataFrame({"prompt_id": _vals(ds["prompt"]).astype(str)})
    if "category" in ds:
        df["category"] = _vals(ds["category"]).astype(str)
    for side in _vals(ds["side"]):
        df[f"logit_diff_{side}"] = _vals(ds["logit_diff"].sel(side=side)).astype(float)
    for v in PAIR_VARS:
        df[v] = _vals(ds[v])
    return df


def verdict_groups(ds: xr.Dataset) -> pd.DataFrame:
    """One row per group (``(all)`` and each category): the cross-pair statistics behind the verdict."""
    if "group" not in ds.dims:
        raise ExportError("decisions.nc has no 'group' statistics (rerun 'nnethics run --analyses decisions')")
    names = [n for n, v in ds.data_vars.items() if v.dims == ("group",)]
    df = ds[names].to_dataframe().reset_index()
    return df


def detailed_layer_data(ds: xr.Dataset) -> pd.DataFrame:
    """One row per (prompt, layer, component) of ``patching.nc``."""
    if "effect" not in ds:
        raise ExportError("patching.nc has no 'effect' variable")
    names = {"effect": "causal_score", "patched_logit_diff": "patched_logit_diff", "flipped": "flipped",
             "atp_effect": "atp_effect"}
    dims = [d for d in ("prompt", "layer", "component") if d in ds["effect"].dims]
    frame = xr.Dataset({new: ds[old].transpose(*dims) for old, new in names.items() if old in ds})
    df = frame.to_dataframe().reset_index().rename(columns={"prompt": "prompt_id"})
    for v in ("base_logit_diff", "cf_logit_diff", "corrupted_logit_diff"):
        if v in ds:
            df[v] = df["prompt_id"].map(dict(zip(_vals(ds["prompt"]).astype(str), _vals(ds[v]).astype(float))))
    df["prompt_id"] = df["prompt_id"].astype(str)
    return df


def summary_results(ds: xr.Dataset, decisions: xr.Dataset | None = None) -> pd.DataFrame:
    """One row per prompt: the per-prompt patching summaries (+ early/middle/late mean resid effect)."""
    prompts = _vals(ds["prompt"]).astype(str)
    df = pd.DataFrame({"prompt_id": prompts})
    per_prompt = [n for n, v in ds.data_vars.items() if v.dims and v.dims[0] == "prompt" and "layer" not in v.dims]
    for name in per_prompt:
        da = ds[name]
        extra = [d for d in da.dims if d != "prompt"]
        if not extra:
            df[name] = [_py(x) for x in _vals(da)]
            continue
        if extra == ["component"]:
            for comp in _vals(da["component"]):
                df[f"{name}_{comp}"] = [_py(x) for x in _vals(da.sel(component=comp))]
            df[name] = [_py(x) for x in _vals(_component(da))]
    if "effect" in ds and "layer" in ds["effect"].dims:
        eff = _component(ds["effect"]).transpose("prompt", "layer")
        thirds = np.array_split(np.arange(eff.sizes["layer"]), 3)
        for label, idx in zip(("early_mean", "middle_mean", "late_mean"), thirds):
            df[label] = _vals(eff.isel(layer=idx).mean("layer")).astype(float) if len(idx) else np.nan
    if decisions is not None and "category" in decisions:
        cats = dict(zip(_vals(decisions["prompt"]).astype(str), _vals(decisions["category"]).astype(str)))
        df["category"] = df["prompt_id"].map(cats)
    first = [c for c in SUMMARY_FIRST if c in df.columns]
    return df[first + [c for c in df.columns if c not in first]]


def position_table(ds: xr.Dataset) -> pd.DataFrame:
    """``patching_grid.nc`` / ``patching_noise.nc`` in long form."""
    floats = [n for n, v in ds.data_vars.items() if "position" in v.dims]
    if not floats:
        raise ExportError("no variable with a position dim")
    df = ds[floats].to_dataframe().reset_index().rename(columns={"prompt": "prompt_id"})
    df["prompt_id"] = df["prompt_id"].astype(str)
    return df


def attribution_table(ds: xr.Dataset) -> pd.DataFrame:
    """One row per (prompt, side, layer): the original scripts' ``attn_to_1``, ``mlp_to_1``, ``total_to_1`` ..."""
    if "logit_contribution" not in ds:
        raise ExportError("attribution.nc has no 'logit_contribution' variable")
    lc = ds["logit_contribution"]
    comps = [str(c) for c in _vals(ds["component"])]
    cols: dict[str, xr.DataArray] = {}
    for o in _vals(ds["option"]):
        by = lc.sel(option=o)
        for c in comps:
            cols[f"{c}_to_{o}"] = by.sel(component=c)
        cols[f"total_to_{o}"] = by.sum("component")
    if "diff_contribution" in ds:
        for c in comps:
            cols[f"{c}_diff"] = ds["diff_contribution"].sel(component=c)
        cols["total_diff"] = ds["diff_contribution"].sum("component")
    if "attn_mlp_ratio" in ds:
        cols["attn_mlp_ratio"] = ds["attn_mlp_ratio"]
    dims = [d for d in ("prompt", "side", "layer") if d in lc.dims]
    frame = xr.Dataset({k: v.transpose(*dims).drop_vars([c for c in v.coords if c not in dims], errors="ignore")
                        for k, v in cols.items()})
    df = frame.to_dataframe().reset_index().rename(columns={"prompt": "prompt_id"})
    df["prompt_id"] = df["prompt_id"].astype(str)
    return df


def head_table(ds: xr.Dataset) -> pd.DataFrame:
    if "head_contribution" not in ds:
        raise ExportError("attribution.nc has no 'head_contribution' variable")
    df = ds["head_contribution"].to_dataframe().reset_index().rename(columns={"prompt": "prompt_id"})
    df["prompt_id"] = df["prompt_id"].astype(str)
    return df


def lens_topk_records(ds: xr.Dataset) -> list[dict[str, Any]]:
    """The original scripts' tuned-lens JSON: top-k tokens per (prompt, side, lens, layer)."""
    if "top_token" not in ds:
        raise ExportError("lens.nc has no 'top_token' variable")
    order = ("prompt", "side", "lens", "layer", "k")
    tok = ds["top_token"].transpose(*order)
    extra = {v: ds[v].transpose(*order) for v in ("top_token_id", "top_prob", "top_logit") if v in ds}
    records = []
    for i, p in enumerate(_vals(ds["prompt"])):
        for j, side in enumerate(_vals(ds["side"])):
            for li, lens in enumerate(_vals(ds["lens"])):
                for la, layer in enumerate(_vals(ds["layer"])):
                    rec: dict[str, Any] = {"prompt_id": str(p), "side": str(side), "lens": str(lens),
                                           "layer": int(layer),
                                           "top_tokens": [str(t) for t in _vals(tok[i, j, li, la])]}
                    for name, key in (("top_token_id", "top_token_ids"), ("top_prob", "top_probs"),
                                      ("top_logit", "top_logits")):
                        if name in extra:
                            rec[key] = [_py(x) for x in _vals(extra[name][i, j, li, la])]
                    records.append(rec)
    return records


def trajectory_table(ds: xr.Dataset) -> pd.DataFrame:
    """One row per (prompt, side, lens, layer): label logits/probabilities, their difference, KL, crossing.
    Files of an older schema (``option_logit``) are read too."""
    ds = upgrade(ds)
    if "label_logit" not in ds:
        raise ExportError("lens.nc has no 'label_logit' variable")
    dims = ("prompt", "side", "lens", "layer")
    cols: dict[str, xr.DataArray] = {}
    options = _vals(ds["option"])
    for o in options:
        cols[f"logit_{o}"] = ds["label_logit"].sel(option=o, drop=True)
        if "label_prob" in ds:
            cols[f"prob_{o}"] = ds["label_prob"].sel(option=o, drop=True)
    cols["logit_diff"] = (ds["label_logit"].isel(option=0, drop=True) - ds["label_logit"].isel(option=-1, drop=True))
    if "kl_to_final" in ds:
        cols["kl_to_final"] = ds["kl_to_final"]
    frame = xr.Dataset({k: v.transpose(*dims) for k, v in cols.items()})
    df = frame.to_dataframe().reset_index().rename(columns={"prompt": "prompt_id"})
    if "crossing_layer" in ds:
        cross = ds["crossing_layer"].to_dataframe().reset_index().rename(columns={"prompt": "prompt_id"})
        df = df.merge(cross[["prompt_id", "side", "lens", "crossing_layer"]], on=["prompt_id", "side", "lens"],
                      how="left")
    df["prompt_id"] = df["prompt_id"].astype(str)
    return df


def _write(text: str, path: Path) -> Path:
    return write_text_atomic(text, path, newline="")


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def neutralise_formulas(df: pd.DataFrame) -> pd.DataFrame:
    """Text cells that a spreadsheet would run as a formula (starting with = + - @, tab or CR) get a leading
    apostrophe, as OWASP advises against CSV injection; numeric columns are left alone."""
    df = df.copy()
    for col in df.columns:
        if df[col].dtype == object or pd.api.types.is_string_dtype(df[col]):
            df[col] = df[col].map(lambda v: "'" + v if isinstance(v, str) and v.startswith(FORMULA_START) else v)
    return df


def _table(df: pd.DataFrame, out: Path, stem: str, fmt: str) -> Path:
    if fmt == "csv":
        return _write(neutralise_formulas(df).to_csv(index=False), out / f"{stem}.csv")
    records = [{k: _py(v) for k, v in row.items()} for row in df.to_dict(orient="records")]
    return _write(json.dumps(records, ensure_ascii=False, indent=1), out / f"{stem}.json")


# ---------------------------------------------------------------------------------------------
# the tables each analysis owns (its Analysis.tables): {file stem: build() -> DataFrame | JSON records}

Tables = dict[str, Callable[[], "pd.DataFrame | list[dict]"]]


def decisions_tables(name: str, ds: xr.Dataset, data: Mapping[str, xr.Dataset]) -> Tables:
    jobs: Tables = {"decisions": lambda: decisions_table(ds)}
    if all(v in ds for v in PAIR_VARS):
        jobs["verdict_pairs"] = lambda: verdict_pairs(ds)
    if "group" in ds.dims:
        jobs["verdict_groups"] = lambda: verdict_groups(ds)
    return jobs


def patching_tables(name: str, ds: xr.Dataset, data: Mapping[str, xr.Dataset]) -> Tables:
    if name == "patching":
        return {"detailed_layer_data": lambda: detailed_layer_data(ds),
                "summary_results": lambda: summary_results(ds, data.get("decisions"))}
    has_position = "effect" in ds and "position" in ds["effect"].dims
    return {name: (lambda: position_table(ds)) if has_position else (lambda: detailed_layer_data(ds))}


def attribution_tables(name: str, ds: xr.Dataset, data: Mapping[str, xr.Dataset]) -> Tables:
    jobs: Tables = {"attribution": lambda: attribution_table(ds)}
    if "head_contribution" in ds:
        jobs["attribution_heads"] = lambda: head_table(ds)
    return jobs


def lens_tables(name: str, ds: xr.Dataset, data: Mapping[str, xr.Dataset]) -> Tables:
    jobs: Tables = {"token_trajectories": lambda: trajectory_table(ds)}
    if "top_token" in ds:
        jobs["tuned_lens"] = lambda: lens_topk_records(ds)  # records: always JSON
    return jobs


def _load(folder: Path, name: str) -> xr.Dataset | None:
    from .analyses import ANALYSES
    from .store import load, result_files

    path = result_files(folder).get(name)
    if path is None:
        return None
    try:
        ds = load(path)  # in the current schema, whatever version wrote it
    except (OSError, ValueError, RuntimeError) as e:
        raise ExportError(f"{path}: not a readable NetCDF file ({e}); recompute it with `nnethics run` "
                          "or move it out of the folder, then export again") from None
    if ANALYSES.get(str(ds.attrs.get("analysis", ""))) is not ANALYSES[name]:  # variants share their analysis
        raise ExportError(f"{path}: not an nnethics {name!r} result (its 'analysis' attribute is "
                          f"{ds.attrs.get('analysis')!r}); move it out of {folder} or recompute it with `nnethics run`")
    return ds


def export_store(store_dir: str | Path, fmt: str = "csv", out: str | Path | None = None) -> list[Path]:
    """Write the tables every registered analysis owns for the files in ``store_dir``; return the paths written."""
    from .analyses import analyses, file_names

    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    folder = Path(store_dir)
    if not folder.is_dir():
        raise ExportError(f"{folder}: not a folder; pass a store/<model-slug> folder")
    out_dir = Path(out) if out is not None else folder / "export"
    data = {n: ds for n in file_names() if (ds := _load(folder, n)) is not None}
    if not data:
        raise ExportError(f"{folder}: no result files (.nc) to export")
    jobs = [(name, stem, build) for a in analyses() if a.tables is not None for name in a.names if name in data
            for stem, build in a.tables(name, data[name], data).items()]
    written = []
    for name, stem, build in jobs:
        try:
            table = build()
        except (KeyError, ValueError, IndexError) as e:
            if isinstance(e, ExportError):
                raise ExportError(f"{folder / (name + '.nc')}: {e}") from None
            raise ExportError(f"{folder / (name + '.nc')}: lacks what the {stem} table needs ({type(e).__name__}: "
                              f"{e}); recompute it with `nnethics run`") from None
        if isinstance(table, pd.DataFrame):
            written.append(_table(table, out_dir, stem, fmt))
        else:
            written.append(_write(json.dumps(table, ensure_ascii=False, indent=1), out_dir / f"{stem}.json"))
    return written

"""Flat CSV/JSON exports of a model folder (the original scripts' tables, in nnethics' names).

``export_store(store/<model-slug>, fmt="csv")`` writes under ``store/<model-slug>/export/`` the tables each
analysis owns (``Analysis.tables``; the README's "Exports" lists them): ``decisions``, ``verdict_pairs``,
``verdict_groups``, ``detailed_layer_data`` (one row per prompt, layer, component: ``effect``, the seed's
``causal_score``), ``summary_results``, ``<patching file>`` and ``<patching file>_means`` (the means over prompts),
``attribution``, ``attribution_heads``, ``token_trajectories``, and ``<lens>_lens_topk.json`` per lens in the file
(``logit_lens_topk.json``, ``tuned_lens_topk.json``; always JSON). Every table is built with
``Dataset.to_dataframe`` and written with ``DataFrame.to_csv`` or as JSON records (:func:`records_json`). A row
dim of length one (one lens, one component) and the files' scalars are constants, not columns: they go to ``metadata.json`` with each source
file's provenance. ``seed_names=True`` writes the original scripts' names (:data:`SEED_COLUMNS`,
:data:`SEED_FILES`). Reads NetCDF only (no torch, no plotting).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from .store.atomic import staged_folder, write_text_atomic
from .store.schema import upgrade

FORMATS = ("csv", "json")
SUMMARY_FIRST = ("prompt_id", "peak_layer", "num_choice_flips", "gini_coefficient", "top5_concentration",
                 "chose_ethical_base")
SEED_COLUMNS = {"effect": "causal_score"}
"""nnethics' column name -> the original scripts' name, applied by ``export_store(..., seed_names=True)``
(``nnethics export --seed-names``); the default uses the names of the NetCDF files."""
METADATA = "metadata.json"
"""The export's sidecar: per table, the source file, its provenance attrs and the constants left out of the rows."""


class ExportError(ValueError):
    """Nothing to export (bad user input)."""


def _vals(da: xr.DataArray) -> np.ndarray:
    return np.asarray(da.values)


def _py(v: Any) -> Any:
    """A JSON-safe Python scalar (NaN becomes None)."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v


def _component(da: xr.DataArray, prefer: str = "resid") -> xr.DataArray:
    if "component" not in da.dims:
        return da
    comps = [str(c) for c in _vals(da["component"])]
    return da.sel(component=prefer if prefer in comps else comps[0])


def long_table(ds: xr.Dataset, dims: Sequence[str], names: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per combination of ``dims`` (``Dataset.to_dataframe``), a column per variable that has the row dims'
    ``prompt`` and no other dims (per-prompt variables repeat down their prompt's rows). Variables without the
    prompt dim (means over prompts, scalars) are not columns; :func:`constants` puts scalars in the sidecar.

    A row dim of length one (only the logit lens, only the resid component) is a constant, not a column: it is
    dropped and recorded in ``df.attrs["constants"]`` (the key ``prompt_id`` always stays)."""
    dims = [d for d in dims if d in ds.dims]
    keep = [n for n in (names if names is not None else list(ds.data_vars)) if n in ds
            and set(ds[n].dims) <= set(dims) and ("prompt" in ds[n].dims or "prompt" not in dims)]
    if not keep:
        raise KeyError(f"no variable with dims {dims}")
    frame = ds[keep].drop_vars([c for c in ds[keep].coords if c not in dims])
    df = frame.to_dataframe(dim_order=dims).reset_index().rename(columns={"prompt": "prompt_id"})
    if "prompt_id" in df:
        df["prompt_id"] = df["prompt_id"].astype(str)
    single = {d: _py(_vals(ds[d])[0]) for d in dims if d != "prompt" and ds.sizes[d] == 1 and d in ds.coords}
    df = df.drop(columns=list(single))
    df.attrs["constants"] = single
    return df


def constants(ds: xr.Dataset) -> dict[str, Any]:
    """The Dataset's scalar variables and scalar coordinates: the sidecar's, never a repeated column."""
    return {str(n): _py(v.values.item()) for n, v in {**ds.coords, **ds.data_vars}.items() if v.ndim == 0}


def decisions_table(ds: xr.Dataset) -> pd.DataFrame:
    """One row per (prompt, side); label logits/probabilities as ``logit_<label>``/``prob_<label>``."""
    names = ["category", "chosen", "ethical_option", "chose_ethical", "logit_diff", "ethical_margin", "label_is_top",
             "n_tokens", "consistent"]
    df = long_table(ds, ("prompt", "side"), [n for n in names if n in ds])
    for var, prefix in (("label_logit", "logit"), ("label_prob", "prob")):
        if var in ds:
            for o in _vals(ds["option"]):  # rows in the file's (prompt, side) order, as long_table's
                df[f"{prefix}_{o}"] = _vals(ds[var].sel(option=o).transpose("prompt", "side")).ravel()
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
            df[name] = _component(da).to_numpy()
    if "effect" in ds and "layer" in ds["effect"].dims:
        eff = _component(ds["effect"]).transpose("prompt", "layer")
        thirds = np.array_split(np.arange(eff.sizes["layer"]), 3)
        for label, idx in zip(("early_mean", "middle_mean", "late_mean"), thirds):
            df[label] = _vals(eff.isel(layer=idx).mean("layer")).astype(float) if len(idx) else np.nan
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


def attribution_table(ds: xr.Dataset) -> pd.DataFrame:
    """One row per (prompt, side, layer): the original scripts' ``attn_to_1``, ``mlp_to_1``, ``total_to_1`` ..."""
    if "logit_contribution" not in ds:
        raise ExportError("attribution.nc has no 'logit_contribution' variable")
    lc = ds["logit_contribution"]
    cols: dict[str, xr.DataArray] = {}
    for o in _vals(ds["option"]):
        by = lc.sel(option=o, drop=True)
        for c in _vals(ds["component"]):
            cols[f"{c}_to_{o}"] = by.sel(component=c, drop=True)
        cols[f"total_to_{o}"] = by.sum("component")
    if "diff_contribution" in ds:
        for c in _vals(ds["component"]):
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
    return [{"lens": str(lens), **rec} for lens in _vals(ds["lens"])
            for rec in _jsonable(lens_topk(ds, str(lens)).to_dict(orient="records"))]


def trajectory_table(ds: xr.Dataset) -> pd.DataFrame:
    """One row per (prompt, side, lens, layer): label logits/probabilities, their difference, KL, crossing.
    Files of an older schema (``option_logit``) are read too."""
    ds = upgrade(ds)
    if "label_logit" not in ds:
        raise ExportError("lens.nc has no 'label_logit' variable")
    cols: dict[str, xr.DataArray] = {}
    for o in _vals(ds["option"]):
        cols[f"logit_{o}"] = ds["label_logit"].sel(option=o, drop=True)
        if "label_prob" in ds:
            cols[f"prob_{o}"] = ds["label_prob"].sel(option=o, drop=True)
    cols["logit_diff"] = ds["label_logit"].isel(option=0, drop=True) - ds["label_logit"].isel(option=-1, drop=True)
    for v in ("kl_to_final", "crossing_layer"):
        if v in ds:
            cols[v] = ds[v]
    return long_table(xr.Dataset(cols), ("prompt", "side", "lens", "layer"))


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
    if fmt == "csv" and df.attrs.get("format") != "json":
        # RFC 4180's CRLF rows: the csv writer then quotes a text cell holding a lone CR, which with "\n" rows it
        # leaves bare (and every reader splits that row in two)
        return _write(neutralise_formulas(df).to_csv(index=False, lineterminator="\r\n"), out / f"{stem}.csv")
    return _write(records_json(df), out / f"{stem}.json")


def records_json(df: pd.DataFrame) -> str:
    """The table as a JSON list of records. Not ``DataFrame.to_json``: it rounds to at most 15 decimal places, so
    a float64 effect of 1.6e-05 came back with a relative error of 1.7e-11 (and values below 1e-15 as 0; measured
    in tests/test_export.py::test_json_tables_keep_full_precision); ``json`` writes the shortest exact repr."""
    return json.dumps(_jsonable(df.to_dict(orient="records")), ensure_ascii=False, indent=1)


def _jsonable(value: Any) -> Any:
    """JSON-safe Python values, recursively (numpy scalars and arrays; NaN becomes None)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return _py(value)


# ---------------------------------------------------------------------------------------------
# the tables each analysis owns (its Analysis.tables): {file stem: build() -> DataFrame | JSON records}

Tables = dict[str, Callable[[], "pd.DataFrame | list[dict]"]]
SEED_FILES = {"tuned_lens_topk": "tuned_lens"}
"""nnethics' file stem -> the original scripts' (with ``seed_names``)."""


def decisions_tables(name: str, ds: xr.Dataset, data: Mapping[str, xr.Dataset]) -> Tables:
    jobs: Tables = {"decisions": lambda: decisions_table(ds)}
    if all(v in ds for v in PAIR_VARS):
        jobs["verdict_pairs"] = lambda: verdict_pairs(ds)
    if "group" in ds.dims:
        jobs["verdict_groups"] = lambda: verdict_groups(ds)
    return jobs


def patching_tables(name: str, ds: xr.Dataset, data: Mapping[str, xr.Dataset]) -> Tables:
    if name == "patching":
        jobs: Tables = {"detailed_layer_data": lambda: detailed_layer_data(ds),
                        "summary_results": lambda: summary_results(ds, data.get("decisions"))}
    else:
        has_position = "effect" in ds and "position" in ds["effect"].dims
        jobs = {name: (lambda: position_table(ds)) if has_position else (lambda: detailed_layer_data(ds))}
    if "effect" in ds and any(v.dims and "prompt" not in v.dims and "layer" in v.dims for v in ds.data_vars.values()):
        jobs[f"{name}_means"] = lambda: mean_table(ds)
    return jobs


def attribution_tables(name: str, ds: xr.Dataset, data: Mapping[str, xr.Dataset]) -> Tables:
    jobs: Tables = {"attribution": lambda: attribution_table(ds)}
    if "head_contribution" in ds:
        jobs["attribution_heads"] = lambda: head_table(ds)
    return jobs


def lens_tables(name: str, ds: xr.Dataset, data: Mapping[str, xr.Dataset]) -> Tables:
    jobs: Tables = {"token_trajectories": lambda: trajectory_table(ds)}
    if "top_token" in ds:  # one file per lens, named after it (always JSON: each record holds lists over k)
        for lens in _vals(ds["lens"]):
            jobs[f"{lens}_lens_topk"] = lambda lens=str(lens): lens_topk(ds, lens).pipe(_json_only)
    return jobs


def _json_only(df: pd.DataFrame) -> pd.DataFrame:
    df.attrs["format"] = "json"
    return df


def _load(folder: Path, name: str) -> xr.Dataset | None:
    from .analyses import not_a_result
    from .store import load, result_files

    path = result_files(folder).get(name)
    if path is None:
        return None
    try:
        ds = load(path)  # in the current schema, whatever version wrote it
    except (OSError, ValueError, RuntimeError) as e:
        raise ExportError(f"{path}: not a readable NetCDF file ({e}); recompute it with `nnethics run` "
                          "or move it out of the folder, then export again") from None
    if (foreign := not_a_result(name, ds.attrs)) is not None:  # variants share their analysis
        raise ExportError(f"{path}: {foreign}; move it out of {folder} or recompute it with `nnethics run`")
    return ds


def export_store(store_dir: str | Path, fmt: str = "csv", out: str | Path | None = None,
                 seed_names: bool = False) -> list[Path]:
    """Write the tables every registered analysis owns for the files in ``store_dir``, and ``metadata.json`` (per
    table: its source file, the constants left out of its rows; per source: its provenance attrs); return the paths.
    ``seed_names``: the original scripts' names (:data:`SEED_COLUMNS`, :data:`SEED_FILES`) instead of nnethics'."""
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
    written, tables = [], {}
    # all or nothing: into a staging folder, moved into out_dir at the end, metadata.json (the manifest) last
    with staged_folder(out_dir, METADATA, "pass --out with another folder you can write to (nothing was exported; "
                                          "the files already there are unchanged)") as stage:
        for name, stem, build in jobs:
            table = _build(folder, name, stem, build)
            stem = SEED_FILES.get(stem, stem) if seed_names else stem
            table = table if isinstance(table, pd.DataFrame) else _json_only(pd.DataFrame.from_records(table))
            constants_ = table.attrs.get("constants", {})
            written.append(_table(table.rename(columns=SEED_COLUMNS) if seed_names else table, stage, stem, fmt))
            tables[written[-1].name] = {"source": f"{name}.nc", "constants": constants_}
        sources = {f"{n}.nc": {"constants": constants(ds), "attrs": _jsonable(dict(ds.attrs))} for n, ds in data.items()}
        meta = {"tables": tables, "column_aliases": SEED_COLUMNS if seed_names else {}, "sources": sources}
        written.append(_write(json.dumps(meta, ensure_ascii=False, indent=1, default=str), stage / METADATA))
    return [out_dir / p.name for p in written]


def _build(folder: Path, name: str, stem: str, build: Callable[[], Any]) -> Any:
    try:
        return build()
    except (KeyError, ValueError, IndexError) as e:
        if isinstance(e, ExportError):
            raise ExportError(f"{folder / (name + '.nc')}: {e}") from None
        raise ExportError(f"{folder / (name + '.nc')}: lacks what the {stem} table needs ({type(e).__name__}: "
                          f"{e}); recompute it with `nnethics run`") from None

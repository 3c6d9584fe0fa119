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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from .store.atomic import staged_folder, write_text_atomic

FORMATS = ("csv", "json")
SEED_COLUMNS = {"effect": "causal_score"}
"""nnethics' column name -> the original scripts' name, applied by ``export_store(..., seed_names=True)``
(``nnethics export --seed-names``); the default uses the names of the NetCDF files."""
METADATA = "metadata.json"
"""The export's sidecar: per table, the source file, its provenance attrs and the constants left out of the rows."""


class ExportError(ValueError):
    """Nothing to export (bad user input)."""


def vals(da: xr.DataArray) -> np.ndarray:
    return np.asarray(da.values)


def py_scalar(v: Any) -> Any:
    """A JSON-safe Python scalar (NaN becomes None)."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v


def component(da: xr.DataArray, prefer: str = "resid") -> xr.DataArray:
    if "component" not in da.dims:
        return da
    comps = [str(c) for c in vals(da["component"])]
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
    single = {d: py_scalar(vals(ds[d])[0]) for d in dims if d != "prompt" and ds.sizes[d] == 1 and d in ds.coords}
    df = df.drop(columns=list(single))
    df.attrs["constants"] = single
    return df


def constants(ds: xr.Dataset) -> dict[str, Any]:
    """The Dataset's scalar variables and scalar coordinates: the sidecar's, never a repeated column."""
    return {str(n): py_scalar(v.values.item()) for n, v in {**ds.coords, **ds.data_vars}.items() if v.ndim == 0}


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
    return json.dumps(jsonable(df.to_dict(orient="records")), ensure_ascii=False, indent=1)


def jsonable(value: Any) -> Any:
    """JSON-safe Python values, recursively (numpy scalars and arrays; NaN becomes None)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [jsonable(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return py_scalar(value)


# ---------------------------------------------------------------------------------------------
# the tables each analysis owns (its Analysis.tables): {file stem: build() -> DataFrame | JSON records}

Tables = dict[str, Callable[[], "pd.DataFrame | list[dict]"]]
SEED_FILES = {"tuned_lens_topk": "tuned_lens"}
"""nnethics' file stem -> the original scripts' (with ``seed_names``)."""


def json_only(df: pd.DataFrame) -> pd.DataFrame:
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
            table = table if isinstance(table, pd.DataFrame) else json_only(pd.DataFrame.from_records(table))
            constants_ = table.attrs.get("constants", {})
            written.append(_table(table.rename(columns=SEED_COLUMNS) if seed_names else table, stage, stem, fmt))
            tables[written[-1].name] = {"source": f"{name}.nc", "constants": constants_}
        sources = {f"{n}.nc": {"constants": constants(ds), "attrs": jsonable(dict(ds.attrs))} for n, ds in data.items()}
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

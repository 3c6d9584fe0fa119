"""NetCDF storage: provenance, atomic writes, resumable per-chunk parts, summaries.

Layout::

    store/<model-slug>/<analysis>.nc                  consolidated result
    store/<model-slug>/.parts/<analysis>/<n>.nc      finished chunks of a run in progress

A run writes each finished chunk of prompts as its own part (atomically); a rerun after a crash
skips the prompts found in parts written with the same options, then consolidates them into one
file and removes the parts. The consolidated file keeps the run's fingerprint, so a rerun with the
same model, prompts and options only computes prompts that are not in it yet (e.g. newly added
pairs); any change of options recomputes everything. Files are never modified in place (HDF5 locks and truncates files
that a reader holds open; ``os.replace`` is safe while readers are open).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from . import __version__
from .atomic import umask

ENGINE = "netcdf4"
PARTS = ".parts"


def _attr_value(value: Any) -> str | int | float:
    if isinstance(value, bool) or value is None:
        return str(value).lower() if isinstance(value, bool) else ""
    if isinstance(value, (int, float, str)):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def provenance(analysis: str, model: Any = None, prompts: Any = None, options: Mapping[str, Any] | None = None,
               **extra: Any) -> dict[str, str | int | float]:
    """Provenance attrs (str/int/float only: NetCDF rejects bool, None and dicts). No secrets."""
    import nnsight
    import torch
    import transformers

    attrs: dict[str, Any] = {
        "analysis": analysis,
        "nnethics_version": __version__,
        "nnsight_version": nnsight.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "options": json.dumps(dict(options or {}), sort_keys=True, default=str),
    }
    if model is not None:
        attrs.update(model.provenance())
    if prompts is not None:
        attrs.update(prompt_set=prompts.name, prompt_set_sha256=prompts.sha256, labels=json.dumps(list(prompts.labels)))
    attrs.update(extra)
    return {k: _attr_value(v) for k, v in attrs.items()}


def fingerprint(attrs: Mapping[str, Any]) -> str:
    """What must match for parts of an interrupted run to be reused."""
    keys = ("analysis", "model_id", "model_revision", "dtype", "quantization", "prompt_set_sha256", "options", "labels")
    blob = json.dumps({k: str(attrs.get(k, "")) for k in keys}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _encoding(ds: xr.Dataset) -> dict[str, dict]:
    enc = {}
    for name, var in ds.data_vars.items():
        if np.issubdtype(var.dtype, np.floating) or np.issubdtype(var.dtype, np.integer):
            enc[name] = {"zlib": True, "complevel": 4}
    return enc


def write_atomic(ds: xr.Dataset, path: str | Path) -> Path:
    """Write ``ds`` to ``path`` through a temp file in the same folder, fsync, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.stem}-", suffix=".nc")
    os.close(fd)
    # Encodings inherited from files read earlier (e.g. a part's fixed-width string length) would
    # silently truncate longer values written now: start from a clean slate.
    ds = ds.copy(deep=False)
    for var in ds.variables.values():
        var.encoding = {}
    try:
        ds.to_netcdf(tmp, engine=ENGINE, encoding=_encoding(ds))
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600 files; results should be as readable as any file
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def load(path: str | Path) -> xr.Dataset:
    """Read a stored Dataset fully into memory and close the file (safe against later rewrites)."""
    return xr.load_dataset(path, engine=ENGINE)


def result_path(store: str | Path, slug: str, analysis: str) -> Path:
    return Path(store) / slug / f"{analysis}.nc"


class PartStore:
    """Per-chunk parts of one analysis run, for crash-safe resume."""

    def __init__(self, store: str | Path, slug: str, analysis: str, attrs: Mapping[str, Any]):
        self.final = result_path(store, slug, analysis)
        self.dir = Path(store) / slug / PARTS / analysis
        self.attrs = dict(attrs)
        self.key = fingerprint(attrs)

    def _parts(self) -> list[Path]:
        return sorted(self.dir.glob("*.nc")) if self.dir.exists() else []

    def load_parts(self) -> list[xr.Dataset]:
        """Parts written by a run with the same fingerprint; stale or unreadable parts are dropped."""
        parts = []
        for p in self._parts():
            try:
                ds = load(p)
            except (OSError, ValueError):
                p.unlink(missing_ok=True)  # a part killed mid-write never got renamed into place; be safe anyway
                continue
            if ds.attrs.get("fingerprint") != self.key:
                p.unlink(missing_ok=True)
                continue
            parts.append(ds)
        return parts

    def previous(self) -> xr.Dataset | None:
        """The consolidated result of an earlier run with the same fingerprint, if any."""
        if not self.final.exists():
            return None
        try:
            ds = load(self.final)
        except (OSError, ValueError):
            return None
        return ds if ds.attrs.get("fingerprint") == self.key else None

    def done_ids(self) -> set[str]:
        done = {str(x) for ds in self.load_parts() for x in ds["prompt"].values}
        prev = self.previous()
        if prev is not None:
            done |= {str(x) for x in prev["prompt"].values}
        return done

    def write_part(self, ds: xr.Dataset) -> Path:
        ds = ds.assign_attrs(fingerprint=self.key)
        n = len(self._parts())
        while (self.dir / f"{n:06d}.nc").exists():
            n += 1
        return write_atomic(ds, self.dir / f"{n:06d}.nc")

    @staticmethod
    def _pad_ragged(parts: list[xr.Dataset]) -> list[xr.Dataset]:
        """Pad coordinate-less dims (e.g. ``token``) to a common size: −1 for ints, "" for strings, NaN for floats."""
        dims = {d for ds in parts for d in ds.dims if d != "prompt" and d not in ds.coords}
        for dim in dims:
            size = max(ds.sizes.get(dim, 0) for ds in parts)
            padded = []
            for ds in parts:
                missing = size - ds.sizes.get(dim, size)
                if missing > 0:
                    ds = ds.copy()
                    for name, var in ds.data_vars.items():
                        if dim in var.dims:
                            fill = _fill_value(var.dtype)
                            widths = [(0, missing if d == dim else 0) for d in var.dims]
                            ds[name] = (var.dims, np.pad(var.values, widths, constant_values=fill), var.attrs)
                padded.append(ds)
            parts = padded
        return parts

    def consolidate(self, order: Iterable[str] | None = None, extra_attrs: Mapping[str, Any] | None = None) -> xr.Dataset:
        """Concatenate the parts along ``prompt`` (in ``order``), write the final file, remove the parts."""
        parts = self.load_parts()
        prev = self.previous()
        if prev is not None:
            parts = [prev, *parts]
        if not parts:
            raise RuntimeError(f"no finished parts in {self.dir} to consolidate")
        parts = self._pad_ragged(parts)
        ds = xr.concat(parts, dim="prompt", data_vars="all", coords="different", compat="equals",
                       join="outer", combine_attrs="override")
        _, unique = np.unique(ds["prompt"].values, return_index=True)
        ds = ds.isel(prompt=np.sort(unique))
        if order is not None:
            # Requested prompts in their order, then any others already stored (never dropped).
            present = [str(p) for p in ds["prompt"].values.tolist()]
            first = [p for p in order if p in set(present)]
            ds = ds.sel(prompt=first + [p for p in present if p not in set(first)])
        attrs = {**self.attrs, **(extra_attrs or {}), "fingerprint": self.key}
        ds.attrs = {k: _attr_value(v) for k, v in attrs.items()}
        write_atomic(ds, self.final)
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            self.dir.parent.rmdir()
        except OSError:
            pass
        return ds


def _fill_value(dtype: np.dtype) -> Any:
    if np.issubdtype(dtype, np.integer):
        return -1
    if np.issubdtype(dtype, np.floating):
        return np.nan
    if np.issubdtype(dtype, np.bool_):
        return False
    return ""


def summarize(path: str | Path) -> str:
    """A short text summary of a stored file (dims, variables, provenance) for ``nnethics show``."""
    ds = load(path)
    lines = [f"{path}"]
    lines.append("dims: " + ", ".join(f"{k}={v}" for k, v in ds.sizes.items()))
    lines.append("variables:")
    for name, var in ds.data_vars.items():
        summary = ""
        if np.issubdtype(var.dtype, np.number) and var.size:
            vals = var.values.astype(float)
            finite = vals[np.isfinite(vals)]
            if finite.size:
                summary = f"  mean {finite.mean():.4g}  min {finite.min():.4g}  max {finite.max():.4g}"
        lines.append(f"  {name} ({', '.join(var.dims)}) {var.dtype}{summary}")
    lines.append("provenance:")
    for k, v in ds.attrs.items():
        lines.append(f"  {k}: {v}")
    return "\n".join(lines)

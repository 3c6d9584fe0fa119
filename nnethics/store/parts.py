"""Resumable runs: each finished chunk of prompts is written as its own part, then consolidated.

A run writes each finished chunk of prompts as its own part (atomically) under
``store/<model-slug>/.parts/<analysis>/<n>.nc``; a rerun after a crash skips the prompts found in parts
written with the same options, then consolidates them into one file and removes the parts. The
consolidated file keeps the run's fingerprint, so a rerun with the same model, prompt file and options
only computes prompts that are not in it yet (e.g. a larger ``--limit``); a run whose fingerprint differs
refuses (:class:`StoreConflict`, naming the differing options) unless told to overwrite. Writers hold the
model folder's lock (:mod:`.lock`).
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .atomic import TMP_SUFFIX, tmp_prefix
from .files import load, read_attrs, result_path, write_atomic
from .provenance import attr_value, describe_differences, fingerprint

PARTS = ".parts"
PART_NAME = re.compile(r"\d{6,}\.nc")


class StoreConflict(ValueError):
    """The store holds results computed with other options; replacing them needs ``overwrite`` (bad input)."""


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def combine(parts: list[xr.Dataset], order: Iterable[str] | None = None) -> xr.Dataset:
    """Chunks of one analysis as one Dataset: ragged dims padded, concatenated along ``prompt``, duplicates dropped,
    the prompts in ``order`` first (then any others, never dropped). :func:`nnethics.analyze` combines its
    in-memory chunks with it too, so its result equals the file."""
    ds = xr.concat(PartStore._pad_ragged(parts), dim="prompt", data_vars="all", coords="different", compat="equals",
                   join="outer", combine_attrs="override")
    _, unique = np.unique(ds["prompt"].values, return_index=True)
    ds = ds.isel(prompt=np.sort(unique))
    if order is not None:
        present = [str(p) for p in ds["prompt"].values.tolist()]
        first = [p for p in order if p in set(present)]
        ds = ds.sel(prompt=first + [p for p in present if p not in set(first)])
    return ds


class PartStore:
    """Per-chunk parts of one analysis run, for crash-safe resume.

    Callers hold the model folder's lock (:func:`nnethics.store.lock.store_lock`) while they use a PartStore:
    it deletes unreadable parts and, with ``overwrite``, parts and results of other options.
    """

    def __init__(self, store: str | Path, slug: str, analysis: str, attrs: Mapping[str, Any]):
        self.final = result_path(store, slug, analysis)
        self.dir = Path(store) / slug / PARTS / analysis
        self.attrs = dict(attrs)
        self.key = fingerprint(attrs)

    def _parts(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("*.nc") if PART_NAME.fullmatch(p.name)) if self.dir.exists() else []

    def _read_parts(self) -> list[tuple[Path, xr.Dataset]]:
        """Every readable part (any fingerprint); unreadable ones are removed with a warning."""
        parts = []
        for p in self._parts():
            try:
                parts.append((p, load(p)))
            except (OSError, ValueError, RuntimeError) as e:
                # Parts are renamed into place only when complete, so this is damage (disk, hand edits).
                _warn(f"{p} cannot be read ({e}); removed it, its prompts are computed again")
                p.unlink(missing_ok=True)
        return parts

    def load_parts(self) -> list[xr.Dataset]:
        """Parts written by a run with the same fingerprint."""
        return [ds for _, ds in self._read_parts() if ds.attrs.get("fingerprint") == self.key]

    def check(self, overwrite: bool = False) -> None:
        """Refuse (:class:`StoreConflict`) when the store holds results or parts of other options, unless
        ``overwrite``; move an unreadable result aside with a warning; remove temp files of killed writers."""
        for folder, pattern in ((self.dir, "*" + TMP_SUFFIX), (self.final.parent, tmp_prefix(self.final) + "*" + TMP_SUFFIX)):
            if folder.exists():
                for tmp in folder.glob(pattern):
                    tmp.unlink(missing_ok=True)
        if self.final.exists():
            try:
                stored = read_attrs(self.final)
            except (OSError, ValueError, RuntimeError) as e:
                stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
                aside = self.final.with_name(f"{self.final.name}.unreadable-{stamp}")
                os.replace(self.final, aside)
                _warn(f"{self.final} cannot be read ({e}); moved it to {aside.name} and computing it again")
            else:
                if stored.get("fingerprint") != self.key:
                    diffs = "; ".join(describe_differences(stored, self.attrs))
                    if not overwrite:
                        raise StoreConflict(
                            f"{self.final} holds results computed with other options ({diffs}); rerun with "
                            "--overwrite to replace them, or pass another --store to keep both")
                    _warn(f"replacing {self.final} ({diffs}) as --overwrite asks")
        other = [(p, ds) for p, ds in self._read_parts() if ds.attrs.get("fingerprint") != self.key]
        if other:
            diffs = "; ".join(describe_differences(other[0][1].attrs, self.attrs))
            if not overwrite:
                raise StoreConflict(
                    f"{self.dir} holds {len(other)} finished chunk(s) of an interrupted run with other options "
                    f"({diffs}); rerun that run's command to finish it, pass --overwrite to discard them, or pass "
                    "another --store")
            _warn(f"discarding {len(other)} finished chunk(s) of an interrupted run with other options in {self.dir} "
                  "as --overwrite asks")
            for p, _ in other:
                p.unlink(missing_ok=True)

    def previous(self) -> xr.Dataset | None:
        """The consolidated result of an earlier run with the same fingerprint, if any."""
        if not self.final.exists():
            return None
        try:
            ds = load(self.final)
        except (OSError, ValueError, RuntimeError):
            return None
        return ds if ds.attrs.get("fingerprint") == self.key else None

    def done_ids(self) -> set[str]:
        done = {str(x) for ds in self.load_parts() for x in ds["prompt"].values}
        prev = self.previous()
        if prev is not None:
            done |= {str(x) for x in prev["prompt"].values}
        return done

    def write_part(self, ds: xr.Dataset) -> Path:
        # Each part carries the run's provenance, so a conflicting later run can say which options differ.
        ds = ds.assign_attrs({**{k: attr_value(v) for k, v in self.attrs.items()}, "fingerprint": self.key})
        names = self._parts()
        n = int(names[-1].stem) + 1 if names else 0
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
                if missing > 0:  # every variable along dim at once (e.g. input_ids and token_text)
                    grown = {name: (var.dims, np.pad(var.values, [(0, missing if d == dim else 0) for d in var.dims],
                                                     constant_values=_fill_value(var.dtype)), var.attrs)
                             for name, var in ds.data_vars.items() if dim in var.dims}
                    ds = ds.drop_vars(list(grown)).assign(grown)
                padded.append(ds)
            parts = padded
        return parts

    def gather(self, order: Iterable[str] | None = None, extra_attrs: Mapping[str, Any] | None = None) -> xr.Dataset:
        """The earlier result and the parts, concatenated along ``prompt`` (in ``order``), with the run's attrs."""
        parts = self.load_parts()
        prev = self.previous()
        if prev is not None:
            parts = [prev, *parts]
        if not parts:
            raise RuntimeError(f"no finished parts in {self.dir} to consolidate")
        ds = combine(parts, order)
        attrs = {**self.attrs, **(extra_attrs or {}), "fingerprint": self.key}
        ds.attrs = {k: attr_value(v) for k, v in attrs.items()}
        return ds

    def commit(self, ds: xr.Dataset) -> None:
        """Write the final file (once) and remove the parts."""
        write_atomic(ds, self.final)
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            self.dir.parent.rmdir()
        except OSError:
            pass

    def consolidate(self, order: Iterable[str] | None = None, extra_attrs: Mapping[str, Any] | None = None,
                    finalize: Callable[[xr.Dataset], xr.Dataset] | None = None) -> xr.Dataset:
        """:meth:`gather`, ``finalize`` (cross-prompt statistics) once, :meth:`commit`."""
        ds = self.gather(order, extra_attrs)
        if finalize is not None:
            ds = finalize(ds)
        self.commit(ds)
        return ds


def _fill_value(dtype: np.dtype) -> Any:
    if np.issubdtype(dtype, np.integer):
        return -1
    if np.issubdtype(dtype, np.floating):
        return np.nan
    if np.issubdtype(dtype, np.bool_):
        return False
    return ""

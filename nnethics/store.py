"""NetCDF storage: provenance, atomic writes, resumable per-chunk parts, summaries.

Layout::

    store/<model-slug>/<analysis>.nc                  consolidated result
    store/<model-slug>/.parts/<analysis>/<n>.nc      finished chunks of a run in progress

A run writes each finished chunk of prompts as its own part (atomically); a rerun after a crash
skips the prompts found in parts written with the same options, then consolidates them into one
file and removes the parts. The consolidated file keeps the run's fingerprint, so a rerun with the
same model, prompt file and options only computes prompts that are not in it yet (e.g. a larger
``--limit``); a run whose fingerprint differs refuses (:class:`StoreConflict`, naming the differing
options) unless told to overwrite. Files are never modified in place (HDF5 locks and truncates files
that a reader holds open; ``os.replace`` is safe while readers are open); temp files are hidden
``.tmp`` files that no ``*.nc`` glob matches. Writers hold the model folder's lock (``storelock``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from . import __version__
from .atomic import TMP_SUFFIX, tmp_prefix, umask

ENGINE = "netcdf4"
PARTS = ".parts"
PART_NAME = re.compile(r"\d{6,}\.nc")


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


FINGERPRINT_KEYS = ("analysis", "model_id", "model_revision", "dtype", "quantization", "prompt_set_sha256", "options",
                    "labels")


def fingerprint(attrs: Mapping[str, Any]) -> str:
    """What must match for parts of an interrupted run, or a stored result, to be reused."""
    blob = json.dumps({k: str(attrs.get(k, "")) for k in FINGERPRINT_KEYS}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _encoding(ds: xr.Dataset) -> dict[str, dict]:
    enc = {}
    for name, var in ds.data_vars.items():
        if np.issubdtype(var.dtype, np.floating) or np.issubdtype(var.dtype, np.integer):
            enc[name] = {"zlib": True, "complevel": 4}
    return enc


class StoreError(RuntimeError):
    """The store cannot be written (no space, read-only, not a folder); the message says where and what to do."""


def _no_space(folder: Path, err: BaseException, needed: int) -> bool:
    """Whether a failed write ran out of space: errno ENOSPC/EDQUOT, or (HDF5 hides the errno) nearly no free space."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(folder).free < needed + 2**20
    except OSError:
        return False


def write_atomic(ds: xr.Dataset, path: str | Path) -> Path:
    """Write ``ds`` to ``path`` through a temp file in the same folder, fsync, then ``os.replace``.

    The temp file is hidden and ends in ``.tmp``, so no reader globbing ``*.nc`` ever sees it. A write that
    runs out of space raises :class:`StoreError` ("no space left on device at ...") and leaves ``path`` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=tmp_prefix(path), suffix=TMP_SUFFIX)
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
    except BaseException as err:
        if os.path.exists(tmp):
            # HDF5 may keep a failed file open until the process exits; emptying it frees the space at once.
            with contextlib.suppress(OSError):
                os.truncate(tmp, 0)
            os.remove(tmp)
        if isinstance(err, Exception) and _no_space(path.parent, err, int(ds.nbytes)):
            raise StoreError(f"no space left on device at {path.parent} while writing {path.name}; "
                             "free some space or pass another --store (finished parts are kept: rerun the same "
                             "command to resume)") from None
        raise
    return path


def check_store(store: str | Path) -> None:
    """Raise :class:`StoreError` unless ``store`` is a writable folder or can be created as one. Creates nothing:
    writability is probed with a temp file in the folder, or in its nearest existing parent."""
    store = Path(store)
    if store.exists() and not store.is_dir():
        raise StoreError(f"--store {store}: is a file, not a folder; pass a folder (it is created if missing)")
    probe = store
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise StoreError(f"--store {store}: {probe} is a file, so the folder cannot be created there; pass another --store")
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".nnethics-write-test-", suffix=TMP_SUFFIX):
            pass
    except OSError as e:
        where = "" if probe == store else f" (its parent {probe} is not writable, so it cannot be created)"
        raise StoreError(f"--store {store}: not writable{where}: {e.strerror}; pass a folder you can write to") from None


def load(path: str | Path) -> xr.Dataset:
    """Read a stored Dataset fully into memory and close the file (safe against later rewrites)."""
    return xr.load_dataset(path, engine=ENGINE)


def result_path(store: str | Path, slug: str, analysis: str) -> Path:
    return Path(store) / slug / f"{analysis}.nc"


class StoreConflict(ValueError):
    """The store holds results computed with other options; replacing them needs ``overwrite`` (bad input)."""


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def describe_differences(stored: Mapping[str, Any], ours: Mapping[str, Any]) -> list[str]:
    """The fingerprint fields (options key by key) in which ``stored`` attrs differ from ``ours``, in words."""
    if "fingerprint" not in stored:
        return ["it has no fingerprint (written by an older nnethics or another tool)"]
    if "analysis" not in stored:  # a part written before parts carried their provenance
        return [f"fingerprint: stored {stored.get('fingerprint')!r}, this run {fingerprint(ours)!r}"]
    out = []
    for key in FINGERPRINT_KEYS:
        a, b = str(stored.get(key, "")), str(ours.get(key, ""))
        if a == b:
            continue
        if key == "options" and isinstance(sa := _json_or_text(a or "{}"), dict) and isinstance(sb := _json_or_text(b), dict):
            unset = object()
            for k in sorted(set(sa) | set(sb)):
                va, vb = sa.get(k, unset), sb.get(k, unset)
                if va != vb:
                    show = [("(unset)" if v is unset else json.dumps(v, default=str)) for v in (va, vb)]
                    out.append(f"{k}: stored {show[0]}, this run {show[1]}")
        elif key == "prompt_set_sha256":
            out.append(f"prompt set sha256: stored {a[:12] or '(none)'}, this run {b[:12]} (the prompt file changed)")
        else:
            out.append(f"{key}: stored {a!r}, this run {b!r}")
    return out or [f"fingerprint: stored {stored.get('fingerprint')!r}, this run {fingerprint(ours)!r}"]


class PartStore:
    """Per-chunk parts of one analysis run, for crash-safe resume.

    Callers hold the model folder's lock (:func:`nnethics.storelock.store_lock`) while they use a PartStore:
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
                with xr.open_dataset(self.final, engine=ENGINE) as ds:
                    stored = dict(ds.attrs)
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
        ds = ds.assign_attrs({**{k: _attr_value(v) for k, v in self.attrs.items()}, "fingerprint": self.key})
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


def unreadable_results(folder: str | Path) -> list[tuple[Path, str]]:
    """The ``*.nc`` files of a model folder that cannot be opened, with the reason (readers skip them)."""
    bad = []
    for path in sorted(Path(folder).glob("*.nc")):
        try:
            with xr.open_dataset(path, engine=ENGINE):
                pass
        except (OSError, ValueError, RuntimeError) as e:
            bad.append((path, str(e)))
    return bad


SHARED_KEYS = ("model_id", "model_revision", "dtype", "quantization", "prompt_set_sha256", "labels")


def mixed_settings(folder: str | Path) -> list[str]:
    """Settings that differ between the result files of one model folder (e.g. chat and no-chat runs of two
    analyses), in words: a report over them would compare unlike things."""
    seen: dict[str, dict[str, str]] = {}
    for path in sorted(Path(folder).glob("*.nc")):
        try:
            with xr.open_dataset(path, engine=ENGINE) as ds:
                attrs = dict(ds.attrs)
        except (OSError, ValueError, RuntimeError):
            continue
        options = _json_or_text(str(attrs.get("options", "{}")))
        values = {k: str(attrs.get(k, "")) for k in SHARED_KEYS}
        if isinstance(options, dict) and "chat" in options:
            values["chat"] = json.dumps(options["chat"])
        for key, value in values.items():
            seen.setdefault(key, {})[path.stem] = value
    out = []
    for key, by_file in seen.items():
        if len(set(by_file.values())) > 1:
            short = {f: (v[:12] if key == "prompt_set_sha256" else v) for f, v in by_file.items()}
            out.append(f"{key} differs between files ({', '.join(f'{f}: {v}' for f, v in short.items())})")
    return out


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

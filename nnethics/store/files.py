"""NetCDF files of a store: where they are, reading (in the current schema) and atomic writing, summaries.

Layout::

    store/<model-slug>/<analysis>.nc                  consolidated result
    store/<model-slug>/.parts/<analysis>/<n>.nc      finished chunks of a run in progress (:mod:`.parts`)

Files are never modified in place (HDF5 locks and truncates files that a reader holds open; ``os.replace``
is safe while readers are open).
"""

from __future__ import annotations

import errno
import json
import shutil
import tempfile
from collections.abc import Collection
from pathlib import Path

import numpy as np
import xarray as xr

from .atomic import TMP_SUFFIX, StoreError, write_via_temp
from .provenance import json_or_text
from .schema import upgrade
from .variables import describe

ENGINE = "netcdf4"
RESULT_SUFFIX = ".nc"


def _encoding(ds: xr.Dataset) -> dict[str, dict]:
    enc = {}
    for name, var in ds.data_vars.items():
        if np.issubdtype(var.dtype, np.floating) or np.issubdtype(var.dtype, np.integer):
            enc[name] = {"zlib": True, "complevel": 4}
    return enc


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
    # Encodings inherited from files read earlier (e.g. a part's fixed-width string length) would
    # silently truncate longer values written now: start from a clean slate.
    ds = describe(ds)  # long_name, units and Conventions (CF), on every file nnethics writes
    for var in ds.variables.values():
        var.encoding = {}
    try:
        return write_via_temp(path, lambda tmp: ds.to_netcdf(tmp, engine=ENGINE, encoding=_encoding(ds)))
    except Exception as err:
        if _no_space(path.parent, err, int(ds.nbytes)):
            raise StoreError(f"no space left on device at {path.parent} while writing {path.name}; "
                             "free some space or pass another --store (finished parts are kept: rerun the same "
                             "command to resume)") from None
        raise


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
    """Read a stored Dataset fully into memory and close the file (safe against later rewrites).

    Files of an older schema version come back in the current one (:func:`~nnethics.store.schema.upgrade`), with
    every declared variable's ``long_name`` and ``units`` (:func:`~nnethics.store.variables.describe`)."""
    return describe(upgrade(xr.load_dataset(path, engine=ENGINE)))


def result_path(store: str | Path, slug: str, analysis: str) -> Path:
    """``store/<slug>/<analysis>.nc``."""
    return Path(store) / slug / f"{analysis}{RESULT_SUFFIX}"


def result_files(folder: str | Path) -> dict[str, Path]:
    """The result files of one model folder (``store/<model-slug>``), ``{analysis file name: path}`` in name order.

    Only consolidated results: the ``.parts`` folder of a run in progress, hidden temp files and files moved
    aside as unreadable (``*.nc.unreadable-<time>``) are not results. A missing folder has none."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.glob(f"*{RESULT_SUFFIX}"))
            if p.is_file() and not p.name.startswith(".")}


def read_attrs(path: Path) -> dict:
    """A file's global attrs (opens it lazily and closes it again); raises what opening raises."""
    with xr.open_dataset(path, engine=ENGINE) as ds:
        return dict(ds.attrs)


def unreadable_results(folder: str | Path) -> list[tuple[Path, str]]:
    """The ``*.nc`` files of a model folder that cannot be opened, with the reason (readers skip them)."""
    bad = []
    for path in result_files(folder).values():
        try:
            read_attrs(path)
        except (OSError, ValueError, RuntimeError) as e:
            bad.append((path, str(e)))
    return bad


SHARED_KEYS = ("model_id", "model_revision", "dtype", "quantization", "prompt_set_sha256", "labels")


def mixed_settings(folder: str | Path, skip: Collection[Path] = ()) -> list[str]:
    """Settings that differ between the result files of one model folder (e.g. chat and no-chat runs of two
    analyses), in words: a report over them would compare unlike things. Files in ``skip`` (left out of the
    report) are not compared."""
    seen: dict[str, dict[str, str]] = {}
    for name, path in result_files(folder).items():
        if path in skip:
            continue
        try:
            attrs = read_attrs(path)
        except (OSError, ValueError, RuntimeError):
            continue
        options = json_or_text(str(attrs.get("options", "{}")))
        values = {k: str(attrs.get(k, "")) for k in SHARED_KEYS}
        if isinstance(options, dict) and "chat" in options:
            values["chat"] = json.dumps(options["chat"])
        for key, value in values.items():
            seen.setdefault(key, {})[name] = value
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

"""The declared schema of stored Datasets: its version, and the attrs that say what a variable means.

Every file carries ``schema_version`` (an int attr written by :func:`~nnethics.store.provenance.provenance`).
Where a variable's meaning depends on an option, the variable says so in its own attrs, so readers
(render, export) read them instead of guessing from the numbers:

* patching's ``effect`` (and ``atp_effect``): ``effect_kind`` — ``"normalized"``, (patched − receiver) /
  (source − receiver), 1 = the source run's logit difference; or ``"raw"``, patched − receiver in logits;
* patching's ``effect_defined``: ``min_gap`` (float, logits) — the gap below which ``effect`` is NaN;
* one name per quantity across files: the answer labels' logit and probability are ``label_logit`` and
  ``label_prob`` wherever they are stored.

:func:`upgrade` turns a Dataset of an older version into the current one in memory (``store.load`` applies
it), so that readers only know the current schema.
"""

from __future__ import annotations

import re

import xarray as xr

# 1: the files written before the schema was declared (nnethics up to the regression store of commit
#    a93aeb5): no ``schema_version`` attr, lens' ``option_logit``/``option_prob``, no ``effect_kind``, and
#    ``min_gap`` only inside ``effect_defined``'s description text.
# 2: ``schema_version``, ``effect_kind``, numeric ``min_gap``, ``label_logit``/``label_prob`` in lens.
SCHEMA_VERSION = 2

EFFECT_KIND = "effect_kind"
NORMALIZED, RAW = "normalized", "raw"
EFFECT_KINDS = {NORMALIZED: "(patched − receiver) / (source − receiver): 1 = the source run's logit difference",
                RAW: "patched − receiver, in logits"}
MIN_GAP = "min_gap"

# Version 1 names of quantities that have one name across files since version 2 (all in lens.nc).
V1_PATCHING = "patching"  # the 'analysis' attr of version-1 patching files: a fact of a closed format, not a name
V1_NAMES = {"option_logit": "label_logit", "option_prob": "label_prob"}
_V1_MIN_GAP = re.compile(r"min_gap = ([-+0-9.eE]+)")


def schema_version(ds: xr.Dataset) -> int:
    """The schema version a Dataset was written with (1 for files without the attr)."""
    return int(ds.attrs.get("schema_version", 1))


def upgrade(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` in the current schema: unchanged if it is current, else a shallow copy with the old names and
    attrs mapped (idempotent; values are never touched)."""
    if schema_version(ds) >= SCHEMA_VERSION:
        return ds
    return _upgrade_v1(ds)


def _upgrade_v1(ds: xr.Dataset) -> xr.Dataset:
    """Version 1 -> 2. The version-1 path: what version 1 left implicit is read from the file's structure."""
    ds = ds.rename({old: new for old, new in V1_NAMES.items() if old in ds.variables and new not in ds.variables})
    ds = ds.copy(deep=False)
    patching = str(ds.attrs.get("analysis", "")).startswith(V1_PATCHING) or "patched_logit_diff" in ds
    for name in ("effect", "atp_effect") if patching else ():
        if name in ds and EFFECT_KIND not in ds[name].attrs:
            # Every version-1 file nnethics wrote stored the normalised effect beside ``effect_defined``;
            # the first contract (before nnethics computed patching) had neither: patched − base in logits.
            ds[name].attrs = {**ds[name].attrs, EFFECT_KIND: NORMALIZED if "effect_defined" in ds else RAW}
    if "effect_defined" in ds and MIN_GAP not in ds["effect_defined"].attrs:
        found = _V1_MIN_GAP.search(str(ds["effect_defined"].attrs.get("description", "")))
        if found:  # version 1 wrote min_gap only into the description: "|cf - base| >= min_gap = 0.1"
            ds["effect_defined"].attrs = {**ds["effect_defined"].attrs, MIN_GAP: float(found.group(1))}
    return ds


def effect_kind(ds: xr.Dataset, var: str = "effect") -> str | None:
    """``var``'s declared ``effect_kind`` (``"normalized"`` or ``"raw"``), None where the file declares none."""
    kind = upgrade(ds)[var].attrs.get(EFFECT_KIND) if var in ds else None
    return str(kind) if kind in EFFECT_KINDS else None


def min_gap(ds: xr.Dataset) -> float | None:
    """The ``min_gap`` behind ``effect_defined`` (logits), None where the file does not record it."""
    if "effect_defined" not in ds:
        return None
    value = upgrade(ds)["effect_defined"].attrs.get(MIN_GAP)
    return None if value is None else float(value)

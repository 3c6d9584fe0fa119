"""Storage of results as NetCDF: the declared schema, provenance, atomic and resumable writes, the writer lock.

* :mod:`.schema`: ``SCHEMA_VERSION``, the attrs that say what a variable means, :func:`upgrade` of older files;
* :mod:`.provenance`: the provenance attrs of every file and the fingerprint that decides reuse;
* :mod:`.atomic`: the one atomic writer (temp file, fsync, ``os.replace``) behind every file nnethics writes;
* :mod:`.files`: paths, :func:`load` / :func:`write_atomic` of NetCDF results, summaries of a model folder;
* :mod:`.parts`: per-chunk parts of a run in progress, for crash-safe resume (:class:`PartStore`);
* :mod:`.lock`: one writer per model folder (:func:`store_lock`).
"""

from __future__ import annotations

from .atomic import TMP_SUFFIX, staged_folder, tmp_prefix, write_problem, write_text_atomic, write_via_temp
from .files import (
    ENGINE,
    StoreError,
    check_store,
    load,
    mixed_settings,
    read_attrs,
    result_files,
    result_path,
    summarize,
    unreadable_results,
    write_atomic,
)
from .lock import StoreBusy, store_lock
from .parts import PARTS, PartStore, StoreConflict
from .provenance import FINGERPRINT_KEYS, attr_value, describe_differences, fingerprint, provenance
from .schema import SCHEMA_VERSION, effect_kind, min_gap, schema_version, upgrade

__all__ = [
    "ENGINE", "FINGERPRINT_KEYS", "PARTS", "SCHEMA_VERSION", "TMP_SUFFIX", "PartStore", "StoreBusy", "StoreConflict",
    "StoreError", "attr_value", "check_store", "describe_differences", "effect_kind", "fingerprint", "load",
    "min_gap", "mixed_settings", "provenance", "read_attrs", "result_files", "result_path", "schema_version",
    "staged_folder", "store_lock", "summarize", "tmp_prefix", "unreadable_results", "upgrade", "write_atomic",
    "write_problem", "write_text_atomic", "write_via_temp",
]

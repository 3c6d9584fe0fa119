"""Moved to :mod:`nnethics.store.atomic`; this name stays for the importers that still use it."""

from __future__ import annotations

from .store.atomic import TMP_SUFFIX, tmp_prefix, write_text_atomic, write_via_temp

__all__ = ["TMP_SUFFIX", "tmp_prefix", "write_text_atomic", "write_via_temp"]

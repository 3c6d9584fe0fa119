"""Moved to :mod:`nnethics.store.lock`; this name stays for the importers that still use it."""

from __future__ import annotations

from .store.lock import HOLDER_FILE, LOCK_FILE, TIMEOUT_ENV, StoreBusy, default_timeout, describe_holder, store_lock

__all__ = ["HOLDER_FILE", "LOCK_FILE", "TIMEOUT_ENV", "StoreBusy", "default_timeout", "describe_holder", "store_lock"]

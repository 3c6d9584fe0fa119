"""Errors of the model layer that every other layer may catch, and the one out-of-memory test.

Kept apart from :mod:`nnethics.models.loading` so that the remote package, the lenses and the CLI can
import them without importing the loader (which imports the remote package: no import circle).
"""

from __future__ import annotations

import torch


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` means the forward ran out of memory: torch's error, an allocator's RuntimeError,
    or NDIF's :class:`~nnethics.models.remote.RemoteOutOfMemoryError` (its message says "out of memory").
    The runner halves the chunk and the patching engine the rows per forward on it."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)

"""Errors of the model layer that every other layer may catch, and the one out-of-memory test.

Kept apart from :mod:`nnethics.models.loading` so that the remote package, the lenses and the CLI can
import them without importing the loader (which imports the remote package: no import circle).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` means the forward ran out of memory: torch's error, an allocator's RuntimeError,
    or NDIF's :class:`~nnethics.models.remote.RemoteOutOfMemoryError` (its message says "out of memory").
    :func:`halving` retries on it with half the work per step."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def halving(size: int, loop: Callable[[int], T], floor: int = 1) -> T:
    """``loop(size)``; when it raises an out-of-memory error (:func:`is_oom`), garbage is collected, the device
    cache emptied and ``loop(max(floor, size // 2))`` runs, and so on; at ``floor`` the error itself is raised, as
    is any other error at once. ``loop`` keeps its progress outside itself, so a retry goes on from the first
    unfinished item and finished work stays done.

    The one out-of-memory helper of nnethics: the engine's chunk loop (pairs per chunk), the patching engine
    (rows per forward), heads (rows per forward; pairs per attention session). Ours rather than accelerate's
    ``find_executable_batch_size`` (which the chunk loop used until issue 25), for two measured reasons: it
    collects garbage before the first try as well, 0.19 s a call in the built-in model's process, which every
    chunk of the patching engine would pay; and its ``should_reduce_batch_size`` misses out-of-memory errors that
    :func:`is_oom` counts (``torch.OutOfMemoryError("CUDA out of memory")`` and ``RuntimeError("CUDA error: out of
    memory")`` lack its " out of memory."), while past size 1 it raises its own "reached zero" error instead of
    the real one."""
    while True:
        try:
            return loop(size)
        except Exception as err:  # noqa: BLE001 - only out-of-memory is retried
            if not is_oom(err) or size <= floor:
                raise
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        size = max(floor, size // 2)

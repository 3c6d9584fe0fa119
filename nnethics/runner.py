"""Chunked, resumable execution of an analysis over a prompt set.

The analysis itself is a pure function ``fn(model, pairs) -> xr.Dataset`` (dim ``prompt``); this
module feeds it chunks, writes each finished chunk as an atomic part, halves the chunk on
out-of-memory without losing finished prompts, shows progress on stderr, and consolidates the
parts into ``store/<slug>/<analysis>.nc``. Remote requests sent for a chunk are labelled with the
analysis name in :data:`nnethics.models.remote.STATS`.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import click
import torch
import xarray as xr

from .models.errors import is_oom
from .models.remote.stats import STATS
from .progress import progress_bar
from .prompts import PromptPair, PromptSet
from .store import PartStore, provenance, store_lock

AnalysisFn = Callable[[Any, Sequence[PromptPair]], xr.Dataset]


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_analysis(
    name: str,
    fn: AnalysisFn,
    model: Any,
    prompts: PromptSet,
    store: str,
    options: Mapping[str, Any],
    batch_size: int = 8,
    progress: bool | None = None,
    extra_attrs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    lock_timeout: float | None = None,
    finalize: Callable[[xr.Dataset], xr.Dataset] | None = None,
) -> xr.Dataset:
    """Run ``fn`` over every pair in chunks of ``batch_size`` pairs, resumably; return the consolidated Dataset.

    Holds the model folder's lock throughout (another process on the same folder waits, or gets
    :class:`~nnethics.store.StoreBusy` after ``lock_timeout`` seconds). A stored result or parts with
    other options raise :class:`~nnethics.store.StoreConflict` unless ``overwrite``.
    """
    if batch_size < 1:
        raise click.BadParameter(f"batch size must be at least 1, got {batch_size}")
    attrs = provenance(name, model, prompts, options, **(extra_attrs or {}))
    parts = PartStore(store, model.slug, name, attrs)
    with store_lock(parts.final.parent, timeout=lock_timeout):
        parts.check(overwrite)
        return _run_chunks(name, fn, model, prompts, parts, batch_size, progress, finalize)


def _run_chunks(name: str, fn: AnalysisFn, model: Any, prompts: PromptSet, parts: PartStore, batch_size: int,
                progress: bool | None, finalize: Callable[[xr.Dataset], xr.Dataset] | None = None) -> xr.Dataset:
    done = parts.done_ids()
    todo = [p for p in prompts.pairs if p.prompt_id not in done]
    label = f"{name} [{model.slug}]"
    if len(todo) < len(prompts):  # a rerun or resumed run: say what it skips
        click.echo(f"{label}: skipping {len(prompts) - len(todo)} of {len(prompts)} prompts already done in "
                   f"{parts.final.parent}", err=True)
    size = batch_size
    with progress_bar(len(prompts), label, show=progress, initial=len(prompts) - len(todo)) as bar:
        i = 0
        while i < len(todo):
            chunk = todo[i:i + size]
            try:
                with STATS.scope(name):  # remote requests of this chunk count under the analysis name
                    ds = fn(model, chunk)
            except Exception as err:  # noqa: BLE001 - only OOM is retried
                if not is_oom(err) or size == 1:
                    raise
                free_memory()
                size = max(1, size // 2)
                continue
            parts.write_part(ds)
            i += len(chunk)
            bar.update(len(chunk))
    return parts.consolidate(order=prompts.ids(), finalize=finalize)

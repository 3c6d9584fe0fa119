"""Chunked, resumable execution of an analysis over a prompt set.

The analysis itself is a pure function ``fn(model, pairs) -> xr.Dataset`` (dim ``prompt``); this
module feeds it chunks, writes each finished chunk as an atomic part, halves the chunk on
out-of-memory without losing finished prompts (``accelerate.utils.find_executable_batch_size``), shows progress on stderr, and consolidates the
parts into ``store/<slug>/<analysis>.nc``. Remote requests sent for a chunk are labelled with the
analysis name in :data:`nnethics.models.remote.STATS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
import xarray as xr
from accelerate.utils import find_executable_batch_size

from .models.errors import is_oom
from .models.remote.stats import STATS
from .progress import progress_bar, remote_status
from .prompts import PromptPair, PromptSet
from .store import PartStore, provenance, store_lock

AnalysisFn = Callable[[Any, Sequence[PromptPair]], xr.Dataset]


class ChunkOutOfMemory(RuntimeError):
    """A chunk ran out of memory by :func:`is_oom`, in the one-argument form that accelerate's
    ``should_reduce_batch_size`` recognises (it needs " out of memory." in ``args[0]``)."""

    def __init__(self, size: int) -> None:
        super().__init__(f"a chunk of {size} pairs ran out of memory.")


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
    resume: Callable[[list[xr.Dataset]], None] | None = None,
) -> xr.Dataset:
    """Run ``fn`` over every pair in chunks of ``batch_size`` pairs, resumably; return the consolidated Dataset.

    Holds the model folder's lock throughout (another process on the same folder waits, or gets
    :class:`~nnethics.store.StoreBusy` after ``lock_timeout`` seconds). A stored result or parts with
    other options raise :class:`~nnethics.store.StoreConflict` unless ``overwrite``. ``resume``: given what is
    already done (the earlier result and the parts) before the first chunk that still runs, if any.
    """
    if batch_size < 1:
        raise click.BadParameter(f"batch size must be at least 1, got {batch_size}")
    attrs = provenance(name, model, prompts, options, **(extra_attrs or {}))
    parts = PartStore(store, model.store_folder, name, attrs)
    with store_lock(parts.final.parent, timeout=lock_timeout):
        parts.check(overwrite)
        return _run_chunks(name, fn, model, prompts, parts, batch_size, progress, finalize, resume)


def _run_chunks(name: str, fn: AnalysisFn, model: Any, prompts: PromptSet, parts: PartStore, batch_size: int,
                progress: bool | None, finalize: Callable[[xr.Dataset], xr.Dataset] | None = None,
                resume: Callable[[list[xr.Dataset]], None] | None = None) -> xr.Dataset:
    """Run the pairs not yet stored, in chunks (:func:`run_in_chunks`), then consolidate the parts."""
    done = parts.done_ids()
    todo = [p for p in prompts.pairs if p.prompt_id not in done]
    if resume is not None and todo and done:
        prev = parts.previous()
        resume([*([prev] if prev is not None else []), *parts.load_parts()])
    label = f"{name} [{model.store_folder}]"
    say_skipped(label, len(prompts) - len(todo), len(prompts), parts.final.parent)

    def step(chunk: list[PromptPair]) -> xr.Dataset:
        with STATS.scope(name):  # remote requests of this chunk count under the analysis name
            return fn(model, chunk)

    with progress_bar(len(prompts), label, show=progress, initial=len(prompts) - len(todo)) as bar, \
            remote_status(bar):
        run_in_chunks(todo, batch_size, step, lambda chunk, ds: parts.write_part(ds), bar,
                      chunk_failure(parts.final.parent, label))
    return parts.consolidate(order=prompts.ids(), finalize=finalize)


def say_skipped(label: str, skipped: int, total: int, folder: Any) -> None:
    if skipped:  # a rerun or resumed run: say what it skips
        click.echo(f"{label}: skipping {skipped} of {total} prompts already done in {folder}", err=True)


ERRORS_LOG = "errors.log"
"""The store's log of failed remote chunks (in the model's folder): what the server said, its traceback whole."""


def chunk_failure(folder: Path, label: str) -> Callable[[list, int, int, BaseException], BaseException | None]:
    """What a run reports when the server fails a chunk (:class:`~nnethics.models.remote.errors.RemoteExecutionError`:
    the traced code raised there; :class:`~nnethics.models.remote.errors.RemoteRequestError`: it refused the request,
    e.g. a model it does not serve): ONE line naming the analyses, the chunk and the cause, while the server's whole
    traceback goes to ``folder/errors.log``. None for any other error (it is raised as it is)."""
    from .models.remote.errors import RemoteExecutionError, RemoteRequestError

    def fail(chunk: list, start: int, total: int, err: BaseException) -> BaseException | None:
        if not isinstance(err, (RemoteExecutionError, RemoteRequestError)) or is_oom(err):
            return None
        where = (f"pairs {start + 1}-{start + len(chunk)} of the {total} to run "
                 f"({chunk[0].prompt_id}..{chunk[-1].prompt_id})")
        log = folder / ERRORS_LOG
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        folder.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as f:  # a log: appended to, one entry per failure
            said = str(err).splitlines()[0]  # our reading of it (e.g. which model could not start), then its words
            f.write(f"--- {stamp} {label}: {where} failed on NDIF at {err.host}\n{said}\n{err.detail or ''}\n")
        kind = "the code inside the trace failed there, not retried" if isinstance(err, RemoteExecutionError) \
            else "the server refused the request"
        line = (f"{label}: NDIF at {err.host} failed on {where}: {err.cause} ({kind}; the server's traceback is in "
                f"{log}). Chunks finished before it are stored: rerun the same command to resume.")
        return type(err)(" ".join(line.split()), err.host, detail=err.detail)

    return fail


def run_in_chunks(todo: Sequence[PromptPair], batch_size: int, step: Callable[[list], Any],
                  done: Callable[[list, Any], None], bar: Any = None,
                  failed: Callable[[list, int, int, BaseException], BaseException | None] | None = None,
                  per_step: int | None = None) -> None:
    """``done(chunk, step(chunk))`` for chunks of ``todo``; on OOM, halve the chunk and go on from the first
    unfinished pair (the runner's loop and the fused run's, :mod:`nnethics.fused`).

    accelerate's ``find_executable_batch_size`` retries the loop with a smaller size after an OOM (clearing
    the device cache and collecting garbage first). Used with two adjustments, measured against
    ``is_oom``: its ``should_reduce_batch_size`` misses OOMs that ``is_oom`` counts (``torch.OutOfMemoryError(
    "CUDA out of memory")`` and ``RuntimeError("CUDA error: out of memory")`` lack its " out of memory."), so
    an OOM by ``is_oom`` is re-raised as :class:`ChunkOutOfMemory`, which it does recognise; and past size
    1 it raises its own "No executable batch size found, reached zero.", so ``halve`` re-raises the
    original error at size 1 (as before), and also re-raises errors it would wrongly retry (a cuDNN
    "not supported" is no OOM). The loop state lives outside the retried function, so a retry resumes at
    the first unfinished pair, not at the start, and finished chunks stay written.

    ``failed(chunk, start, total, err)``: the error to raise instead of ``err`` when a chunk fails (None: ``err``
    itself), e.g. :func:`chunk_failure`.

    ``per_step`` given: each ``step`` gets a list of up to ``per_step`` chunks (one remote request for all of them,
    in :mod:`nnethics.fused`), cut exactly as one at a time would cut them, and ``done`` gets that list; an
    out-of-memory halves the chunks, not their number.
    """
    state: dict[str, Any] = {"i": 0, "size": batch_size, "err": None, "original": None}

    def halve() -> int:
        if not isinstance(state["err"], ChunkOutOfMemory) or state["size"] == 1:
            raise state["original"]
        state["size"] = max(1, state["size"] // 2)
        return state["size"]

    @find_executable_batch_size(starting_batch_size=batch_size, reduce_batch_size_fn=halve)
    def rest(size: int) -> None:
        while state["i"] < len(todo):
            span = list(todo[state["i"]:state["i"] + size * (per_step or 1)])
            chunk = span if per_step is None else [span[j:j + size] for j in range(0, len(span), size)]
            try:
                out = step(chunk)
            except Exception as err:  # noqa: BLE001 - only OOM is retried
                state["original"], state["err"] = err, ChunkOutOfMemory(size) if is_oom(err) else err
                if state["err"] is err:
                    replaced = failed(span, state["i"], len(todo), err) if failed is not None else None
                    if replaced is not None:
                        raise replaced from err
                    raise
                raise state["err"] from err
            done(chunk, out)
            state["i"] += len(span)
            if bar is not None:
                bar.update(len(span))

    rest()

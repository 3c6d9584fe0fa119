"""The chunk loop of a run: chunks of pairs, out-of-memory halving, one line when a remote chunk fails.

:func:`run_in_chunks` feeds chunks of pairs to a step and hands each result on as soon as it is done, so a
finished chunk is stored before the next one runs; an out-of-memory halves the chunk and goes on from the first
unfinished pair (:func:`nnethics.models.errors.halving`, the one halving helper).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from ..models.errors import halving, is_oom
from ..prompts import PromptPair


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
    from ..models.remote.errors import RemoteExecutionError, RemoteRequestError

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
    """``done(chunk, step(chunk))`` for chunks of ``todo``; on out-of-memory the chunk is halved and the loop goes
    on from the first unfinished pair (:func:`~nnethics.models.errors.halving`), finished chunks staying done.

    ``failed(chunk, start, total, err)``: the error to raise instead of ``err`` when a chunk fails (None: ``err``
    itself), e.g. :func:`chunk_failure`.

    ``per_step`` given: each ``step`` gets a list of up to ``per_step`` chunks (one remote request for all of them),
    cut exactly as one at a time would cut them, and ``done`` gets that list; an out-of-memory halves the chunks,
    not their number.
    """
    state = {"i": 0}

    def rest(size: int) -> None:
        while state["i"] < len(todo):
            span = list(todo[state["i"]:state["i"] + size * (per_step or 1)])
            chunk = span if per_step is None else [span[j:j + size] for j in range(0, len(span), size)]
            try:
                out = step(chunk)
            except Exception as err:  # noqa: BLE001 - out-of-memory goes to halving, others are raised
                replaced = failed(span, state["i"], len(todo), err) if failed is not None and not is_oom(err) \
                    else None
                if replaced is not None:
                    raise replaced from err
                raise
            done(chunk, out)
            state["i"] += len(span)
            if bar is not None:
                bar.update(len(span))

    halving(batch_size, rest)

"""Before a model loads: its store folder's lock and the options of what the folder holds.

A busy folder, or a rerun whose options differ from a stored result's, used to be reported after the model had
loaded (20-30 s for a small one, minutes for a large one). The folder follows from the model spec
(:func:`nnethics.models.loading.store_slug`), so both are checked first:

* :func:`early_lock`: while the model loads, a folder another process holds is waited for (announced, as
  :func:`~.lock.store_lock` does) or refused at once with ``--lock-timeout 0`` (:class:`~.lock.StoreBusy`);
* :func:`early_conflicts`: a stored result, or an interrupted run's parts, whose prompt file or options (those
  known without the model) differ from this run's is refused (:class:`~.parts.StoreConflict`) unless
  ``overwrite``. What only the model decides (its id, revision and dtype, and what an analysis' ``prepare``
  resolves, such as the tuned lens) is compared after the load, by :meth:`~.parts.PartStore.check`, as before.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from filelock import Timeout

from .files import read_attrs
from .lock import LOCK_FILE, lock_for, store_lock
from .parts import PART_NAME, PARTS, StoreConflict
from .provenance import json_or_text


@contextlib.contextmanager
def early_lock(folder: str | Path, timeout: float | None = None) -> Iterator[None]:
    """While the body (the model's load) runs: if another process holds ``folder``'s lock, wait for it as
    :func:`~.lock.store_lock` does (``timeout``: 0 refuses at once) and hold it; else hold nothing. Creates
    nothing: a folder without a lock file is not held by anyone."""
    folder = Path(folder)
    if not (folder / LOCK_FILE).exists():
        yield
        return
    lock = lock_for(folder)
    busy = False
    if not lock.is_locked:  # not ours already
        try:
            lock.acquire(timeout=0)
        except Timeout:  # (a subclass of OSError: caught first)
            busy = True
        except OSError:
            pass  # cannot be probed (a read-only folder): the lock after the load reports it
        else:
            lock.release()
    if busy:
        with store_lock(folder, timeout=timeout):
            yield
    else:
        yield


def _known_differences(stored: Mapping[str, Any], ours: Mapping[str, Any], sha256: str) -> list[str]:
    """The differences between a stored file's attrs and this run's known options and prompt file, worded as
    :func:`~.provenance.describe_differences` words them; [] when none is known (or the file predates them)."""
    if "fingerprint" not in stored or "analysis" not in stored:
        return []
    out = []
    theirs = str(stored.get("prompt_set_sha256", ""))
    if theirs != sha256:
        out.append(f"prompt set sha256: stored {theirs[:12] or '(none)'}, this run {sha256[:12]} (the prompt file "
                   "changed)")
    options = json_or_text(str(stored.get("options") or "{}"))
    if isinstance(options, dict):
        unset = object()
        for key in sorted(ours):
            value = options.get(key, unset)
            if value != ours[key]:
                shown = "(unset)" if value is unset else json.dumps(value, default=str)
                out.append(f"{key}: stored {shown}, this run {json.dumps(ours[key], default=str)}")
    return out


def early_conflicts(folder: str | Path, wanted: Mapping[str, tuple[Any, Any]], prompts: Any,
                    overwrite: bool = False) -> None:
    """Refuse (:class:`StoreConflict`, the same message as after the load) a run whose options or prompt file
    certainly differ from what ``folder`` holds for an analysis of ``wanted`` (``{file name: (analysis,
    options)}``), unless ``overwrite``. An analysis with a ``prepare`` hook is left to the check after the load
    (``prepare`` resolves some options, e.g. the tuned lens, only with the model)."""
    folder = Path(folder)
    if overwrite or not folder.is_dir():
        return
    for name, (analysis, options) in wanted.items():
        if analysis.prepare is not None:
            continue
        ours = json.loads(json.dumps({"labels": list(prompts.labels), "chat": options.chat,
                                      **analysis.record(options)}, sort_keys=True, default=str))
        final = folder / f"{name}.nc"
        if final.exists():
            try:
                stored = read_attrs(final)
            except (OSError, ValueError, RuntimeError):
                stored = {}  # unreadable: moved aside and recomputed after the load, with a warning
            diffs = _known_differences(stored, ours, prompts.sha256)
            if diffs:
                raise StoreConflict(f"{final} holds results computed with other options ({'; '.join(diffs)}); rerun "
                                    "with --overwrite to replace them, or pass another --store to keep both")
        parts = folder / PARTS / name
        other = []
        for part in sorted(parts.glob("*.nc")) if parts.is_dir() else []:
            if PART_NAME.fullmatch(part.name):
                with contextlib.suppress(OSError, ValueError, RuntimeError):
                    diffs = _known_differences(read_attrs(part), ours, prompts.sha256)
                    if diffs:
                        other.append(diffs)
        if other:
            raise StoreConflict(
                f"{parts} holds {len(other)} finished chunk(s) of an interrupted run with other options "
                f"({'; '.join(other[0])}); rerun that run's command to finish it, pass --overwrite to discard them, "
                "or pass another --store")

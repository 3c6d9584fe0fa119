"""One writer per model folder: an OS-level lock on ``store/<model-slug>/.lock``.

The lock is ``fcntl.flock`` (through the ``filelock`` package): the kernel drops it when its process
ends, so a ``kill -9`` never leaves a stale lock behind. Who holds it (pid, host, command, start time) is
written next to it in ``.lock.json`` so that a second run can name the holder while it waits or refuses.
The lock is reentrant within a process: ``nnethics run`` holds it for a whole model, and the analyses it
runs take it again without blocking.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from .atomic import write_text_atomic
from .files import StoreError

LOCK_FILE = ".lock"
HOLDER_FILE = ".lock.json"
TIMEOUT_ENV = "NNETHICS_LOCK_TIMEOUT"


class StoreBusy(RuntimeError):
    """Another process holds the model folder (bad input: exit code 2)."""


def _holder_info() -> dict[str, object]:
    from ..models.secrets import redact

    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": redact(" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "python"),
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def describe_holder(folder: Path) -> str:
    """Who holds ``folder``'s lock, in words (from ``.lock.json``; 'another process' if that is unreadable)."""
    try:
        info = json.loads((folder / HOLDER_FILE).read_text(encoding="utf-8"))
        return f"pid {info['pid']} on {info['host']} (`{info['command']}`, started {info['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def default_timeout() -> float | None:
    """Seconds to wait for a busy folder: ``$NNETHICS_LOCK_TIMEOUT``, else ``None`` (wait as long as it takes)."""
    from ..numbers import env_number

    return env_number(TIMEOUT_ENV, None, float, lo=0, unit="seconds")  # NaN, inf or < 0: NumberError (exit code 2)


def lock_for(folder: Path) -> FileLock:
    # One instance per path in this process (is_singleton), shared by its threads, so nested holds count up.
    return FileLock(folder / LOCK_FILE, is_singleton=True, thread_local=False)


@contextlib.contextmanager
def store_lock(folder: str | Path, timeout: float | None = None, announce: bool = True) -> Iterator[None]:
    """Hold the writer lock of ``folder`` (a ``store/<model-slug>`` folder, created if missing).

    ``timeout``: seconds to wait when another process holds it (``0``: refuse at once; ``None``: the
    ``NNETHICS_LOCK_TIMEOUT`` environment variable, else wait as long as it takes). While waiting, one line
    naming the holder goes to stderr (``announce``). Raises :class:`StoreBusy` naming the holder on timeout.
    """
    folder = Path(folder)
    lock = lock_for(folder)
    if lock.is_locked:  # already ours: nested use
        with lock:
            yield
        return
    if timeout is None:
        timeout = default_timeout()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock.acquire(timeout=0)
    except Timeout:  # (a subclass of OSError: caught first)
        holder = describe_holder(folder)
        if timeout == 0:
            raise StoreBusy(f"{folder} is in use by {holder}; wait for it to finish, or pass another --store "
                            f"(or --lock-timeout SECONDS to wait)") from None
        if announce:
            wait = "as long as it takes" if timeout is None else f"up to {timeout:g} s"
            print(f"{folder} is in use by {holder}; waiting {wait} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        try:
            lock.acquire(timeout=-1 if timeout is None else timeout, poll_interval=0.2)
        except Timeout:
            raise StoreBusy(f"{folder} is still in use by {describe_holder(folder)} after {timeout:g} s; wait for it "
                            "to finish, or pass another --store") from None
    except OSError as e:
        raise StoreError(f"cannot lock {folder} for writing ({e.strerror or e}); pass a --store you can write to") from None
    try:
        with contextlib.suppress(OSError):  # best effort: a full disk must not stop a run that writes nothing yet
            write_text_atomic(json.dumps(_holder_info()), folder / HOLDER_FILE)
        yield
    finally:
        # Remove our holder note before releasing, so that it never describes the next holder wrongly.
        with contextlib.suppress(OSError):
            (folder / HOLDER_FILE).unlink()
        lock.release()

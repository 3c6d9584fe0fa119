"""One progress mechanism for every loop that takes a while: tqdm.

tqdm rather than ``click.progressbar`` (which the runner used before): tqdm is already a dependency (of
transformers, huggingface_hub and the tuned-lens trainer here), it shows count, rate and ETA, and it can write to
any stream. ``click.progressbar`` writes nothing but its label when stderr is not a terminal, so a log file, CI
or ``nohup`` never saw how far a run was.

On a terminal the bar redraws in place. Anywhere else (``--progress`` with stderr redirected to a file, CI,
nohup) each update is its own line ``label: 40/140 prompts [00:31<01:18, 1.29 prompts/s]``, written at most
every :data:`LOG_INTERVAL` seconds, plus one at the start and one at the end.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

LOG_INTERVAL = 30.0
"""Seconds between two progress lines when the stream is not a terminal."""

LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class _Lines:
    """A stream for tqdm that turns its carriage-return redraws into whole lines (for log files)."""

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line and line != self.last:
            self.stream.write(line + "\n")
            self.last = line

    def flush(self) -> None:
        self.stream.flush()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress_bar(total: int, desc: str, unit: str = "prompts", show: bool | None = None, initial: int = 0,
                 file: IO[str] | None = None, interval: float | None = None) -> Any:
    """A tqdm bar on ``file`` (default stderr). ``show=None``: only when the stream is a terminal. ``interval``:
    seconds between lines when the stream is not a terminal (default :data:`LOG_INTERVAL`)."""
    from tqdm import tqdm

    stream = file if file is not None else sys.stderr
    tty = _isatty(stream)
    show = tty if show is None else show
    if tty:
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=stream, disable=not show)
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=_Lines(stream), disable=not show,
                mininterval=LOG_INTERVAL if interval is None else interval, miniters=1, bar_format=LOG_FORMAT,
                dynamic_ncols=False, ascii=True)


WAITING = ("QUEUED", "PROVISIONING", "DEPLOYING")
"""The statuses of a request that waits on the server (drawn at once, also in a log: they explain a bar that does not
move); RUNNING is shown on the bar's next redraw, and COMPLETED or ERROR clear it."""


@contextmanager
def remote_status(bar: Any) -> Iterator[None]:
    """Show on ``bar`` what NDIF says of the request in flight (``NDIF queued: Moved to position 2``, ``NDIF
    running``), from :meth:`~nnethics.models.remote.stats.RemoteStats.watch`."""
    from .models.remote.stats import STATS

    def show(record: Any, status: str, description: str) -> None:
        if status in ("COMPLETED", "ERROR"):
            bar.set_postfix_str("", refresh=False)
            return
        text = f"NDIF {status.lower()}" + (f": {description.strip()}" if status in WAITING and description else "")
        bar.set_postfix_str(text[:80], refresh=status in WAITING)

    with STATS.watch(show):
        yield

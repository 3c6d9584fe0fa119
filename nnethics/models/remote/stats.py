"""Accounting of remote requests: requests, attempts and bytes each way, labelled by analysis.

The label of a request is the innermost :meth:`RemoteStats.scope` open in the thread that sends it: the
runner opens one per chunk with the analysis' registry name (``patching_grid``, ``lens``...). Requests
sent outside any scope (the Python API called directly, a bare ``handle.trace``) are labelled ``"api"``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

UNSCOPED = "api"


@dataclass
class RequestRecord:
    """One remote request (all its attempts). Bytes are on the wire: the compressed payload and the
    request envelope up; the status frames, the compressed result and HTTP replies down."""

    label: str
    host: str
    attempts: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    result_bytes: int = 0
    seconds: float = 0.0
    status: str = "running"
    server_status: str = ""  # the last status the server reported (QUEUED, RUNNING, ...)


@dataclass
class RemoteStats:
    """Thread-safe log of remote requests, each labelled by the :meth:`scope` it was sent in."""

    records: list[RequestRecord] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _scope: threading.local = field(default_factory=threading.local, repr=False)
    _watchers: list[Callable[[RequestRecord, str, str], None]] = field(default_factory=list, repr=False)

    def reset(self) -> None:
        with self._lock:
            self.records.clear()

    @contextmanager
    def scope(self, label: str) -> Iterator[None]:
        """Label every request started in this thread inside the block (scopes nest; the innermost wins)."""
        previous = getattr(self._scope, "label", None)
        self._scope.label = label
        try:
            yield
        finally:
            self._scope.label = previous

    @contextmanager
    def watch(self, fn: Callable[[RequestRecord, str, str], None]) -> Iterator[None]:
        """Call ``fn(record, status, description)`` for every status a server reports inside the block (the
        progress display shows them: a request waiting in NDIF's queue says so)."""
        with self._lock:
            self._watchers.append(fn)
        try:
            yield
        finally:
            with self._lock:
                self._watchers.remove(fn)

    def status(self, record: RequestRecord, status: str, description: str = "") -> None:
        """What the server said of ``record``'s request (the backend calls it for each status it receives)."""
        record.server_status = status
        with self._lock:
            watchers = list(self._watchers)
        for fn in watchers:
            fn(record, status, description)

    def current_label(self) -> str:
        """The label a request sent now gets: the innermost open scope, else :data:`UNSCOPED`."""
        return getattr(self._scope, "label", None) or UNSCOPED

    def start(self, label: str, host: str) -> RequestRecord:
        record = RequestRecord(label=label, host=host)
        with self._lock:
            self.records.append(record)
        return record

    def totals(self, label: str | None = None) -> dict[str, int]:
        with self._lock:
            rows = [r for r in self.records if label is None or r.label == label]
        return {"requests": len(rows), "attempts": sum(r.attempts for r in rows),
                "bytes_sent": sum(r.bytes_sent for r in rows), "bytes_received": sum(r.bytes_received for r in rows),
                "failed": sum(r.status != "completed" for r in rows)}

    def labels(self) -> list[str]:
        with self._lock:
            return list(dict.fromkeys(r.label for r in self.records))

    def report(self, n_pairs: int | None = None) -> str:
        """One line per analysis: requests, attempts, KB up/down, and KB per pair when ``n_pairs`` is given."""
        lines = []
        for label in self.labels():
            t = self.totals(label)
            line = (f"{label}: {t['requests']} requests ({t['attempts']} attempts), "
                    f"{t['bytes_sent'] / 1024:.1f} KB up, {t['bytes_received'] / 1024:.1f} KB down")
            if n_pairs:
                line += f", {(t['bytes_sent'] + t['bytes_received']) / 1024 / n_pairs:.2f} KB per pair"
            lines.append(line)
        return "\n".join(lines)


STATS = RemoteStats()

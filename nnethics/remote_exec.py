"""Remote execution support: the errors a remote request can end in, the retry policy, and accounting.

Used by :mod:`nnethics.models.remote` (the NDIF backend); re-exported there. Every error names the host
and never the key; :data:`STATS` counts requests, attempts and bytes, labelled by analysis.
"""

from __future__ import annotations

import os
import random
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from nnsight.intervention.backends.remote import RemoteError
from nnsight.schema.config import CONFIG

from .models.loading import ModelLoadError
from .models.secrets import redact

ENV_RETRIES, ENV_TIMEOUT, ENV_BACKOFF = "NNETHICS_NDIF_RETRIES", "NNETHICS_NDIF_TIMEOUT", "NNETHICS_NDIF_BACKOFF"

# --- errors -------------------------------------------------------------------------------------

class NdifError(RemoteError, RuntimeError):
    """A remote (NDIF) request failed; the message names the host, never the key."""

    retried = False

    def __init__(self, message: str, host: str = "") -> None:
        super().__init__(redact(message, _api_key()))
        self.host = host


class RemoteExecutionError(NdifError):
    """The server ran the request and the code inside the trace raised: a bug, so it is not retried."""


class RemoteOutOfMemoryError(RemoteExecutionError):
    """The server ran out of memory; the runner halves the batch (its message says "out of memory")."""


class RemoteRequestError(NdifError):
    """The server refused the request (bad request, model not deployed, ...): not retried."""


class RemoteAuthError(RemoteRequestError):
    """The server rejected the API key."""


class RemoteConnectionError(NdifError):
    """The connection failed or dropped on every attempt."""

    retried = True


class RemoteTimeoutError(NdifError):
    """The server sent nothing for the timeout on every attempt."""

    retried = True


class _Transient(Exception):
    """A fault worth another attempt: ``kind`` is ``"dropped"``, ``"timeout"`` or ``"unavailable"``."""

    def __init__(self, kind: str, detail: Any) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, str(detail)


# --- settings -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` extra attempts after a dropped connection or a timeout, waiting ``backoff·2^k``
    seconds (at most ``backoff_max``, ±10% jitter) before attempt k+1. ``timeout`` is how long the
    client waits without hearing anything from the server (a silent server) before giving up on an attempt."""

    retries: int = 3
    timeout: float = 900.0
    backoff: float = 2.0
    backoff_max: float = 60.0
    connect_timeout: float = 10.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        def num(name: str, default: float, kind: type = float) -> Any:
            raw = os.environ.get(name)
            try:
                return kind(raw) if raw else default
            except ValueError:
                raise ModelLoadError(f"{name}={raw!r} is not a number") from None

        return cls(retries=max(0, num(ENV_RETRIES, cls.retries, int)), timeout=num(ENV_TIMEOUT, cls.timeout),
                   backoff=max(0.0, num(ENV_BACKOFF, cls.backoff)))

    def delay(self, attempt: int) -> float:
        base = min(self.backoff * 2 ** attempt, self.backoff_max)
        return base * random.uniform(0.9, 1.1)


def _api_key() -> str:
    return os.environ.get("NDIF_API_KEY") or CONFIG.API.APIKEY or ""



# --- accounting ---------------------------------------------------------------------------------

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


@dataclass
class RemoteStats:
    """Thread-safe log of remote requests. ``label`` is the analysis that opened the trace (the module
    name under ``nnethics.analyses``) unless a :meth:`scope` names it."""

    records: list[RequestRecord] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _scope: threading.local = field(default_factory=threading.local, repr=False)

    def reset(self) -> None:
        with self._lock:
            self.records.clear()

    @contextmanager
    def scope(self, label: str) -> Iterator[None]:
        """Label every request started in this thread inside the block."""
        previous = getattr(self._scope, "label", None)
        self._scope.label = label
        try:
            yield
        finally:
            self._scope.label = previous

    def label_for(self, tracer: Any) -> str:
        label = getattr(self._scope, "label", None)
        if label:
            return label
        frame = getattr(getattr(tracer, "info", None), "frame", None)
        module = frame.f_globals.get("__name__", "") if frame is not None else ""
        name = module.removeprefix("nnethics.analyses.")
        head = name.split("_")[0]  # patching_engine.py belongs to the patching analysis
        if name != module and head != name and f"nnethics.analyses.{head}" in sys.modules:
            name = head
        return name.removeprefix("nnethics.") or "other"

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

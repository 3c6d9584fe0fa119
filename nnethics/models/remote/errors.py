"""The errors a remote request can end in. Every message names the host and never the key."""

from __future__ import annotations

from typing import Any

from nnsight.intervention.backends.remote import RemoteError

from ..secrets import redact
from .settings import api_key


class NdifError(RemoteError, RuntimeError):
    """A remote (NDIF) request failed; the message names the host, never the key."""

    retried = False

    def __init__(self, message: str, host: str = "", detail: str = "") -> None:
        super().__init__(redact(message, api_key()))
        self.host = host
        self.detail = redact(detail, api_key()) if detail else ""  # the server's own words (its traceback), if any

    @property
    def cause(self) -> str:
        """One line: the last line of what the server said (a traceback ends with ``Type: message``), else the
        first line of the message."""
        lines = [line.strip() for line in (self.detail or str(self)).splitlines() if line.strip()]
        return (lines[-1] if self.detail else lines[0]) if lines else type(self).__name__


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


class TransientFault(Exception):
    """A fault worth another attempt (the backend's internal signal, never raised to callers):
    ``kind`` is ``"dropped"``, ``"timeout"`` or ``"unavailable"``."""

    def __init__(self, kind: str, detail: Any) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, str(detail)

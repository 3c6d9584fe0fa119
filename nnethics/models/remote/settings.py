"""Where remote requests go and how hard they are tried: host, API key, retry policy (read from the environment)."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

from nnsight.schema.config import CONFIG

from ...numbers import bounded, env_number
from ..errors import ModelLoadError

ENV_RETRIES, ENV_TIMEOUT, ENV_BACKOFF = "NNETHICS_NDIF_RETRIES", "NNETHICS_NDIF_TIMEOUT", "NNETHICS_NDIF_BACKOFF"
PUBLIC_HOST = "https://api.ndif.us"


def api_key() -> str:
    """The NDIF API key (``NDIF_API_KEY``, else nnsight's config); it only ever travels in request headers."""
    return os.environ.get("NDIF_API_KEY") or CONFIG.API.APIKEY or ""


def resolve_host(remote: bool | str) -> str:
    """The server for ``remote``: a URL as given, else ``NDIF_HOST`` (read now, not at import), else nnsight's config."""
    host = remote if isinstance(remote, str) else (os.environ.get("NDIF_HOST") or CONFIG.API.HOST)
    host = host.rstrip("/")
    if not host.startswith(("http://", "https://")):
        raise ModelLoadError(f"NDIF host {host!r} must start with http:// or https://")
    return host


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` extra attempts after a dropped connection or a timeout, waiting ``backoff·2^k``
    seconds (at most ``backoff_max``, ±10% jitter) before attempt k+1. ``timeout`` is how long the
    client waits without hearing anything from the server (a silent server) before giving up on an attempt.
    The attempts are made by tenacity (:meth:`NdifBackend._with_retries`), waiting :meth:`delay`.

    Each field has one allowed range (:data:`BOUNDS`), checked for the environment variables (the message names
    the variable) and for a policy built in code alike."""

    retries: int = 3
    timeout: float = 900.0
    backoff: float = 2.0
    backoff_max: float = 60.0
    connect_timeout: float = 10.0

    def __post_init__(self) -> None:
        for name, (kind, lo, hi, lo_open, _) in BOUNDS.items():
            bounded(name, getattr(self, name), kind, lo, hi, lo_open, unit="seconds" if kind is float else "")

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """The policy of ``NNETHICS_NDIF_RETRIES``/``_TIMEOUT``/``_BACKOFF`` (each checked against its range:
        :class:`~nnethics.numbers.NumberError` naming the variable, exit code 2 in the CLI)."""
        values = {}
        for name, (kind, lo, hi, lo_open, env) in BOUNDS.items():
            if env:
                values[name] = env_number(env, getattr(cls, name), kind, lo, hi, lo_open,
                                          unit="seconds" if kind is float else "")
        return cls(**values)

    def delay(self, attempt: int) -> float:
        base = min(self.backoff * 2 ** attempt, self.backoff_max)
        return base * random.uniform(0.9, 1.1)


BOUNDS: dict[str, tuple[type, float, float, bool, str]] = {
    # field: (kind, lowest, highest, lowest excluded, environment variable)
    "retries": (int, 0, 100, False, ENV_RETRIES),
    "timeout": (float, 0, 86400, True, ENV_TIMEOUT),
    "backoff": (float, 0, 3600, False, ENV_BACKOFF),
    "backoff_max": (float, 0, 86400, False, ""),
    "connect_timeout": (float, 0, 3600, True, ""),
}
"""The allowed range of each :class:`RetryPolicy` field (a day of silence at most, 100 extra attempts at most)."""

"""Where remote requests go and how hard they are tried: host, API key, retry policy (read from the environment)."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

from nnsight.schema.config import CONFIG

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
    The attempts are made by tenacity (:meth:`NdifBackend._with_retries`), waiting :meth:`delay`."""

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

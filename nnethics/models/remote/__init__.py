"""Run nnethics on NDIF: a weightless local model, requests with bounded retries, and request accounting.

* :mod:`.loading`: ``load_remote_model`` (config and tokenizer only; a handle whose traces run on NDIF),
  reached through :func:`nnethics.models.load_model` with ``remote=`` (not imported here: it builds a
  handle, and the handle imports this package);
* :mod:`.backend`: :class:`NdifBackend` (one request per trace or session, retries, accounting) and
  :class:`NdifModel` (the weightless client model);
* :mod:`.errors`: what a request can end in; :mod:`.settings`: host, key, retry policy;
* :mod:`.stats`: :data:`STATS`, requests and bytes labelled by the analysis (``STATS.scope(name)``).

Analyses never import this package: the :class:`~nnethics.models.handle.ModelHandle` decides where traces run.
"""

from .backend import NdifBackend, NdifModel, register_nnethics
from .errors import (
    NdifError,
    RemoteAuthError,
    RemoteConnectionError,
    RemoteExecutionError,
    RemoteOutOfMemoryError,
    RemoteRequestError,
    RemoteTimeoutError,
)
from .settings import ENV_BACKOFF, ENV_RETRIES, ENV_TIMEOUT, PUBLIC_HOST, RetryPolicy, resolve_host
from .stats import STATS, RemoteStats, RequestRecord

__all__ = [
    "ENV_BACKOFF",
    "ENV_RETRIES",
    "ENV_TIMEOUT",
    "PUBLIC_HOST",
    "STATS",
    "NdifBackend",
    "NdifError",
    "NdifModel",
    "RemoteAuthError",
    "RemoteConnectionError",
    "RemoteExecutionError",
    "RemoteOutOfMemoryError",
    "RemoteRequestError",
    "RemoteStats",
    "RemoteTimeoutError",
    "RequestRecord",
    "RetryPolicy",
    "register_nnethics",
    "resolve_host",
]

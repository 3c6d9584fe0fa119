"""The NDIF transport: nnsight's blocking remote backend with retries, a silence timeout, clear errors and
accounting, and the weightless client model whose remote traces go through it.

:class:`NdifBackend` sends one request per trace or session, retried with back-off when the connection drops
or the server goes silent, never retried when the traced code itself fails on the server. Each request is
counted in :data:`~nnethics.models.remote.stats.STATS` under the label of the scope it was sent in.

The traced code refers to nnethics objects (the handle, its adapter, helpers), so nnethics is
registered with ``nnsight.register`` and ships *by value*: the NDIF server does not need nnethics.
The API key comes from ``NDIF_API_KEY``; it travels only in request headers and is never printed.
"""

from __future__ import annotations

import copyreg
import json
import sys
import time
from typing import Any

from nnsight.intervention.backends.display import StatusDisplay
from nnsight.intervention.backends.remote import RemoteBackend
from nnsight.modeling.transformers import TransformersModel
from nnsight.schema.request import RequestModel
from nnsight.schema.response import ResponseModel, Status

from ..errors import ModelLoadError
from .errors import (
    NdifError,
    RemoteAuthError,
    RemoteConnectionError,
    RemoteExecutionError,
    RemoteOutOfMemoryError,
    RemoteRequestError,
    RemoteTimeoutError,
    TransientFault,
)
from .portable import portable
from .settings import ENV_RETRIES, ENV_TIMEOUT, PUBLIC_HOST, RetryPolicy, api_key, resolve_host
from .stats import STATS, RemoteStats, RequestRecord

# --- the backend --------------------------------------------------------------------------------

def register_nnethics() -> None:
    """Ship nnethics by value (source) with every request: the NDIF server does not have it installed.

    An installed package (an editable install counts) would otherwise be pickled by reference, and the
    server would fail with ``ModuleNotFoundError: No module named 'nnethics'``."""
    import nnsight

    nnsight.register("nnethics")


def _detach(value: Any) -> Any:
    """Results come back as leaves that may require grad (the server runs with autograd on); drop that."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, dict):
        return type(value)((k, _detach(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_detach(v) for v in value)
    return value


ZSTD_LEVEL = 19  # of the request payload (nnsight's default is 6)


class NdifBackend(RemoteBackend):
    """nnsight's blocking remote backend with retries, a silence timeout, clear errors and accounting."""

    def __init__(self, model_key: str, host: str, env: dict | None = None, policy: RetryPolicy | None = None,
                 stats: RemoteStats | None = None, verbose: bool = False) -> None:
        super().__init__(model_key, host=host, api_key=api_key(), env=env, blocking=True, verbose=verbose)
        self.policy = policy or RetryPolicy.from_env()
        self.stats = stats or STATS
        self.compress = True
        self.display = StatusDisplay(enabled=verbose, verbose=verbose)  # quiet: the runner draws progress

    def __call__(self, tracer: Any = None) -> Any:
        register_nnethics()
        record = self.stats.start(self.stats.current_label(), self.host)
        started = time.monotonic()
        try:
            blob = self._serialize(tracer)
            request = RequestModel(model_key=self.model_key, compress=self.compress, env=self.env)
            result = _detach(self._with_retries(request, blob, record))
            record.status = "completed"
        except BaseException:
            record.status = "failed"
            raise
        finally:
            record.seconds = time.monotonic() - started
        if isinstance(result, dict):
            self._push(result, tracer)
        return result

    def _serialize(self, tracer: Any) -> bytes:
        """nnsight's payload, compressed with zstd at level 19 instead of nnsight's 6: measured on the loopback
        server's patching-grid requests, about a tenth fewer bytes up for a few milliseconds of CPU per request (the
        server decompresses any level)."""
        from nnsight.ndif import pull_env

        pull_env()  # local modules (nnethics) ship by value, as nnsight's own _serialize does
        with portable():  # dataclasses rebuilt on the server, in its Python, not shipped as our bytecode
            blob = RequestModel.serialize(tracer, compress=False)
        if not self.compress:
            return blob
        import zstandard as zstd

        return zstd.ZstdCompressor(level=ZSTD_LEVEL).compress(blob)

    def _with_retries(self, request: RequestModel, blob: bytes, record: RequestRecord) -> Any:
        """One attempt plus up to ``policy.retries`` more after a transient fault (a dropped connection or a
        silent server), by tenacity. The wait is the policy's own ``delay`` (``backoff·2^k``, capped, ±10%
        multiplicative jitter), which tenacity's built-in waits do not offer (their jitter is additive or
        full-range); every other fault is raised at once."""
        from tenacity import Retrying, retry_if_exception_type, stop_after_attempt

        def attempt() -> Any:
            record.attempts += 1
            return self._attempt(request.model_copy(), blob, record)

        retrying = Retrying(stop=stop_after_attempt(self.policy.retries + 1),
                            wait=lambda state: self.policy.delay(state.attempt_number - 1),
                            retry=retry_if_exception_type(TransientFault), reraise=True,
                            sleep=lambda seconds: time.sleep(seconds))
        try:
            return retrying(attempt)
        except TransientFault as fault:
            last = fault
        n = self.policy.retries + 1
        if last.kind == "timeout":
            raise RemoteTimeoutError(
                f"NDIF at {self.host} sent nothing for {self.policy.timeout:g} s on each of {n} attempts "
                f"({last.detail}). The server may be overloaded or the model cold; try again later, or raise "
                f"{ENV_TIMEOUT} / {ENV_RETRIES}. Finished prompts are kept: rerun the same command to resume.",
                self.host)
        raise RemoteConnectionError(
            f"could not complete a request to NDIF at {self.host} in {n} attempts: {last}. Check the network and "
            f"the host (NDIF_HOST); finished prompts are kept: rerun the same command to resume.", self.host)

    def _attempt(self, request: RequestModel, blob: bytes, record: RequestRecord) -> Any:
        import websocket

        header = {"ndif-api-key": self.api_key} if self.api_key else None
        try:
            conn = websocket.create_connection(f"{self.ws_host}/subscribe", header=header,
                                               timeout=self.policy.connect_timeout)
        except (OSError, websocket.WebSocketException) as e:
            raise TransientFault("dropped" if not isinstance(e, TimeoutError) else "timeout", f"connect: {e}") from None
        try:
            conn.settimeout(self.policy.timeout)
            request.session_id = json.loads(self._recv(conn, record))["session_id"]
            self._post_counted(request, blob, record)
            while True:
                response = self.parse(self._recv(conn, record))
                self.display.update(response)
                self.stats.status(record, response.status.name, response.description or "")
                if response.meta is not None:
                    self.meta = response.meta
                if response.status == Status.ERROR:
                    if is_unavailable(response.description or ""):
                        raise TransientFault("unavailable", response.description)
                    raise self._execution_error(response.description)
                if response.status == Status.COMPLETED:
                    return self._result(response.data, record)
        finally:
            conn.close()

    def _recv(self, conn: Any, record: RequestRecord) -> str | bytes:
        import websocket

        try:
            message = conn.recv()
        except websocket.WebSocketTimeoutException:
            raise TransientFault("timeout", f"no reply within {self.policy.timeout:g} s") from None
        except (OSError, websocket.WebSocketException) as e:
            raise TransientFault("dropped", f"connection lost: {type(e).__name__}: {e}") from None
        if not message:
            raise TransientFault("dropped", "the server closed the connection mid-request")
        record.bytes_received += len(message)
        return message

    def _post_counted(self, request: RequestModel, blob: bytes, record: RequestRecord) -> ResponseModel:
        import httpx
        from nnsight.intervention.backends.remote import _NNSIGHT_VERSION

        headers = {"ndif-timestamp": repr(time.time()), "nnsight-version": _NNSIGHT_VERSION,
                   "python-version": sys.version}
        if self.api_key:
            headers["ndif-api-key"] = self.api_key
        meta = request.metadata()
        record.bytes_sent += len(blob) + len(meta)
        timeout = httpx.Timeout(self.policy.connect_timeout, read=self.policy.timeout)
        try:
            with httpx.Client(timeout=timeout) as client:
                reply = client.post(f"{self.host}/request", data={"data": meta},
                                    files={"blob": ("request", blob, "application/octet-stream")}, headers=headers)
        except httpx.TimeoutException as e:
            raise TransientFault("timeout", f"sending the request: {e}") from None
        except httpx.TransportError as e:
            raise TransientFault("dropped", f"sending the request: {e}") from None
        record.bytes_received += len(reply.content)
        if reply.status_code >= 400:
            detail = _detail(reply)
            if reply.status_code in (401, 403):
                raise RemoteAuthError(f"NDIF at {self.host} rejected the API key ({reply.status_code}: {detail}); "
                                      "set NDIF_API_KEY to a valid key", self.host)
            if reply.status_code in (408, 425, 429, 500, 502, 503, 504):
                raise TransientFault("unavailable", f"HTTP {reply.status_code}: {detail}")
            raise RemoteRequestError(f"NDIF at {self.host} refused the request (HTTP {reply.status_code}): {detail}",
                                     self.host)
        response = ResponseModel.model_validate_json(reply.text)
        if response.status == Status.ERROR:
            raise RemoteRequestError(f"NDIF at {self.host} refused the request: {response.description}", self.host,
                                     detail=response.description or "")
        return response

    def _result(self, data: Any, record: RequestRecord) -> Any:
        if isinstance(data, (bytes, bytearray)):
            record.result_bytes += len(data)
            return self.finalize(bytes(data))
        if not data:
            return {}
        import httpx

        try:
            with httpx.Client(timeout=httpx.Timeout(self.policy.connect_timeout, read=self.policy.timeout)) as c:
                reply = c.get(str(data))
                reply.raise_for_status()
        except httpx.TimeoutException as e:
            raise TransientFault("timeout", f"downloading the result: {e}") from None
        except httpx.HTTPError as e:
            raise TransientFault("dropped", f"downloading the result: {e}") from None
        record.bytes_received += len(reply.content)
        record.result_bytes += len(reply.content)
        return self.finalize(reply.content)

    def _execution_error(self, description: str) -> NdifError:
        if description.strip().startswith(NOT_STARTED):
            return RemoteRequestError(
                f"NDIF at {self.host} could not start the model {_repo(self.model_key)} (is it served there? NDIF's "
                f"status lists what is): {description.strip()}", self.host, detail=description)
        if "out of memory" in description.lower():
            return RemoteOutOfMemoryError(
                f"NDIF at {self.host} ran out of memory on this batch (the runner halves it): {description}", self.host,
                detail=description)
        return RemoteExecutionError(
            f"NDIF at {self.host} ran the request, but the code inside the trace failed there:\n{description}\n"
            "This is a bug in the traced code (or a model it does not support), not a network fault, so it was "
            "not retried. Prompts finished before it are kept.", self.host, detail=description)


UNAVAILABLE = ("Error submitting request to model deployment.",)
"""ERROR descriptions that mean the server could not reach the model, not that the request failed: NDIF (``ndif``
0.1.2, ``services/api/queue/replica.py``) answers so when the model's actor is gone (it died, or was killed while
the request ran; Ray restarts it). Retried like a dropped connection."""


NOT_STARTED = ("Error provisioning model.", "Error starting model.", "Could not deploy this model.")
"""ERROR descriptions of NDIF (``ndif`` 0.1.2, ``services/api/queue/processor.py``) when the model could not be
deployed for the request (not served, or its deployment failed; a model that is not deployed ahead fails there
with ``describe_checkpoint() got an unexpected keyword argument 'trust_remote_code'`` against nnsight 0.8.1): the
request is refused, nothing ran."""


def _repo(model_key: str) -> str:
    try:
        return json.loads(model_key.split(":", 1)[1]).get("repo_id") or model_key
    except (IndexError, ValueError, AttributeError):
        return model_key


def is_unavailable(description: str) -> bool:
    return description.strip().startswith(UNAVAILABLE)


def _detail(reply: Any) -> str:
    try:
        body = reply.json()
        return str(body.get("detail", body) if isinstance(body, dict) else body)
    except ValueError:
        return reply.text or reply.reason_phrase


class _PortableRemoteBackend(RemoteBackend):
    """nnsight's own backend (non-blocking submit, then poll), serialising with :func:`portable` as ours does."""

    def __call__(self, tracer: Any = None) -> Any:
        with portable():
            return super().__call__(tracer)


# --- the weightless client model ----------------------------------------------------------------

class NdifModel(TransformersModel):
    """A meta (weightless) ``TransformersModel`` whose remote calls go through :class:`NdifBackend`.

    It is keyed, and pickled, as a plain ``TransformersModel``, so the server needs nothing from
    nnethics to resolve it; its local settings (host, retry policy) and the config it was built from stay here.
    """

    _ndif_host: str = PUBLIC_HOST
    _ndif_policy: RetryPolicy | None = None

    def _remoteable_class(self) -> type:
        return TransformersModel

    def _remote_backend(self, remote: bool | str, blocking: bool, job_id: str | None, verbose: bool) -> Any:
        if remote == "local":
            return super()._remote_backend(remote, blocking, job_id, verbose)
        host = resolve_host(remote) if isinstance(remote, str) else self._ndif_host
        if not blocking:  # submit now, poll later: nnsight's own backend (no retries, not counted)
            register_nnethics()
            backend = _PortableRemoteBackend(self.to_model_key(), host=host, api_key=api_key(),
                                             env=self._remoteable_get_env(), blocking=False, job_id=job_id,
                                             verbose=verbose)
            backend.display = StatusDisplay(enabled=verbose, verbose=verbose)
            return backend
        return NdifBackend(self.to_model_key(), host, env=self._remoteable_get_env(), policy=self._ndif_policy,
                           verbose=verbose)

    def dispatch(self, *args: Any, **kwargs: Any) -> None:
        raise ModelLoadError(
            "this model runs on NDIF and has no local weights: run traces through the ModelHandle "
            "(handle.trace(...), handle.session(fn, ...)) or pass remote=handle.remote to lm.trace / lm.session")

    def __reduce_ex__(self, protocol: int) -> tuple:
        state = {k: v for k, v in self.__getstate__().items() if not k.startswith("_ndif")}
        state["kwargs"] = {k: v for k, v in (state.get("kwargs") or {}).items() if k not in ("token", "config")}
        return (copyreg._reconstructor, (TransformersModel, object, None), state)

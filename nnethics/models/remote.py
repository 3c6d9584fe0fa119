"""Run nnethics on NDIF: a weightless local model, requests with bounded retries, and request accounting.

``load_remote_model(spec, remote=True)`` fetches only the config and the tokenizer, builds nnsight's
meta (weightless) model with nnethics' ``rename=`` aliases, and returns a :class:`ModelHandle` whose
``remote`` is ``True`` (the host from ``NDIF_HOST`` or nnsight's config) or a server URL. Every
``handle.trace(...)`` (and ``handle.lm.session(remote=handle.remote)``) then goes through
:class:`NdifBackend`: one request per trace or session, retried with back-off when the connection drops
or the server goes silent, never retried when the traced code itself fails on the server. Each request
is counted in :data:`STATS` (requests, attempts, bytes each way), labelled by the analysis module that
opened the trace.

The traced code refers to nnethics objects (the handle, its adapter, helpers), so nnethics is
registered with ``nnsight.register`` and ships *by value*: the NDIF server does not need nnethics.
The API key comes from ``NDIF_API_KEY``; it travels only in request headers and is never printed.
"""

from __future__ import annotations

import copyreg
import json
import os
import random
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnsight.intervention.backends.display import StatusDisplay
from nnsight.intervention.backends.remote import RemoteBackend, RemoteError
from nnsight.modeling.transformers import TransformersModel
from nnsight.schema.config import CONFIG
from nnsight.schema.request import RequestModel
from nnsight.schema.response import ResponseModel, Status

from .adapters import UnsupportedArchitectureError, adapter_for, get_path
from .loading import ModelHandle, ModelLoadError
from .secrets import redact

PUBLIC_HOST = "https://api.ndif.us"
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


def resolve_host(remote: bool | str) -> str:
    """The server for ``remote``: a URL as given, else ``NDIF_HOST`` (read now, not at import), else nnsight's config."""
    host = remote if isinstance(remote, str) else (os.environ.get("NDIF_HOST") or CONFIG.API.HOST)
    host = host.rstrip("/")
    if not host.startswith(("http://", "https://")):
        raise ModelLoadError(f"NDIF host {host!r} must start with http:// or https://")
    return host


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


class NdifBackend(RemoteBackend):
    """nnsight's blocking remote backend with retries, a silence timeout, clear errors and accounting."""

    def __init__(self, model_key: str, host: str, env: dict | None = None, policy: RetryPolicy | None = None,
                 stats: RemoteStats | None = None, verbose: bool = False) -> None:
        super().__init__(model_key, host=host, api_key=_api_key(), env=env, blocking=True, verbose=verbose)
        self.policy = policy or RetryPolicy.from_env()
        self.stats = stats or STATS
        self.compress = True
        self.display = StatusDisplay(enabled=verbose, verbose=verbose)  # quiet: the runner draws progress

    def __call__(self, tracer: Any = None) -> Any:
        register_nnethics()
        record = self.stats.start(self.stats.label_for(tracer), self.host)
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

    def _with_retries(self, request: RequestModel, blob: bytes, record: RequestRecord) -> Any:
        last: _Transient | None = None
        for attempt in range(self.policy.retries + 1):
            if attempt:
                time.sleep(self.policy.delay(attempt - 1))
            record.attempts += 1
            try:
                return self._attempt(request.model_copy(), blob, record)
            except _Transient as fault:
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
            raise _Transient("dropped" if not isinstance(e, TimeoutError) else "timeout", f"connect: {e}") from None
        try:
            conn.settimeout(self.policy.timeout)
            request.session_id = json.loads(self._recv(conn, record))["session_id"]
            self._post_counted(request, blob, record)
            while True:
                response = self.parse(self._recv(conn, record))
                self.display.update(response)
                if response.meta is not None:
                    self.meta = response.meta
                if response.status == Status.ERROR:
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
            raise _Transient("timeout", f"no reply within {self.policy.timeout:g} s") from None
        except (OSError, websocket.WebSocketException) as e:
            raise _Transient("dropped", f"connection lost: {type(e).__name__}: {e}") from None
        if not message:
            raise _Transient("dropped", "the server closed the connection mid-request")
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
            raise _Transient("timeout", f"sending the request: {e}") from None
        except httpx.TransportError as e:
            raise _Transient("dropped", f"sending the request: {e}") from None
        record.bytes_received += len(reply.content)
        if reply.status_code >= 400:
            detail = _detail(reply)
            if reply.status_code in (401, 403):
                raise RemoteAuthError(f"NDIF at {self.host} rejected the API key ({reply.status_code}: {detail}); "
                                      "set NDIF_API_KEY to a valid key", self.host)
            if reply.status_code in (408, 425, 429, 500, 502, 503, 504):
                raise _Transient("unavailable", f"HTTP {reply.status_code}: {detail}")
            raise RemoteRequestError(f"NDIF at {self.host} refused the request (HTTP {reply.status_code}): {detail}",
                                     self.host)
        response = ResponseModel.model_validate_json(reply.text)
        if response.status == Status.ERROR:
            raise RemoteRequestError(f"NDIF at {self.host} refused the request: {response.description}", self.host)
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
            raise _Transient("timeout", f"downloading the result: {e}") from None
        except httpx.HTTPError as e:
            raise _Transient("dropped", f"downloading the result: {e}") from None
        record.bytes_received += len(reply.content)
        record.result_bytes += len(reply.content)
        return self.finalize(reply.content)

    def _execution_error(self, description: str) -> NdifError:
        if "out of memory" in description.lower():
            return RemoteOutOfMemoryError(
                f"NDIF at {self.host} ran out of memory on this batch (the runner halves it): {description}", self.host)
        return RemoteExecutionError(
            f"NDIF at {self.host} ran the request, but the code inside the trace failed there:\n{description}\n"
            "This is a bug in the traced code (or a model it does not support), not a network fault, so it was "
            "not retried. Prompts finished before it are kept.", self.host)


def _detail(reply: Any) -> str:
    try:
        body = reply.json()
        return str(body.get("detail", body) if isinstance(body, dict) else body)
    except ValueError:
        return reply.text or reply.reason_phrase


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
        if remote == "local" or not blocking:
            return super()._remote_backend(remote, blocking, job_id, verbose)
        host = resolve_host(remote) if isinstance(remote, str) else self._ndif_host
        return NdifBackend(self.to_model_key(), host, env=self._remoteable_get_env(), policy=self._ndif_policy,
                           verbose=verbose)

    def dispatch(self, *args: Any, **kwargs: Any) -> None:
        raise ModelLoadError(
            "this model runs on NDIF and has no local weights: run traces through the ModelHandle "
            "(handle.trace(...)) or pass remote=handle.remote to lm.trace / lm.session")

    def __reduce_ex__(self, protocol: int) -> tuple:
        state = {k: v for k, v in self.__getstate__().items() if not k.startswith("_ndif")}
        state["kwargs"] = {k: v for k, v in (state.get("kwargs") or {}).items() if k not in ("token", "config")}
        return (copyreg._reconstructor, (TransformersModel, object, None), state)


def _fetch(spec: str, revision: str | None, token: str | None) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(spec, revision=revision, token=token)
        tokenizer = AutoTokenizer.from_pretrained(spec, revision=revision, token=token)
    except (OSError, ValueError) as e:
        raise ModelLoadError(redact(
            f"could not fetch the config and tokenizer of {spec!r} for a remote run (is the hub reachable, and "
            f"is HF_TOKEN set for gated models?): {e}", token)) from None
    return config, tokenizer


def _repo_id(spec: str, revision: str | None, token: str | None) -> str:
    """The hub id NDIF knows the model by (canonical spelling); cached in nnsight's ``_ID_CACHE``."""
    from nnsight.modeling.huggingface import _ID_CACHE

    if spec in _ID_CACHE:
        return _ID_CACHE[spec]
    if Path(spec).expanduser().exists():
        raise ModelLoadError(
            f"{spec} is a local path; NDIF runs models by hub id, so pass --model org/name with --remote "
            "(e.g. meta-llama/Llama-3.1-70B-Instruct)")
    try:
        from huggingface_hub import HfApi

        _ID_CACHE[spec] = HfApi(token=token).model_info(spec, revision=revision).id
    except Exception:  # noqa: BLE001 - offline or hub trouble: the id as given is the best we have
        _ID_CACHE[spec] = spec
    return _ID_CACHE[spec]


def _check_paths(handle: ModelHandle) -> None:
    """The uniform paths exist on the meta model (a forward check would need the weights)."""
    lm = handle.lm
    try:
        if len(lm.model.layers) != handle.n_layers:
            raise AttributeError(f"model.layers has {len(lm.model.layers)} entries, config says {handle.n_layers}")
        for i in sorted({0, handle.n_layers - 1}):
            for path in (handle.adapter.attn_out, handle.adapter.mlp_out, handle.adapter.o_proj):
                get_path(handle.layer(i), path)
        for env in (lm.model.embed_tokens, lm.model.norm, lm.lm_head):
            env.path  # noqa: B018 - raises if the alias is missing
    except (AttributeError, IndexError) as e:
        raise UnsupportedArchitectureError(f"{handle.adapter.family} adapter does not fit {handle.name}: {e}") from None


def load_remote_model(spec: str, revision: str | None = None, token: str | None = None,
                      remote: bool | str = True) -> ModelHandle:
    """A handle on ``spec`` (a hub id) that runs every trace on NDIF; only config and tokenizer are fetched.

    ``remote`` is ``True`` (host from ``NDIF_HOST`` or nnsight's config) or a server URL. The key is read
    from ``NDIF_API_KEY`` when a request is sent. ``handle.device`` is ``"ndif"``; ``handle.dtype`` is the
    checkpoint's dtype from its config.
    """
    host = resolve_host(remote)
    if host == PUBLIC_HOST and not _api_key():
        raise ModelLoadError("remote runs on NDIF need an API key: set NDIF_API_KEY (get one at https://login.ndif.us)")
    policy = RetryPolicy.from_env()
    config, tokenizer = _fetch(spec, revision, token)
    adapter = adapter_for(config)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    name = _repo_id(spec, revision, token)
    # tokenizer= works around nnsight 0.8.1 x transformers 5 (a meta build otherwise finds no tokenizer)
    lm = NdifModel(spec, tokenizer=tokenizer, config=config, revision=revision, task="text-generation",
                   rename=dict(adapter.rename))
    object.__setattr__(lm, "_ndif_host", host)
    object.__setattr__(lm, "_ndif_policy", policy)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    handle = ModelHandle(lm=lm, tokenizer=lm.tokenizer, adapter=adapter, name=name, revision=revision,
                         dtype=str(dtype).removeprefix("torch."), device="ndif",
                         remote=True if remote is True else host, source=f"ndif:{host}")
    _check_paths(handle)
    register_nnethics()
    return handle

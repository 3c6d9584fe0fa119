"""A loopback imitation of NDIF for tests: nnsight's remote protocol on 127.0.0.1, run against local models.

**The real server is tested too** (``make test-ndif``: the ``ndif`` package, tests/ndif_real.py). This imitation
stays for what the real server cannot do or does not say: fault injection (a dropped socket, a silent server, an
ERROR on the n-th request), API-key rejection (without Postgres the real server accepts any key), byte counters on
the server's side, and the default test run on machines without the server's Python 3.12. Every test of
tests/test_remote.py that needs none of these runs against both.

It speaks what ``nnsight.intervention.backends.remote.RemoteBackend`` expects:

* ``GET /subscribe`` (websocket): the first message is ``{"session_id": ...}``; then ``ResponseModel`` JSON
  text frames (QUEUED, RUNNING, ERROR) and, on COMPLETED, a binary frame (``ResponseModel.pickle()``)
  carrying the zstd-compressed ``torch.save`` of the saved values, or a URL when the result is large.
* ``POST /request`` (multipart: form field ``data`` = ``RequestModel`` JSON, file ``blob`` = payload),
  answered with a RECEIVED ``ResponseModel``; ``GET /response/{id}`` (non-blocking polls; 404 until
  there is a status); ``GET /result/{id}`` (large results).

Requests run with nnsight's own deserialisation (``RequestModel.deserialize``) on ONE worker thread
(greenlets are bound to a thread; nnsight's save set and depth are thread-local), with autograd on and
frozen weights like NDIF (a trace that wants gradients marks an activation ``requires_grad``), and with ``nnsight.tracing.globals.SOURCES/BLOCKS`` cleared for the client's file around each
request (nested ``with`` blocks are re-read from linecache under the client's filename).

Like the real NDIF, the server does not have nnethics: its unpickler refuses every class, function or
module of a blocked package (``blocked``, default ``nnethics``), so client code must ship by value
(``nnsight.register``). Run as a subprocess (:class:`ServerProcess`) the package is also unimportable.

Fault switches for tests (``inject`` in-process, ``POST /_control`` otherwise): ``error`` (answer ERROR
without running), ``drop`` (cut the websocket after RUNNING), ``delay`` (say nothing for ``seconds``
before running; the job is abandoned if the client has gone by then). Each applies to ``times``
requests after letting ``after`` requests through. ``GET /_stats`` returns the counters.

Bounded: 127.0.0.1 only, 64 MB request bodies, 16 pending jobs, the last 64 statuses and 16 large
results kept, and (as a subprocess) a lifetime of ``--max-seconds``.

    python tests/ndif_server.py --model org/tiny=/path/to/folder [--api-key KEY] [--max-seconds 900]

prints ``URL http://127.0.0.1:PORT`` once it listens. This file imports nothing from nnethics.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.abc
import io
import json
import linecache
import os
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tornado.web
import tornado.websocket

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_BODY = 64 << 20
MAX_PENDING = 16
INLINE_LIMIT = 1 << 20
KEEP_STATUSES, KEEP_RESULTS = 64, 16
FAULTS = ("error", "drop", "delay")


# --- the server's (missing) packages ------------------------------------------------------------

def _refuse(module: str, blocked: tuple[str, ...]) -> None:
    if module.split(".")[0] in blocked:
        raise ModuleNotFoundError(f"No module named {module!r} (it is not installed on this NDIF server)",
                                  name=module)


def make_unpickler(blocked: tuple[str, ...]) -> type:
    """nnsight's unpickler, refusing anything pickled by reference from a ``blocked`` package."""
    import cloudpickle.cloudpickle as cp
    from nnsight.intervention.serialization import CustomCloudUnpickler

    def subimport(name: str) -> Any:
        _refuse(name, blocked)
        return cp.subimport(name)

    class ServerUnpickler(CustomCloudUnpickler):
        def find_class(self, module: str, name: str) -> Any:
            _refuse(module, blocked)
            found = super().find_class(module, name)
            return subimport if found is cp.subimport else found

    return ServerUnpickler


class _Blocker(importlib.abc.MetaPathFinder):
    def __init__(self, blocked: tuple[str, ...]) -> None:
        self.blocked = blocked

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        _refuse(fullname, self.blocked)
        return None


def hide_packages(blocked: tuple[str, ...]) -> None:
    """Make ``blocked`` packages unimportable in this process (subprocess mode)."""
    sys.meta_path.insert(0, _Blocker(blocked))
    for name in list(sys.modules):
        if name.split(".")[0] in blocked:
            del sys.modules[name]


# --- jobs ----------------------------------------------------------------------------------------

@dataclass
class Job:
    id: str
    repo: str
    blob: bytes
    compress: bool
    env: dict
    session_id: str
    received: float = field(default_factory=time.monotonic)


def _repo_of(model_key: str) -> str:
    try:
        return str(json.loads(model_key.split(":", 1)[1])["repo_id"])
    except (IndexError, KeyError, ValueError):
        return ""


def load_served_model(folder: str | Path) -> Any:
    """A local model folder as the server runs it: float32, eval, wrapped with native paths (no aliases)."""
    import nnsight
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    # Like NDIF: autograd is on, but the weights do not require grad, so a forward builds no graph
    # unless the trace asks for one (requires_grad_ on an activation) -- see nnsight issue #251.
    hf.requires_grad_(False)
    return nnsight.TransformersModel(hf, tokenizer=tok, task="text-generation")


class NdifServer:
    """The server; ``start()`` runs it on a background thread and returns its URL."""

    def __init__(self, models: dict[str, Any], api_key: str | None = None, host: str = "127.0.0.1", port: int = 0,
                 blocked: tuple[str, ...] = ("nnethics",), inline_limit: int = INLINE_LIMIT) -> None:
        if host not in LOOPBACK:
            raise ValueError(f"the test server listens on loopback only, not {host!r}")
        self.models = {repo: (m if hasattr(m, "_remoteable_persistent_objects") else load_served_model(m))
                       for repo, m in models.items()}
        self.persistent = {repo: m._remoteable_persistent_objects() for repo, m in self.models.items()}
        self.api_key, self.host, self.port = api_key, host, port
        self.unpickler = make_unpickler(tuple(blocked))
        self.inline_limit = inline_limit
        self.sockets: dict[str, Any] = {}
        self.statuses: OrderedDict[str, str] = OrderedDict()
        self.results: OrderedDict[str, bytes] = OrderedDict()
        self.faults: list[dict] = []
        self.pending = 0
        self.stats = {k: 0 for k in ("requests", "completed", "errors", "dropped", "delayed", "abandoned",
                                     "rejected", "bytes_in", "bytes_out")}
        self.stats["nnethics_importable"] = _importable("nnethics")
        self.last_error = ""
        self._lock = threading.Lock()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ndif-worker")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.url = ""
        self._thread: threading.Thread | None = None
        self._server: Any = None

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> str:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="ndif-loop", daemon=True)
        self._thread.start()
        if not ready.wait(30) or not self.url:
            raise RuntimeError("the loopback NDIF server did not start")
        return self.url

    def _serve(self, ready: threading.Event) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        app = tornado.web.Application([
            (r"/subscribe", _Subscribe), (r"/request", _Request), (r"/response/([\w-]+)", _Response),
            (r"/result/([\w-]+)", _Result), (r"/_control", _Control), (r"/_stats", _Stats),
        ], srv=self)
        self._server = app.listen(self.port, address=self.host, max_body_size=MAX_BODY)
        port = next(iter(self._server._sockets.values())).getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        ready.set()
        self.loop.run_forever()
        self.loop.close()

    def stop(self) -> None:
        if self.loop is not None and self.loop.is_running():
            def shutdown() -> None:
                self._server.stop()
                for ws in list(self.sockets.values()):
                    ws.close()
                self.loop.stop()
            self.loop.call_soon_threadsafe(shutdown)
        if self._thread is not None:
            self._thread.join(10)
        self.executor.shutdown(wait=False, cancel_futures=True)

    # -- faults -------------------------------------------------------------------------------------
    def inject(self, fault: str, times: int = 1, after: int = 0, seconds: float = 0.0) -> None:
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; use one of {FAULTS}")
        with self._lock:
            self.faults.append({"fault": fault, "times": int(times), "after": int(after), "seconds": float(seconds)})

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def _take_fault(self) -> dict | None:
        with self._lock:
            for f in self.faults:
                if f["after"] > 0:
                    f["after"] -= 1
                    return None
                if f["times"] > 0:
                    f["times"] -= 1
                    return dict(f)
            return None

    def snapshot(self) -> dict:
        with self._lock:
            return {**self.stats, "pending": self.pending, "last_error": self.last_error}

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    # -- job flow (on the event loop) ----------------------------------------------------------------
    def schedule(self, job: Job) -> None:
        fault = self._take_fault()
        self.pending += 1
        self._status(job, "QUEUED", f"Added to Queue at position {self.pending}.")  # the real server's words
        if fault and fault["fault"] == "delay":
            self.count("delayed")
            self.loop.call_later(fault["seconds"], self._dispatch, job, None)
            return
        self._dispatch(job, fault)

    def _dispatch(self, job: Job, fault: dict | None) -> None:
        if job.session_id and job.session_id not in self.sockets:
            self.pending -= 1
            self.count("abandoned")  # the client gave up (timed out) before the job ran
            return
        self._status(job, "RUNNING")
        if fault and fault["fault"] == "error":
            self.pending -= 1
            self.count("errors")
            self._status(job, "ERROR", "InjectedFault: the loopback server was told to fail this request")
            return
        if fault and fault["fault"] == "drop":
            self.pending -= 1
            self.count("dropped")
            ws = self.sockets.pop(job.session_id, None)
            if ws is not None and ws.ws_connection is not None:
                ws.ws_connection.stream.close()  # abrupt: no close frame, like a network drop
            return
        future = self.executor.submit(self._execute, job)
        future.add_done_callback(lambda f: self.loop.call_soon_threadsafe(self._finish, job, f))

    def _finish(self, job: Job, future: Future) -> None:
        self.pending -= 1
        error = future.exception()
        if error is not None:
            self.count("errors")
            text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            self.last_error = text
            self._status(job, "ERROR", text)
            return
        data = future.result()
        self.count("completed")
        if job.session_id and len(data) <= self.inline_limit:
            from nnsight.schema.response import ResponseModel

            frame = ResponseModel(id=job.id, status="COMPLETED", description="done", data=data).pickle()
            self._send(job, frame)
            return
        self.results[job.id] = data
        while len(self.results) > KEEP_RESULTS:
            self.results.popitem(last=False)
        self._status(job, "COMPLETED", "done", data=f"{self.url}/result/{job.id}")

    def _status(self, job: Job, status: str, description: str = "", data: Any = None) -> None:
        from nnsight.schema.response import ResponseModel

        text = ResponseModel(id=job.id, status=status, description=description, data=data).model_dump_json()
        self.statuses[job.id] = text
        while len(self.statuses) > KEEP_STATUSES:
            self.statuses.popitem(last=False)
        self._send(job, text)

    def _send(self, job: Job, message: str | bytes) -> None:
        ws = self.sockets.get(job.session_id) if job.session_id else None
        if ws is None:
            return
        try:
            ws.write_message(message, binary=isinstance(message, bytes))
            self.count("bytes_out", len(message))
        except tornado.websocket.WebSocketClosedError:
            self.sockets.pop(job.session_id, None)

    # -- execution (on the single worker thread) ------------------------------------------------------
    def _execute(self, job: Job) -> bytes:
        import torch
        from nnsight.schema.request import RequestModel
        from nnsight.tracing import globals as G
        from nnsight.tracing import tracer as T

        model = self.models[job.repo]
        model._remoteable_set_env(job.env)
        lines = dict(linecache.cache)
        tracer = RequestModel.deserialize(job.blob, self.persistent[job.repo], compress=job.compress,
                                          unpickler=self.unpickler)
        filename = tracer.info.frame.f_code.co_filename
        # Nested blocks are re-read under the client's filename: drop what an earlier request cached for it
        # (and put back whatever this process had, in case client and server share it).
        sources = G.SOURCES.pop(filename, None)
        blocks = {k: G.BLOCKS.pop(k) for k in [k for k in G.BLOCKS if k[0] == filename]}
        T.inc()
        try:
            with torch.enable_grad():
                tracer.execute(tracer.info.code)
            result = {k: v for k, v in tracer.info.frame.f_locals.items() if id(v) in T._saves()}
        finally:
            T.dec()
            G.SOURCES.pop(filename, None)
            for k in [k for k in G.BLOCKS if k[0] == filename]:
                del G.BLOCKS[k]
            if sources is not None:
                G.SOURCES[filename] = sources
            G.BLOCKS.update(blocks)
            if filename in lines:
                linecache.cache[filename] = lines[filename]
            else:
                linecache.cache.pop(filename, None)
        buf = io.BytesIO()
        torch.save(result, buf, pickle_protocol=4)
        data = buf.getvalue()
        if job.compress:
            import zstandard

            data = zstandard.ZstdCompressor(level=6).compress(data)
        return data


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


# --- HTTP handlers -------------------------------------------------------------------------------

class _Base(tornado.web.RequestHandler):
    @property
    def srv(self) -> NdifServer:
        return self.application.settings["srv"]

    def fail(self, code: int, detail: str) -> None:
        self.set_status(code)
        self.finish({"detail": detail})


class _Subscribe(tornado.websocket.WebSocketHandler):
    def check_origin(self, origin: str) -> bool:
        return True

    def open(self) -> None:
        srv: NdifServer = self.application.settings["srv"]
        self.sid = uuid.uuid4().hex
        srv.sockets[self.sid] = self
        self.write_message(json.dumps({"session_id": self.sid}))

    def on_close(self) -> None:
        self.application.settings["srv"].sockets.pop(getattr(self, "sid", ""), None)


class _Request(_Base):
    def post(self) -> None:
        from nnsight.schema.request import RequestModel
        from nnsight.schema.response import ResponseModel

        srv = self.srv
        if srv.api_key and self.request.headers.get("ndif-api-key") != srv.api_key:
            srv.count("rejected")
            return self.fail(401, "invalid or missing API key")
        try:
            meta = self.get_body_argument("data")
            request = RequestModel.model_validate_json(meta)
            blob = self.request.files["blob"][0]["body"]
        except Exception as e:  # noqa: BLE001 - any malformed request is a 400
            srv.count("rejected")
            return self.fail(400, f"malformed request: {type(e).__name__}: {e}")
        repo = _repo_of(request.model_key)
        if repo not in srv.models:
            srv.count("rejected")
            return self.fail(404, f"model {repo or request.model_key!r} is not deployed on this server "
                                  f"(deployed: {sorted(srv.models)})")
        if srv.pending >= MAX_PENDING:
            srv.count("rejected")
            return self.fail(503, "too many pending requests; try again later")
        srv.count("requests")
        srv.count("bytes_in", len(blob) + len(meta))
        job = Job(id=uuid.uuid4().hex, repo=repo, blob=blob, compress=request.compress, env=request.env,
                  session_id=request.session_id)
        self.finish(ResponseModel(id=job.id, status="RECEIVED", description="received").model_dump_json())
        srv.schedule(job)


class _Response(_Base):
    def get(self, job_id: str) -> None:
        text = self.srv.statuses.get(job_id)
        if text is None:
            return self.fail(404, "no status yet")
        self.finish(text)


class _Result(_Base):
    def get(self, job_id: str) -> None:
        data = self.srv.results.get(job_id)
        if data is None:
            return self.fail(404, "no such result")
        self.srv.count("bytes_out", len(data))
        self.set_header("Content-Type", "application/octet-stream")
        self.finish(data)


class _Control(_Base):
    def post(self) -> None:
        body = json.loads(self.request.body or b"{}")
        if body.get("clear"):
            self.srv.clear_faults()
        if body.get("fault"):
            try:
                self.srv.inject(body["fault"], body.get("times", 1), body.get("after", 0), body.get("seconds", 0.0))
            except ValueError as e:
                return self.fail(400, str(e))
        self.finish({"faults": self.srv.faults})


class _Stats(_Base):
    def get(self) -> None:
        self.finish(self.srv.snapshot())


# --- subprocess mode -----------------------------------------------------------------------------

class ServerProcess:
    """Run the server in a child process (nnethics unimportable there); talk to it over HTTP."""

    def __init__(self, models: dict[str, str | Path], api_key: str | None = None, max_seconds: float = 900,
                 log: str | Path | None = None, startup_timeout: float = 180) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--max-seconds", str(max_seconds)]
        for repo, folder in models.items():
            cmd += ["--model", f"{repo}={folder}"]
        env = dict(os.environ)
        if api_key:
            env["LOOPBACK_NDIF_KEY"] = api_key  # not on the command line
        self._log = open(log or os.devnull, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env,
                                     cwd=str(Path(__file__).resolve().parent))
        self.url = ""
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith("URL "):
                self.url = line.split()[1]
                break
        if not self.url:
            self.stop()
            raise RuntimeError(f"the loopback NDIF server did not start (see {log})")

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        import httpx

        r = httpx.request(method, f"{self.url}{path}", json=body, timeout=30)
        r.raise_for_status()
        return r.json()

    def inject(self, fault: str, times: int = 1, after: int = 0, seconds: float = 0.0) -> None:
        self._call("POST", "/_control", {"fault": fault, "times": times, "after": after, "seconds": seconds})

    def clear_faults(self) -> None:
        self._call("POST", "/_control", {"clear": True})

    def snapshot(self) -> dict:
        return self._call("GET", "/_stats")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="REPO_ID=FOLDER (repeatable)")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=900.0, help="exit after this long")
    ap.add_argument("--allow", action="store_true", help="do not hide nnethics (by default it is unimportable)")
    args = ap.parse_args(argv)
    if not args.allow:
        hide_packages(("nnethics",))
    models = dict(m.split("=", 1) for m in args.model)
    server = NdifServer(models, api_key=os.environ.get("LOOPBACK_NDIF_KEY") or None, port=args.port)
    url = server.start()
    print(f"URL {url}", flush=True)
    try:
        time.sleep(args.max_seconds)
    except KeyboardInterrupt:
        pass
    server.stop()


if __name__ == "__main__":
    main()

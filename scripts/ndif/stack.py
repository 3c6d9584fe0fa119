"""Stand up the real NDIF server (the ``ndif`` package from PyPI) on this machine, on loopback, and tear it down.

    python scripts/ndif/stack.py install                      # the server's own venv, once per machine (cached)
    python scripts/ndif/stack.py up --model org/name=/folder  # start it, deploy the models, print the URL; Ctrl-C stops

The whole stack is the one the users' server runs: the FastAPI/gunicorn API (the queue dispatcher inside it), redis,
Ray with NDIF's controller and model actors, and an S3 object store for results over 8 MiB (``moto_server``). On a
machine without a GPU two settings get it going (``ndif`` 0.1.2): a Ray resource override that pretends one GPU,
and :mod:`cpu_actor`, a model actor that loads on the CPU. Models are deployed ahead by exact model key (on-demand
deployment fails with nnsight 0.8.1) from a Hugging Face cache laid out under the stack's folder, offline.

Ray binds the machine's own interface address whatever it is told, so tests run the stack and the client inside a
private network namespace (``make test-ndif`` does ``unshare --net``). Nothing here imports nnethics or ndif: the
services run in the server's venv; this file only drives them (stdlib only, so the project's venv can run it).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "requirements.txt"
PYTHONS = ("3.12", "3.13")
PORTS = {"redis": 6379, "s3": 9000, "ray": 6385, "ray_client": 10001, "dashboard": 8265, "api": 8001}
ENVOY = "nnsight.modeling.transformers.TransformersModel"


def model_key(repo_id: str) -> str:
    """The key the client sends for a hub id (``TransformersModel.to_model_key``); the server must be deployed
    under exactly this string."""
    return ENVOY + ":" + json.dumps({"repo_id": repo_id, "revision": None, "task": "text-generation"})


# --- install -----------------------------------------------------------------------------------------------------

def cache_root() -> Path:
    base = os.environ.get("NNETHICS_NDIF_SERVER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nnethics", "ndif-server")
    return Path(base)


def find_python() -> str:
    """A Python the server supports (>= 3.12, < 3.14) that runs: ``NNETHICS_NDIF_PYTHON``, else pyenv's, else on PATH
    (a pyenv shim on PATH may name a version that is not selected, so each candidate is tried)."""
    if os.environ.get("NNETHICS_NDIF_PYTHON"):
        return os.environ["NNETHICS_NDIF_PYTHON"]
    pyenv = Path(os.environ.get("PYENV_ROOT", "/root/.pyenv")) / "versions"
    candidates = [str(c / "bin" / "python") for v in PYTHONS for c in sorted(pyenv.glob(f"{v}.*"), reverse=True)]
    candidates += [found for v in PYTHONS if (found := shutil.which(f"python{v}"))]
    check = "import sys; sys.exit(not (3, 12) <= sys.version_info[:2] < (3, 14))"
    for candidate in candidates:
        if subprocess.run([candidate, "-c", check], capture_output=True).returncode == 0:
            return candidate
    raise SystemExit("no Python 3.12 or 3.13 for the NDIF server: install one, or set NNETHICS_NDIF_PYTHON")


def venv_dir() -> Path:
    """The server venv for these requirements (a new requirements file gets a new venv)."""
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:12]
    return cache_root() / f"venv-{digest}"


def install(quiet: bool = True) -> Path:
    """The server's venv (created and filled once; later calls return at once) and Debian's redis-server."""
    venv = venv_dir()
    done = venv / ".complete"
    if not shutil.which("redis-server"):
        subprocess.run(["apt-get", "install", "-y", "-q", "redis-server"], check=True,
                       stdout=subprocess.DEVNULL if quiet else None)
    if done.exists():
        return venv
    if venv.exists():
        shutil.rmtree(venv)  # a half-made venv from an interrupted install
    venv.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    subprocess.run([find_python(), "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
    subprocess.run([*pip, *(["-q"] if quiet else []), "-r", str(REQUIREMENTS)], check=True)
    done.write_text(f"installed in {time.monotonic() - started:.0f} s\n")
    return venv


# --- models in the Hugging Face cache layout ----------------------------------------------------------------------

def lay_out(hub: Path, repo_id: str, folder: Path) -> None:
    """``folder``'s files as the snapshot of ``repo_id`` in a Hugging Face hub cache (linked, not copied)."""
    revision = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    for item in Path(folder).iterdir():
        link = snapshot / item.name
        if not link.exists():
            link.symlink_to(item.resolve())


def size_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")) or 1 << 20


# --- the stack ---------------------------------------------------------------------------------------------------

def wait_port(port: int, seconds: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what or proc.args[0]} exited with {proc.returncode} before listening on {port}")
        time.sleep(0.25)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {seconds:g} s ({what})")


def only_loopback() -> bool:
    """True inside a private network namespace (no interface but ``lo``), where Ray cannot reach out."""
    return interfaces() == ["lo"]


def interfaces() -> list[str]:
    """This network namespace's interfaces (``/proc/net/dev`` is per namespace; ``/sys/class/net`` is not remounted
    by ``unshare --net``)."""
    lines = Path("/proc/net/dev").read_text().splitlines()[2:]
    return sorted(line.split(":", 1)[0].strip() for line in lines)


@dataclass
class Stack:
    """The running server: ``start`` (redis, S3, Ray + controller, API), ``deploy``, ``stop``; logs under ``folder``."""

    folder: Path
    models: dict[str, Path] = field(default_factory=dict)
    venv: Path = field(default_factory=venv_dir)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    startup_s: float = 0.0
    ray_temp: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{PORTS['api']}"

    @property
    def hub(self) -> Path:
        return self.folder / "hf" / "hub"

    def env(self) -> dict[str, str]:
        resources = {"GPU": 1, "CPU": 16, "cuda_memory_bytes": 8e9, "cpu_memory_bytes": 4e9, "head": 10}
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON", "RAY_", "NDIF_"))}
        env.update({
            "PATH": f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONPATH": str(HERE),  # cpu_actor, for the Ray workers
            "HOME": str(self.folder / "home"), "HF_HOME": str(self.folder / "hf"), "HF_HUB_CACHE": str(self.hub),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
            "RAY_OVERRIDE_RESOURCES": json.dumps(resources), "GRPC_ENABLE_FORK_SUPPORT": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            "NDIF_DEFAULT_MODEL_ACTOR_CLASS": "cpu_actor.CpuModelActor", "NDIF_DEFAULT_DTYPE": "float32",
            "NDIF_REDIS_URL": f"redis://127.0.0.1:{PORTS['redis']}",
            "NDIF_OBJECT_STORE_URL": f"http://127.0.0.1:{PORTS['s3']}",
            "NDIF_OBJECT_STORE_ACCESS_KEY": "testing", "NDIF_OBJECT_STORE_SECRET_KEY": "testing",
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "NDIF_RAY_ADDRESS": f"ray://127.0.0.1:{PORTS['ray_client']}",
            "NDIF_API_PORT": str(PORTS["api"]), "NDIF_API_URL": self.url,
            "GUNICORN_CMD_ARGS": f"--bind 127.0.0.1:{PORTS['api']} --no-control-socket",
        })
        return env

    def _spawn(self, name: str, *args: str, **env: str) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "ab")  # noqa: SIM115 - kept open for the child's life
        proc = subprocess.Popen(list(args), stdout=log, stderr=subprocess.STDOUT, env={**self.env(), **env},
                                cwd=self.folder, start_new_session=True)
        self.procs[name] = proc
        return proc

    def _bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def start(self) -> Stack:
        started = time.monotonic()
        (self.folder / "home").mkdir(parents=True, exist_ok=True)
        for repo_id, folder in self.models.items():
            lay_out(self.hub, repo_id, folder)
        redis = self._spawn("redis", "redis-server", "--bind", "127.0.0.1", "--port", str(PORTS["redis"]),
                            "--save", "", "--appendonly", "no", "--dir", str(self.folder))
        s3 = self._spawn("s3", self._bin("moto_server"), "-H", "127.0.0.1", "-p", str(PORTS["s3"]))
        wait_port(PORTS["redis"], 30, redis, "redis-server")
        wait_port(PORTS["s3"], 60, s3, "moto_server")
        # Ray's sockets live under its temp dir and a socket path may not pass 107 bytes: a short folder of its own
        # under /tmp (removed by stop), not one under the stack's folder (pytest's are too deep).
        self.ray_temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        subprocess.run([self._bin("ray"), "start", "--head", "--node-ip-address=127.0.0.1",
                        f"--port={PORTS['ray']}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                        f"--dashboard-port={PORTS['dashboard']}", f"--ray-client-server-port={PORTS['ray_client']}",
                        "--object-store-memory=300000000", f"--temp-dir={self.ray_temp}",
                        "--disable-usage-stats"],
                       check=True, env=self.env(), cwd=self.folder, stdout=open(self.folder / "ray.log", "ab"),
                       stderr=subprocess.STDOUT)
        self._spawn("controller", self._bin("python"), "-m", "ndif.services.ray.deployments.controller.controller",
                    RAY_ADDRESS=f"127.0.0.1:{PORTS['ray']}")
        api = self._spawn("api", "bash", str(self.venv / "lib" / _site(self.venv) / "ndif/services/api/start.sh"))
        wait_port(PORTS["api"], 120, api, "the NDIF API")
        self._wait_ready(120)
        self.startup_s = time.monotonic() - started
        return self

    def _wait_ready(self, seconds: float) -> None:
        """``/connected`` answers 200 once the dispatcher has connected to Ray (before that, 503)."""
        deadline = time.monotonic() + seconds
        last = ""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/connected", timeout=5) as reply:
                    last = reply.read().decode()
                    if reply.status == 200:
                        return
            except OSError as e:
                last = str(e)
            time.sleep(1)
        raise TimeoutError(f"the NDIF API did not become ready within {seconds:g} s: {last}")

    def deploy(self, repo_ids: list[str] | None = None, timeout: float = 300) -> float:
        """Deploy models ahead by exact key (pinned, so nothing evicts them); returns the seconds it took."""
        started = time.monotonic()
        specs = [{"checkpoint": r, "model_key": model_key(r), "task": "text-generation", "pinned": True,
                  "dtype": "float32", "size_bytes": size_bytes(self.models[r]), "padding_bias": 0}
                 for r in (repo_ids or list(self.models))]
        config = self.folder / "models.yaml"
        config.write_text(json.dumps({"models": specs}, indent=1))  # JSON is YAML
        subprocess.run([self._bin("ndif"), "deploy", "-f", str(config)], check=True, env=self.env(),
                       cwd=self.folder, timeout=timeout, stdout=open(self.folder / "deploy.log", "ab"),
                       stderr=subprocess.STDOUT)
        return time.monotonic() - started

    def log(self, name: str = "api") -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """The dispatcher child of gunicorn first (the master waits for it), then the master, Ray, redis, S3."""
        api = self.procs.pop("api", None)
        if api is not None and api.poll() is None:
            _children_then(api)
        with contextlib.suppress(Exception):
            subprocess.run([self._bin("ray"), "stop", "--force"], env=self.env(), cwd=self.folder, timeout=60,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for proc in reversed(list(self.procs.values())):
            _terminate(proc)
        self.procs.clear()
        if self.ray_temp is not None:
            logs = self.folder / "ray-logs"
            with contextlib.suppress(OSError):  # Ray's own logs stay with the stack's (its sockets go)
                shutil.copytree(self.ray_temp / "session_latest" / "logs", logs, dirs_exist_ok=True)
            shutil.rmtree(self.ray_temp, ignore_errors=True)
            self.ray_temp = None


def leftovers(stack: Stack, pids: list[int]) -> list[str]:
    """What of a stopped stack still runs or listens: processes of its venv or of ``pids``, and its ports."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        state = _state(entry)
        if state != "Z" and (str(stack.venv) in cmdline or int(entry.name) in pids):
            found.append(f"process {entry.name}: {cmdline[:120]}")
    for name, port in PORTS.items():
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            found.append(f"port {port} ({name}) still listens")
    return found


def _state(entry: Path) -> str:
    try:
        return (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def _site(venv: Path) -> str:
    return next(p.name for p in (venv / "lib").iterdir() if p.name.startswith("python")) + "/site-packages"


def _terminate(proc: subprocess.Popen, seconds: float = 15) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(seconds)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def _children_then(proc: subprocess.Popen) -> None:
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    pids = [int(p) for p in children.read_text().split()] if children.exists() else []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    _terminate(proc)


def model_spec(text: str) -> tuple[str, Path]:
    """``--model ORG/NAME=FOLDER``: a hub-style id and a model folder with a config.json (checked before anything
    starts; argparse turns the error into one line and exit code 2)."""
    repo_id, sep, folder = text.partition("=")
    if not sep or repo_id.count("/") != 1 or not all(repo_id.split("/")) or not folder:
        raise argparse.ArgumentTypeError(f"{text!r}: give ORG/NAME=FOLDER, e.g. org/tiny-llama=/path/to/model")
    if not (Path(folder) / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{text!r}: {folder} is not a model folder (no config.json in it); "
                                         "give a folder saved with save_pretrained")
    return repo_id, Path(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help="make the server's venv (cached) and install redis-server")
    sub.add_parser("venv", help="print the server venv's path")
    up = sub.add_parser("up", help="start the stack, deploy the models, wait until Ctrl-C")
    up.add_argument("--model", action="append", default=[], metavar="ORG/NAME=FOLDER", required=True, type=model_spec)
    up.add_argument("--folder", default=None, help="where its logs and state go (default: a new temporary folder)")
    args = parser.parse_args(argv)
    if args.command == "venv":
        print(venv_dir())
        return 0
    if args.command == "install":
        print(install(quiet=False))
        return 0
    if not (venv_dir() / ".complete").exists():
        parser.error(f"no server venv at {venv_dir()}: run `python {sys.argv[0]} install` first")
    models = dict(args.model)
    folder = Path(args.folder or tempfile.mkdtemp(prefix="ndif-"))
    folder.mkdir(parents=True, exist_ok=True)
    # Ctrl-C or a kill is taken by sigwait below (not by the default handlers, which would leave the stack running)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    stack = Stack(folder, models)
    try:
        stack.start()
        seconds = stack.deploy()
        print(f"URL {stack.url}  (started in {stack.startup_s:.0f} s, deployed in {seconds:.0f} s; logs in {folder})",
              flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

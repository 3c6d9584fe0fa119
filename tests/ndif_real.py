"""The real NDIF server (``ndif`` 0.1.2 from PyPI) for the remote tests: ``make test-ndif``.

:class:`RealNdif` drives ``scripts/ndif/stack.py`` (the stack in the server's own venv: API, redis, Ray with NDIF's
controller and a CPU model actor, an S3 object store) and answers what the tests ask a server: its URL, the models it
serves (deployed ahead, by exact key, on first use) and :meth:`snapshot`, whose request count is read from the
server's own log (one ``stage=received`` line per request the API accepted), never from the client's counters.

The stack must run inside a private network namespace (Ray binds the machine's interface address too): ``make
test-ndif`` runs pytest under ``unshare --net``; :func:`check_namespace` refuses anything else.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts" / "ndif"))

import stack as ndif_stack  # noqa: E402

ENV = "NNETHICS_NDIF"
"""``real`` selects this server for the remote tests (``make test-ndif`` sets it); unset, they use the imitation."""

RECEIVED = re.compile(r"\[ndif\.request\] Your job has been received.*? request_id=([0-9a-f]+)")


def wanted() -> bool:
    return os.environ.get(ENV) == "real"


def check_namespace() -> None:
    if not ndif_stack.only_loopback():
        raise RuntimeError(
            f"{ENV}=real starts Ray, which listens on this machine's own address too: run it inside a private network "
            f"namespace (make test-ndif does: unshare --net); interfaces here: {ndif_stack.interfaces()}")


class RealNdif:
    """The running stack, as the remote tests use a server."""

    def __init__(self, folder: Path) -> None:
        check_namespace()
        venv = ndif_stack.venv_dir()
        if not (venv / ".complete").exists():
            raise RuntimeError(f"no NDIF server venv at {venv}: run `python scripts/ndif/stack.py install` first "
                               "(make test-ndif does, outside the namespace)")
        self.stack = ndif_stack.Stack(folder, {}, venv=venv)
        self.deploy_s: dict[str, float] = {}

    @property
    def url(self) -> str:
        return self.stack.url

    def start(self, models: dict[str, Path]) -> RealNdif:
        self.stack.models.update(models)
        self.stack.start()
        self.deploy_s[",".join(models)] = self.stack.deploy(list(models))
        return self

    def serve(self, repo_id: str, folder: Path) -> None:
        """Serve ``folder`` as ``repo_id`` (deployed now unless it already is)."""
        if repo_id not in self.stack.models:
            self.stack.models[repo_id] = Path(folder)
            ndif_stack.lay_out(self.stack.hub, repo_id, folder)
            self.deploy_s[repo_id] = self.stack.deploy([repo_id])

    def request_ids(self) -> list[str]:
        """Every request the API received, from its own log, in order."""
        return RECEIVED.findall(self.stack.log("api"))

    def snapshot(self) -> dict:
        return {"requests": len(self.request_ids()), "nnethics_importable": self.nnethics_importable}

    @property
    def nnethics_importable(self) -> bool:
        """Whether the server's Python can import nnethics (it must not: client code ships by value)."""
        python = self.stack.venv / "bin" / "python"
        return subprocess.run([str(python), "-c", "import nnethics"], capture_output=True,
                              cwd=self.stack.folder).returncode == 0

    def clear_faults(self) -> None:
        """Nothing to clear: the real server has no fault switches (tests that need them run on the imitation)."""

    def log(self, name: str = "api") -> str:
        return self.stack.log(name)

    def actor_pids(self) -> list[int]:
        """The model actors' processes (Ray names them ``ray::CpuModelActor``)."""
        out = subprocess.run(["pgrep", "-f", "ray::CpuModelActor"], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def kill_actors(self) -> list[int]:
        pids = self.actor_pids()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return pids

    def wait_actors(self, n: int, seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        while len(self.actor_pids()) < n and time.monotonic() < deadline:
            time.sleep(0.5)

    def stop(self) -> list[str]:
        """Stop the stack; what of it is left (processes, listening ports, Ray's folder): nothing, or the test fails."""
        pids = [p.pid for p in self.stack.procs.values()]
        ray_temp = self.stack.ray_temp
        self.stack.stop()
        left = ndif_stack.leftovers(self.stack, pids)
        if ray_temp is not None and ray_temp.exists():
            left.append(f"Ray's folder {ray_temp}")
        return left

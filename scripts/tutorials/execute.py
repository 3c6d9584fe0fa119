"""Run the tutorial notebooks and save their outputs, so they read on GitHub.

    .venv/bin/python scripts/tutorials/execute.py                 # every notebook, outputs saved in place
    .venv/bin/python scripts/tutorials/execute.py 03 --out /tmp/nb  # one notebook, written elsewhere

Each notebook runs in a fresh Jupyter kernel with this folder as its working directory. For
``06_remote_ndif`` the script starts the loopback NDIF server of the tests (``tests/ndif_server.py``, the
built-in model on 127.0.0.1, a one-off API key) and points ``NDIF_HOST``/``NDIF_API_KEY`` at it, unless
``--ndif`` says to use the NDIF service configured in the environment. The tests
(``tests/test_tutorials.py``) run the same function and compare the outputs with the saved ones.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
NOTEBOOKS = sorted(HERE.glob("[0-9][0-9]_*.ipynb"))
REMOTE = "06_remote_ndif"
TIMEOUT = 1800  # seconds per cell: the quickstart runs every analysis on a 2-core CPU


@contextlib.contextmanager
def loopback_ndif(log: Path) -> Iterator[dict[str, str]]:
    """The tests' loopback NDIF server serving the built-in model; yields the environment that points at it."""
    sys.path.insert(0, str(ROOT / "tests"))
    from ndif_server import ServerProcess

    from nnethics.models.builtin import BUILTIN_HUB_ID, ensure_cached

    key = "loopback-" + secrets.token_hex(8)
    server = ServerProcess({BUILTIN_HUB_ID: ensure_cached()}, api_key=key, log=log, max_seconds=TIMEOUT)
    try:
        yield {"NDIF_HOST": server.url, "NDIF_API_KEY": key}
    finally:
        server.stop()


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process' environment
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def execute(path: Path, out: Path | None = None, ndif: bool = False, log_dir: Path | None = None) -> Path:
    """Run the notebook at ``path`` and write it with its outputs to ``out`` (default: in place)."""
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=TIMEOUT, kernel_name="python3", record_timing=False,
                                     resources={"metadata": {"path": str(HERE)}})
    with contextlib.ExitStack() as stack:
        stack.enter_context(environment({"PYTHONHASHSEED": "0", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}))
        if path.stem == REMOTE and not ndif:
            env = stack.enter_context(loopback_ndif((log_dir or Path(out or path).parent) / "ndif_server.log"))
            stack.enter_context(environment(env))
        client.execute()
    target = out / path.name if out is not None and out.suffix != ".ipynb" else (out or path)
    target.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, target)
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("only", nargs="*", help="notebook numbers or names (default: all)")
    ap.add_argument("--out", type=Path, help="write the executed notebooks to this folder instead of in place")
    ap.add_argument("--ndif", action="store_true", help="06: use the NDIF service from NDIF_HOST/NDIF_API_KEY")
    args = ap.parse_args()
    chosen = [p for p in NOTEBOOKS if not args.only or any(p.stem.startswith(o) for o in args.only)]
    if not chosen:
        ap.error(f"no notebook matches {args.only}; have {', '.join(p.stem for p in NOTEBOOKS)}")
    for path in chosen:
        print(f"{path.stem} ...", flush=True)
        print("  wrote", execute(path, args.out, args.ndif, log_dir=Path("/tmp")), flush=True)


if __name__ == "__main__":
    main()

"""The real NDIF server (``ndif`` 0.1.2 on this machine, on loopback): what a request costs, and a whole run = local.

    make bench-ndif                         # the two below, inside a private network namespace
    python scripts/bench_ndif.py overhead   # (inside one: the script starts and stops the stack itself)
    python scripts/bench_ndif.py compare --pairs 70

``overhead``: seconds per request on the built-in model, median of ``--repeats`` in one process, the stack warm:
(a) an empty trace (one number saved) and the same trace locally: what a request adds beyond its compute;
(b) one chunk of ``--batch-size`` pairs through the fused run (every default analysis) as one request;
(c) four such chunks, as four requests (``--per-request 1``) and as one (``--per-request 4``).
The differences are the server's per-request cost (queue, dispatch, status stream, result handling): on a
shared NDIF a request also waits in the queue, which this machine cannot measure.

``compare``: every default analysis over ``--pairs`` shipped pairs, locally and through the server, into two stores;
prints the largest absolute difference per variable, the number of requests (the server's log) and KB per pair.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts" / "ndif"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NDIF_API_KEY", "bench")

import numpy as np  # noqa: E402
import stack as ndif_stack  # noqa: E402
import torch  # noqa: E402
import xarray as xr  # noqa: E402

from nnethics.engine import run_all  # noqa: E402
from nnethics.models import load_model  # noqa: E402
from nnethics.models.builtin import BUILTIN_HUB_ID, ensure_cached  # noqa: E402
from nnethics.models.remote import STATS  # noqa: E402
from nnethics.prompts import load_prompts  # noqa: E402

RECEIVED = re.compile(r"\[ndif\.request\] Your job has been received")  # one line per request the API accepted


def _requests(server: ndif_stack.Stack) -> int:
    return len(RECEIVED.findall(server.log("api")))


def _timed(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), times


def _empty(model) -> None:
    with torch.no_grad(), model.trace(torch.tensor([[1, 2, 3]])):
        model.lm.lm_head.output[:, -1, :1].clone().save()


def overhead(server: ndif_stack.Stack, args: argparse.Namespace) -> None:
    remote, local = load_model("builtin", remote=True), load_model("builtin")
    prompts = load_prompts(ROOT / "prompts")
    one = prompts.subset(limit=args.batch_size)
    four = prompts.subset(limit=4 * args.batch_size)
    _empty(remote)  # warm: the first request after a deploy pays the actor's first forward
    rows = []
    med, _ = _timed(lambda: _empty(remote), args.repeats)
    loc, _ = _timed(lambda: _empty(local), args.repeats)
    rows.append(("empty trace (1 number back)", 1, med, loc))

    def fused(model, ps, per_request=1):
        with tempfile.TemporaryDirectory() as store:
            run_all(model, ps, store, batch_size=args.batch_size, progress=False, per_request=per_request)

    for label, ps, per in ((f"1 chunk of {args.batch_size} pairs, every default analysis", one, 1),
                           (f"4 chunks of {args.batch_size}: --per-request 1", four, 1),
                           (f"4 chunks of {args.batch_size}: --per-request 4", four, 4)):
        before = _requests(server)
        med, _ = _timed(lambda ps=ps, per=per: fused(remote, ps, per), args.repeats)
        requests = (_requests(server) - before) // args.repeats
        loc, _ = _timed(lambda ps=ps, per=per: fused(local, ps, per), max(1, args.repeats // 2))
        rows.append((label, requests, med, loc))
    print(f"\nbuilt-in model, {args.repeats} repeats (median), torch threads {torch.get_num_threads()}:")
    print("| what | requests (server log) | remote s | local s | remote - local s |\n|---|---|---|---|---|")
    for label, n, med, loc in rows:
        print(f"| {label} | {n} | {med:.2f} | {loc:.2f} | {med - loc:.2f} |")
    per_request = rows[2][2] - rows[3][2]
    print(f"\nper-request overhead from (c): ({rows[2][2]:.2f} - {rows[3][2]:.2f}) / 3 = {per_request / 3:.2f} s; "
          f"from (a): {rows[0][2] - rows[0][3]:.2f} s")


def compare(server: ndif_stack.Stack, args: argparse.Namespace) -> None:
    prompts = load_prompts(ROOT / "prompts").subset(limit=args.pairs)
    with tempfile.TemporaryDirectory() as tmp:
        stores = {"local": Path(tmp) / "local", "remote": Path(tmp) / "remote"}
        t0 = time.perf_counter()
        run_all(load_model("builtin"), prompts, str(stores["local"]), batch_size=args.batch_size, progress=False)
        t_local = time.perf_counter() - t0
        STATS.reset()
        before = _requests(server)
        t0 = time.perf_counter()
        run_all(load_model("builtin", remote=True), prompts, str(stores["remote"]), batch_size=args.batch_size,
                progress=False, per_request=args.per_request)
        t_remote = time.perf_counter() - t0
        requests = _requests(server) - before
        totals = STATS.totals()
        print(f"\n{len(prompts)} pairs, every default analysis, --batch-size {args.batch_size} --per-request "
              f"{args.per_request}: local {t_local:.0f} s, remote {t_remote:.0f} s; {requests} requests by the "
              f"server's log ({totals['requests']} by the client), {totals['bytes_sent'] / 1024 / len(prompts):.1f} KB "
              f"up + {totals['bytes_received'] / 1024 / len(prompts):.1f} KB down per pair")
        print("| file | variable | max abs difference | largest value |\n|---|---|---|---|")
        worst = 0.0
        for f in sorted(stores["local"].glob("*/*.nc")):
            (g,) = stores["remote"].glob(f"*/{f.name}")
            with xr.open_dataset(f) as a, xr.open_dataset(g) as b:
                for name, var in a.data_vars.items():
                    if not np.issubdtype(var.dtype, np.number):
                        same = bool((var.values == b[name].values).all())
                        print(f"| {f.name} | {name} | {'equal' if same else 'DIFFERENT'} | |")
                        continue
                    x, y = var.values.astype(float), b[name].values.astype(float)
                    both = np.isfinite(x) & np.isfinite(y)
                    assert (np.isnan(x) == np.isnan(y)).all(), (f.name, name, "NaN in one only")
                    diff = float(np.abs(x[both] - y[both]).max()) if both.any() else 0.0
                    worst = max(worst, diff)
                    print(f"| {f.name} | {name} | {diff:.3g} | {float(np.abs(x[both]).max()) if both.any() else 0:.3g} |")
        print(f"\nlargest difference over every variable: {worst:.3g}")


def main() -> int:
    sys.stdout.reconfigure(line_buffering=True)  # lines as they come, also into a log
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["overhead", "compare", "both"])
    parser.add_argument("--pairs", type=int, default=70)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--per-request", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not ndif_stack.only_loopback():
        raise SystemExit("run inside a private network namespace (make bench-ndif does: unshare --net)")
    folder = Path(tempfile.mkdtemp(prefix="ndif-bench-"))
    server = ndif_stack.Stack(folder, {BUILTIN_HUB_ID: ensure_cached()})
    try:
        server.start()
        deploy = server.deploy()
        print(f"stack started in {server.startup_s:.0f} s, the built-in model deployed in {deploy:.0f} s")
        os.environ["NDIF_HOST"] = server.url
        if args.what in ("overhead", "both"):
            overhead(server, args)
        if args.what in ("compare", "both"):
            compare(server, args)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

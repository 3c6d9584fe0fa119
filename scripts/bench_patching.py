"""Benchmark activation patching on the built-in model: nnethics vs a seed-style hook loop.

Times, in one process and on the same pairs (median of ``--repeats``):

(a) one plain Hugging Face forward of each base prompt (the unit of "forward-equivalents");
(b) the seed-style reference: plain PyTorch forward hooks, one forward per layer per component
    (``tests/reference/patching.py::patch_sweep``: 1 counterfactual + 3L patched forwards per pair);
(c) nnethics' activation patching of the same pairs (resid + attn + mlp at the decision position,
    every layer; the default, which on the last position has no attribution patching), plus a variant with
    AtP (``--atp``) and (``--full``) one with the KV cache off;
(d) nnethics' per-head patching (``heads``: every layer x head at the decision position, with AtP and DLA, then
    ``finalize`` and the ``complete`` pass that computes the top heads' attention, as ``nnethics heads`` runs
    them), and without AtP; its cost beyond the default layer sweep (c, without AtP: the heads' AtP counts in the
    difference) per pair (goal: at most one forward-equivalent),
    timed in rounds that each run (a), (c) and (d) back to back (rotated), the difference taken per round: the
    median of ``--repeats`` rounds and their range.

Prints forward-equivalents per pair (c / a) and the speed-up (b / c), and checks that (c) equals (b).

    .venv/bin/python scripts/bench_patching.py --pairs 5 --repeats 3
    .venv/bin/python scripts/bench_patching.py --pairs 3 --threads 1 --clock cpu --no-reference  # steadier
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.reference (the independent hook implementation)

from nnethics.analyses.common import encode_pairs  # noqa: E402
from nnethics.analyses.heads import HeadsOptions, complete_attention, finalize  # noqa: E402
from nnethics.analyses.patching import PatchingOptions  # noqa: E402
from nnethics.engine import activation_patching, chunk  # noqa: E402
from nnethics.models import load_model  # noqa: E402
from nnethics.prompts import load_prompts  # noqa: E402
from tests.reference.patching import COMPONENTS, patch_sweep  # noqa: E402

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = CLOCKS["wall"]


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = CLOCK()
        fn()
        times.append(CLOCK() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--full", action="store_true",
                    help="also time the full-forward path (--kv-cache off): as many FLOPs as (b), so it takes as long")
    ap.add_argument("--prompts", default=str(ROOT / "prompts"))
    ap.add_argument("--no-reference", action="store_true",
                    help="skip (b), the hook loop (3L+1 full forwards per pair: the slowest part) and the check of (c)")
    ap.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                    help="cpu: this process' CPU time, steadier on a shared machine (only with --threads 1)")
    args = ap.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu measures work only with --threads 1")
    global CLOCK
    CLOCK = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model("smollm2-135m-instruct", device="cpu", dtype="float32")
    hf = model.lm._module
    pairs = list(load_prompts(args.prompts).pairs[: args.pairs])
    batch = encode_pairs(model, pairs, ["1", "2"])
    ids = tuple(batch.label_ids)
    base = [torch.tensor([batch.encoded.tokens(batch.row(i, "base"))]) for i in range(len(pairs))]
    cf = [torch.tensor([batch.encoded.tokens(batch.row(i, "cf"))]) for i in range(len(pairs))]
    lengths = [b.shape[1] for b in base]
    print(f"model {model.name}: {model.n_layers} layers, d={model.d_model}; {len(pairs)} pairs, "
          f"base tokens {min(lengths)}-{max(lengths)}; torch threads {torch.get_num_threads()}; {args.clock} clock")

    # warm-up (first calls pay one-off costs)
    with torch.no_grad():
        hf(input_ids=base[0])
    activation_patching(model, pairs[:1], PatchingOptions())
    chunk("heads", model, pairs[:1], HeadsOptions())  # the engine's path: the shared trace's prefix cache

    def plain():
        with torch.no_grad():
            for b in base:
                hf(input_ids=b)

    ref_out = {}

    def reference():
        for i, (b, c) in enumerate(zip(base, cf)):
            ref_out[i] = patch_sweep(hf, b, c, ids, COMPONENTS)

    n = len(pairs)
    t_a = median_time(plain, args.repeats) / n
    print(f"(a) plain HF forward of a base prompt:          {t_a * 1e3:8.1f} ms", flush=True)
    t_b = float("nan")
    if not args.no_reference:
        t_b = median_time(reference, args.repeats) / n
        print(f"(b) seed-style hook loop ({1 + 3 * model.n_layers} forwards/pair):    {t_b * 1e3:8.1f} ms/pair "
              f"= {t_b / t_a:5.1f} forward-equivalents", flush=True)

    out = {}
    variants = {  # name: (options, repeats)
        "nnethics (KV cache, the default: no AtP)": (PatchingOptions(), args.repeats),
        "nnethics (KV cache + AtP, --atp)": (PatchingOptions(atp=True), args.repeats),
    }
    if args.full:  # every patched row is a full forward here: as many FLOPs as (b), so one repeat
        variants["nnethics (full forwards + AtP, --kv-cache off)"] = (PatchingOptions(kv_cache="off", atp=True), 1)
    times = {}
    for name, (opts, reps) in variants.items():
        t_c = median_time(lambda o=opts, k=name: out.__setitem__(k, activation_patching(model, pairs, o)), reps) / n
        times[name] = t_c
        print(f"(c) {name:44s} {t_c * 1e3:8.1f} ms/pair = {t_c / t_a:5.2f} forward-equivalents; "
              f"speed-up over (b) {t_b / t_c:5.1f}x", flush=True)

    # (d) paired with the sweep: each round times the unit, the sweep and both heads variants back to back, in an
    # order rotated per round, so that a machine that slows down or speeds up between rounds (a shared VM does)
    # moves all of them together; the cost beyond the sweep is taken per round, then its median.
    n_heads = model.n_layers * model.n_heads
    heads = {"heads (KV blocks + AtP, the default)": HeadsOptions(), "heads (KV blocks, no AtP)": HeadsOptions(atp=False)}
    items = {"unit": plain, "sweep": lambda: activation_patching(model, pairs, PatchingOptions())}
    for name, opts in heads.items():
        items[name] = lambda o=opts: complete_attention(model, finalize(chunk("heads", model, pairs, o)), pairs, o)
    names, rounds = list(items), {k: [] for k in items}
    for r in range(args.repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t = CLOCK()
            items[k]()
            rounds[k].append(CLOCK() - t)
    unit = rounds["unit"]  # n plain forwards: time / unit = forward-equivalents per pair
    sweep = statistics.median(s / u for s, u in zip(rounds["sweep"], unit))
    print(f"(d) paired rounds: the layer sweep (c, default) {sweep:5.2f} forward-equivalents per pair "
          f"(median of {args.repeats} rounds)", flush=True)
    for name in heads:
        fe = [d / u for d, u in zip(rounds[name], unit)]
        beyond = [(d - s) / u for d, s, u in zip(rounds[name], rounds["sweep"], unit)]
        print(f"(d) {name:44s} {statistics.median(fe):5.2f} forward-equivalents ({n_heads} heads); beyond the "
              f"layer sweep: {statistics.median(beyond):+5.2f} (rounds {min(beyond):+.2f} to {max(beyond):+.2f})",
              flush=True)

    if args.no_reference:
        return
    ds = out["nnethics (KV cache + AtP, --atp)"]
    err = max(float((torch.tensor(ds["patched_logit_diff"].values[i, :, j]) - ref_out[i][c]).abs().max())
              for i in range(n) for j, c in enumerate(COMPONENTS))
    print(f"max |nnethics - reference| patched LD: {err:.2e}")
    r = ds["atp_correlation"].values
    print(f"AtP vs exact, per-pair Pearson r: {', '.join(f'{x:.3f}' for x in r)}")


if __name__ == "__main__":
    main()

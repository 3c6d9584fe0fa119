"""The whole analysis of a pair in forward-equivalents: seed-style hooks vs separate API calls vs the fused run.

Measured in one process on the built-in model (``--threads`` CPU threads, ``--pairs`` shipped pairs), rounds
rotated (each round starts one item later), the minimum of ``--rounds`` rounds per item:

* the unit: one plain transformers forward of one prompt (no hooks), over every base and counterfactual prompt;
* job 1: resid patching over every layer + DLA (attn/MLP, no heads) + logit lens;
* job 2: decisions + resid/attn/MLP patching + attribution patching + DLA with heads + logit lens;
* job 3: resid/attn/MLP patching + per-head patching (no seed-style loop: the seed had none): fused, heads reads the
  shared trace's prefix cache that patching reads, so the prefix runs once;
* job 4: decisions + steer over a 7-layer x 9-alpha x 2-kind grid with its 4 random directions (no seed-style loop),
  and decisions alone: steer's cost beyond the shared forward is the difference;
* cloze alone (``ne.analyze(model, pairs, ["cloze"])``), in forward-equivalents per pair too;

each as (a) a seed-style loop of plain PyTorch hooks (``tests/reference``: one forward per patched cell), (b)
separate ``ne.analyze`` calls, one per analysis, and (c) ONE fused ``ne.analyze`` call (one shared trace per
chunk). Prints forward-equivalents per pair and the speed-ups, and checks that (c) equals (b) within 1e-5 (they
are meant to be bit-equal). With a CUDA device, ``--gpu`` (the default there) also runs job 2 fused on an
8B-shaped Llama with random weights in bfloat16 over 100 pairs of about 120 tokens and prints pairs per second
(``--gpu-shape tiny --gpu-device cpu`` runs that path on a tiny shape here).

    .venv/bin/python scripts/bench_run.py --threads 2 --pairs 3 --rounds 3
    .venv/bin/python scripts/bench_run.py --threads 1 --clock cpu    # steadier on a busy machine
    .venv/bin/python scripts/bench_run.py --framing moralchoice.AB.rev   # per framing: the same pairs reworded
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.reference: the independent hook implementation

import nnethics as ne  # noqa: E402
from nnethics.analyses.attribution import AttributionOptions  # noqa: E402
from nnethics.analyses.common import encode_pairs  # noqa: E402
from nnethics.analyses.heads import HeadsOptions  # noqa: E402
from nnethics.analyses.lens import LensOptions  # noqa: E402
from nnethics.analyses.patching import PatchingOptions  # noqa: E402
from nnethics.analyses.steer import SteerOptions  # noqa: E402
from nnethics.models import load_model  # noqa: E402
from nnethics.prompts import load_prompts  # noqa: E402
from tests.reference.attribution import dla  # noqa: E402
from tests.reference.lens import logit_lens  # noqa: E402
from tests.reference.patching import attribution_patching, logit_diff, patch_sweep  # noqa: E402

LENS = LensOptions(tuned_lens="none")
JOBS = {  # name: {analysis: options}; the description is printed
    "job 1: resid patching + DLA (attn/MLP) + logit lens": {
        "patching": PatchingOptions(components=("resid",)), "attribution": AttributionOptions(heads=False),
        "lens": LENS},
    "job 2: decisions + resid/attn/MLP patching + AtP + DLA with heads + logit lens": {
        "decisions": None, "patching": PatchingOptions(atp=True), "attribution": AttributionOptions(), "lens": LENS},
    "job 3: resid/attn/MLP patching + per-head patching (heads, its complete pass included)": {
        "patching": PatchingOptions(), "heads": HeadsOptions()},
    "job 4: decisions + steer (7 layers x 9 alphas x content, caa + 4 random directions; its complete pass included)": {
        "decisions": None, "steer": SteerOptions(layers=tuple(range(20, 27)), kinds=("content", "caa"))},
}
DECISIONS = {"decisions": None}  # the shared forward alone: steer's cost beyond it is job 4 minus this
SEEDLESS = {"heads", "steer"}  # no seed-style loop is timed for a job with these (the seed scripts had no head patching)
SHAPE_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5)
SHAPE_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=49152, max_position_embeddings=512)


def seed_loop(hf, base, cf, ids, job: dict) -> None:
    """Plain hooks, one forward per patched cell (the seed's way), for what ``job`` computes."""
    comps = list(job["patching"].components)
    for b, c in zip(base, cf):
        if "decisions" in job:
            logit_diff(hf, b, ids), logit_diff(hf, c, ids)
        patch_sweep(hf, b, c, ids, comps)
        if job["patching"].atp:
            attribution_patching(hf, b, c, ids, components=comps)
        dla(hf, b, ids), dla(hf, c, ids)
        logit_lens(hf, b), logit_lens(hf, c)


def separate(model, pairs, job: dict) -> dict:
    out = {}
    for name, opts in job.items():
        out.update(ne.analyze(model, pairs, [name], **({name: opts} if opts is not None else {})))
    return out


def fused(model, pairs, job: dict, batch_size: int = 8) -> dict:
    return ne.analyze(model, pairs, list(job), batch_size=batch_size, **{n: o for n, o in job.items() if o is not None})


def max_difference(a: dict, b: dict) -> float:
    worst = 0.0
    for name in a:
        for var in a[name].data_vars:
            x, y = a[name][var].values, b[name][var].values
            if x.dtype.kind == "f" and x.size:
                d = np.abs(x.astype(np.float64) - y.astype(np.float64))
                both_nan = np.isnan(x) & np.isnan(y)
                if (np.isnan(d) & ~both_nan).any():
                    return float("inf")
                worst = max(worst, float(np.nanmax(np.where(both_nan, 0, d))))
    return worst


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def rotated_min(items: dict, rounds: int, clock=time.perf_counter) -> dict[str, float]:
    """Each item's minimum time over ``rounds`` rounds, each round starting one item later."""
    names, best = list(items), {}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = clock()
            items[name]()
            dt = clock() - t
            best[name] = min(best.get(name, float("inf")), dt)
            print(f"  round {r + 1} {name}: {dt:.2f} s", flush=True)
    return best


def cpu_bench(args) -> None:
    model = load_model("smollm2-135m-instruct", device="cpu", dtype="float32")
    hf = model.lm._module
    prompts = load_prompts(args.prompts)
    if args.framing:  # the same pairs in another framing (its wording and labels): the cost per framing
        from nnethics.framings import frame, select

        prompts = frame(prompts, select(args.framing)[0])
    prompts = prompts.subset(limit=args.pairs)
    pairs = list(prompts.pairs)
    batch = encode_pairs(model, pairs, prompts.labels)
    ids = tuple(batch.label_ids)
    rows = [torch.tensor([batch.encoded.tokens(r)]) for r in range(2 * len(pairs))]
    base, cf = rows[: len(pairs)], rows[len(pairs):]
    n = len(pairs)
    print(f"model {model.name}: {model.n_layers} layers, d={model.d_model}; {n} pairs"
          f"{' in framing ' + args.framing if args.framing else ''}, prompt tokens "
          f"{min(r.shape[1] for r in rows)}-{max(r.shape[1] for r in rows)}; torch threads {torch.get_num_threads()}")

    def unit():
        with torch.no_grad():
            for r in rows:
                hf(input_ids=r)

    results: dict = {}
    items = {"unit": unit}
    for j, job in enumerate(JOBS.values()):
        if args.seed_loop and not SEEDLESS & set(job):
            items[f"seed{j}"] = lambda job=job: seed_loop(hf, base, cf, ids, job)
        items[f"separate{j}"] = lambda job=job, j=j: results.__setitem__(f"separate{j}", separate(model, prompts, job))
        items[f"fused{j}"] = lambda job=job, j=j: results.__setitem__(f"fused{j}", fused(model, prompts, job))
    items["decisions"] = lambda: fused(model, prompts, DECISIONS)
    items["cloze"] = lambda: ne.analyze(model, prompts, ["cloze"])  # its own session: the stems, then 2 option rows each
    for name, fn in items.items():  # warm-up: first calls pay one-off costs
        if not name.startswith("seed"):
            fn()
    best = rotated_min(items, args.rounds, CLOCKS[args.clock])
    t_unit = best["unit"] / len(rows)
    print(f"unit: one plain forward of one prompt {t_unit * 1e3:.1f} ms {args.clock} time (min of {args.rounds} "
          "rotated rounds)")
    ok = True
    for j, title in enumerate(JOBS):
        fe = {k: best[f"{k}{j}"] / n / t_unit if f"{k}{j}" in best else float("nan")
              for k in ("seed", "separate", "fused")}
        diff = max_difference(results[f"separate{j}"], results[f"fused{j}"])
        ok &= diff <= 1e-5
        print(f"{title}\n  forward-equivalents per pair: seed-style hooks {fe['seed']:.1f}, separate API calls "
              f"{fe['separate']:.2f}, fused {fe['fused']:.2f}; speed-up fused vs seed {fe['seed'] / fe['fused']:.1f}x, "
              f"vs separate {fe['separate'] / fe['fused']:.2f}x; max |fused - separate| {diff:.1e}")
    steer_job = next(j for j, title in enumerate(JOBS) if title.startswith("job 4"))
    shared = best["decisions"] / n / t_unit
    print(f"decisions alone (the shared forward and its readout): {shared:.2f} forward-equivalents per pair; "
          f"steer beyond it (job 4 fused minus that): {best[f'fused{steer_job}'] / n / t_unit - shared:.2f}")
    print(f"cloze (scenario + stem once, then its 2 options over the stem's key/value cache, per pair): "
          f"forward-equivalents per pair {best['cloze'] / n / t_unit:.2f}")
    print("fused == separate within 1e-5:", "yes" if ok else "NO")
    if not ok:
        sys.exit(1)


def random_model(shape: dict, dtype: torch.dtype, device: str):
    """A Llama of ``shape`` with random weights (no download: the built-in model's tokenizer), wrapped."""
    import transformers as T

    from nnethics.models import wrap_model
    from nnethics.models.builtin import ensure_cached

    tok = T.AutoTokenizer.from_pretrained(ensure_cached())
    cfg = T.LlamaConfig(**shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with torch.device(device):
        hf = T.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    return wrap_model(hf, tok, name=f"random-llama-{shape['num_hidden_layers']}x{shape['hidden_size']}",
                      dtype=str(dtype).removeprefix("torch."), device=device)


def long_pairs(prompts: str, n: int, extra: str) -> list:
    """``n`` pairs of about 120 tokens: the shipped pairs cycled, a context sentence added to both sides."""
    shipped = list(load_prompts(prompts).pairs)
    return [dataclasses.replace(p, prompt_id=f"{p.prompt_id}_{i}", base=f"{extra} {p.base}", cf=f"{extra} {p.cf}")
            for i, p in ((i, shipped[i % len(shipped)]) for i in range(n))]


def gpu_bench(args) -> None:
    shape = SHAPE_8B if args.gpu_shape == "8b" else SHAPE_TINY
    dtype = torch.bfloat16 if args.gpu_device.startswith("cuda") else torch.float32
    model = random_model(shape, dtype, args.gpu_device)
    extra = "Please read the following situation carefully and answer with the number of the option you choose."
    pairs = long_pairs(args.prompts, args.gpu_pairs, extra)
    lengths = encode_pairs(model, pairs[:4], ["1", "2"]).encoded.lengths
    job = list(JOBS.values())[1]
    fused(model, pairs[: args.gpu_batch], job, args.gpu_batch)  # warm-up
    if args.gpu_device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    fused(model, pairs, {**job, "patching": dataclasses.replace(job["patching"], max_tokens=1 << 16)}, args.gpu_batch)
    if args.gpu_device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    print(f"{model.name} ({dtype}, {args.gpu_device}): job 2 fused over {len(pairs)} pairs of ~{int(np.mean(lengths))} "
          f"tokens, batch {args.gpu_batch}: {dt:.1f} s = {len(pairs) / dt:.2f} pairs per second")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                    help="wall: elapsed time; cpu: this process' CPU time, steadier on a busy machine but only "
                         "meaningful with --threads 1 (idle threads spinning count as work)")
    ap.add_argument("--prompts", default=str(ROOT / "prompts"))
    ap.add_argument("--framing", default=None, help="render the pairs in this framing first (e.g. moralchoice.AB.rev): "
                    "the cost per framing; the unit is then a plain forward of that framing's prompts")
    ap.add_argument("--cpu", action=argparse.BooleanOptionalAction, default=True, help="the CPU comparison")
    ap.add_argument("--seed-loop", action=argparse.BooleanOptionalAction, default=True,
                    help="time the seed-style hook loop too (the slowest item; --no-seed-loop prints nan for it)")
    ap.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                    help="the random 8B-shaped model (default: when CUDA is available)")
    ap.add_argument("--gpu-shape", choices=("8b", "tiny"), default="8b")
    ap.add_argument("--gpu-device", default="cuda")
    ap.add_argument("--gpu-pairs", type=int, default=100)
    ap.add_argument("--gpu-batch", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu measures work only with --threads 1")
    if args.cpu:
        cpu_bench(args)
    if args.gpu if args.gpu is not None else torch.cuda.is_available():
        gpu_bench(args)


if __name__ == "__main__":
    main()

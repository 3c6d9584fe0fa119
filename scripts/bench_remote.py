"""Requests and bytes per prompt pair of every analysis run remotely (NDIF protocol).

Three measurements, each printed as one table row per analysis:

(a) **loopback**: the built-in model is served by the loopback NDIF server of ``tests/ndif_server.py``
    (a child process that cannot import nnethics, speaking the real protocol on 127.0.0.1) and each
    analysis runs through ``nnethics.engine.run_one`` with a remote handle, then all of them as one
    ``run_all`` (the fused run: one shared trace, one request per chunk). Bytes are on the wire,
    as :data:`nnethics.models.remote.STATS` counts them: up = payload + request envelope, down =
    status frames + result.
(b) ``--shape 70b``: a weightless Llama-3.1-70B-shaped model (80 layers x 8192, 64 heads, bfloat16,
    built from a config alone) whose requests are serialised exactly as they would be sent, then
    dropped: the upload per pair is measured; nothing runs, so there is no download figure.
(c) ``--shape 70b-results``: what comes back depends on the layers, heads, labels and dtype, not on
    the width, so a randomly initialised bfloat16 Llama with 70B's 80 layers, 64 query and 8 key/value
    heads but a narrow residual (256) is served by the loopback server as in (a): its downloads are
    those of the 70B model.

    .venv/bin/python scripts/bench_remote.py --pairs 8 --batch-size 8
    .venv/bin/python scripts/bench_remote.py --pairs 8 --batch-size 8 --shape 70b
    .venv/bin/python scripts/bench_remote.py --pairs 8 --batch-size 8 --shape 70b-results
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the loopback server
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from nnethics.analyses import ANALYSES, default_names  # noqa: E402
from nnethics.analyses.lens.lenses import find_cached_lens  # noqa: E402
from nnethics.engine import make_context, run_all, run_one  # noqa: E402
from nnethics.models import load_model  # noqa: E402
from nnethics.models.builtin import ensure_cached  # noqa: E402
from nnethics.models.remote import STATS, NdifBackend  # noqa: E402
from nnethics.prompts import load_prompts  # noqa: E402

BUILTIN_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
LLAMA_70B = {  # meta-llama/Llama-3.1-70B-Instruct's config.json, the fields that set shapes
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
}


class _Dropped(Exception):
    """Raised instead of sending a request (``--shape 70b``)."""


def _table(rows: list[tuple], header: tuple) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def loopback(pairs: int, batch: int, analyses: list[str], store: Path, folder: Path | None = None,
             repo: str = BUILTIN_REPO, label: str = "SmolLM2-135M") -> list[tuple]:
    from ndif_server import ServerProcess
    from nnsight.modeling.huggingface import _ID_CACHE

    folder = folder or ensure_cached(progress=True)
    server = ServerProcess({repo: folder}, log=store / "server.log", max_seconds=3600)
    try:
        os.environ["NDIF_HOST"] = server.url
        _ID_CACHE[str(folder)] = repo
        handle = load_model(str(folder), remote=True)
        prompts = load_prompts(ROOT / "prompts").subset(limit=pairs)
        rows = []
        runs = [(name, name, {}) for name in analyses]
        lens = find_cached_lens(handle)
        if "lens" in analyses and lens is not None:  # the tuned lens only when asked (remote)
            runs.append(("lens --tuned-lens", "lens", {"tuned_lens": str(lens)}))
        for name, analysis, chosen in runs:
            STATS.reset()
            ctx = make_context(handle, prompts)
            options = ANALYSES[analysis].make_options(analysis, labels=ctx.labels, **chosen)
            run_one(analysis, handle, prompts, str(store / name.replace(" ", "")), ctx, batch_size=batch,
                    progress=False, options=options)
            t = STATS.totals()
            rows.append((f"{label} ({handle.n_layers} x {handle.d_model}, {handle.dtype})", name, f"{pairs}, {batch}",
                         t["requests"], f"{t['bytes_sent'] / 1024 / pairs:.1f}",
                         f"{t['bytes_received'] / 1024 / pairs:.1f}"))
            print(rows[-1], flush=True)
        if len(analyses) > 1:  # the same analyses as ONE run: one shared trace, one request per chunk
            STATS.reset()
            run_all(handle, prompts, str(store / "fused"), analyses, batch_size=batch, progress=False)
            t = STATS.totals()
            rows.append((f"{label} ({handle.n_layers} x {handle.d_model}, {handle.dtype})",
                         f"run (fused: {'+'.join(analyses)})", f"{pairs}, {batch}", t["requests"],
                         f"{t['bytes_sent'] / 1024 / pairs:.1f}", f"{t['bytes_received'] / 1024 / pairs:.1f}"))
            print(rows[-1], flush=True)
    finally:
        server.stop()
    return rows


def results_70b(pairs: int, batch: int, analyses: list[str], store: Path) -> list[tuple]:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(ensure_cached())
    config = LlamaConfig(**{**LLAMA_70B, "hidden_size": 256, "head_dim": 4, "intermediate_size": 64,
                            "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                            "eos_token_id": tokenizer.eos_token_id})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    folder = store / "llama-70b-results"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return loopback(pairs, batch, analyses, store, folder, "bench/llama-70b-result-shape", "70B result shape")


def shape_70b(pairs: int, batch: int, analyses: list[str], store: Path) -> list[tuple]:
    import json

    from nnsight.modeling.huggingface import _ID_CACHE
    from transformers import AutoTokenizer

    folder = store / "llama-70b-shape"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(LLAMA_70B))
    AutoTokenizer.from_pretrained(ensure_cached()).save_pretrained(folder)  # any tokenizer: ids < vocab_size
    _ID_CACHE[str(folder)] = "meta-llama/Llama-3.1-70B-Instruct"
    sizes: list[int] = []

    def drop(self, request, blob, record):  # noqa: ARG001 - NdifBackend._with_retries' signature
        record.bytes_sent = len(blob) + len(request.model_dump_json())
        sizes.append(record.bytes_sent)
        raise _Dropped

    NdifBackend._with_retries = drop
    os.environ.setdefault("NDIF_HOST", "http://127.0.0.1:9")  # never contacted
    handle = load_model(str(folder), remote=True)
    prompts = load_prompts(ROOT / "prompts").subset(limit=batch)
    rows = []
    for name in analyses:
        sizes.clear()
        ctx = make_context(handle, prompts)
        try:
            run_one(name, handle, prompts, str(store / "shape"), ctx, batch_size=batch, progress=False)
        except _Dropped:
            pass
        rows.append(("Llama-3.1-70B shape (80 x 8192, bf16)", name, f"{batch}, {batch}", "1 (first)",
                     f"{sizes[0] / 1024 / batch:.1f}" if sizes else "?", "–"))
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--analyses", default=",".join((*default_names(), "heads")))  # heads: opt-in, counted too
    ap.add_argument("--shape", choices=["builtin", "70b", "70b-results"], default="builtin")
    args = ap.parse_args()
    analyses = [a for a in args.analyses.split(",") if a]
    unknown = [a for a in analyses if a not in ANALYSES]
    if unknown:
        ap.error(f"unknown analyses {unknown}; choose from {', '.join(ANALYSES)}")
    with tempfile.TemporaryDirectory() as tmp:
        run = {"builtin": loopback, "70b": shape_70b, "70b-results": results_70b}[args.shape]
        rows = run(args.pairs, args.batch_size, analyses, Path(tmp))
    print()
    print(_table(rows, ("model (layers x width)", "analysis", "pairs, batch", "requests", "KB up / pair",
                        "KB down / pair")))


if __name__ == "__main__":
    main()

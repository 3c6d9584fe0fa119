"""Time every analysis on a Llama-3.1-8B-shaped model and check the 4-bit path: the GPU check.

(a) A randomly initialised model with Llama-3.1-8B's shapes (32 layers x 4096, 32 query / 8 key-value
    heads, MLP 14336, vocabulary 128256) in bfloat16 runs decisions, activation patching (with AtP),
    direct logit attribution and the logit lens on the shipped prompts through ``nnethics.engine``
    (chunks of ``--batch-size`` pairs, as ``nnethics run`` does). Prints seconds, pairs per second and
    peak GPU memory per analysis. Random weights make the numbers meaningless but the timings real.
(b) The built-in model loaded in 4-bit (bitsandbytes nf4) on the same device: its decisions must stay
    close to the unquantized model's and attribution's parts must still add up to the logit difference.

    .venv/bin/python scripts/bench_gpu.py                       # on a CUDA machine
    .venv/bin/python scripts/bench_gpu.py --shape tiny --device cpu --pairs 4   # a dry run of the script

Exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from nnethics.analyses import default_names  # noqa: E402
from nnethics.engine import (  # noqa: E402
    baseline_decisions,  # noqa: E402
    direct_logit_attribution,  # noqa: E402
    make_context,
    run_one,
)
from nnethics.models import load_model, wrap_model  # noqa: E402
from nnethics.models.builtin import ensure_cached  # noqa: E402
from nnethics.prompts import load_prompts  # noqa: E402

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
               max_position_embeddings=131072, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=False),
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")


def time_analyses(shape: str, device: str, dtype: torch.dtype, pairs: int, batch: int) -> bool:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(ensure_cached())
    config = LlamaConfig(**SHAPES[shape], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    t = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):  # built in place, in its dtype: 16 GB for 8B in bfloat16, no float32 copy
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _sync(device)
    n_params = sum(p.numel() for p in hf.parameters())
    print(f"{shape} model: {n_params / 1e9:.2f} B parameters, {str(dtype).removeprefix('torch.')} on {device}, "
          f"built in {time.perf_counter() - t:.1f} s", flush=True)
    model = wrap_model(hf, tokenizer, name=f"llama-3.1-{shape}-shape-random")
    prompts = load_prompts(ROOT / "prompts").subset(limit=pairs)
    print("| analysis | pairs | batch | seconds | pairs/s | peak GPU GiB |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as store:
        for name in default_names():
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            ctx = make_context(model, prompts)
            _sync(device)
            t = time.perf_counter()
            run_one(name, model, prompts, store, ctx, batch_size=batch, progress=False)
            _sync(device)
            dt = time.perf_counter() - t
            print(f"| {name} | {len(prompts.pairs)} | {batch} | {dt:.1f} | {len(prompts.pairs) / dt:.2f} | "
                  f"{_peak_gib(device):.1f} |", flush=True)
    del model, hf
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return True


def check_4bit(device: str, pairs: int) -> bool:
    chosen = list(load_prompts(ROOT / "prompts").pairs[:pairs])
    full = load_model("smollm2-135m-instruct", device=device, dtype="float32")
    want = baseline_decisions(full, chosen)["logit_diff"].values.ravel()
    del full
    quant = load_model("smollm2-135m-instruct", device=device, quantize="4bit")
    kind = type(quant.layer(0).mlp.down_proj._module).__name__
    got = baseline_decisions(quant, chosen)["logit_diff"].values.ravel()
    dla = direct_logit_attribution(quant, chosen)
    parts = (dla["diff_contribution"].sum(("layer", "component")) + dla["embed_contribution"]
             + dla["bias_contribution"] + dla["softcap_contribution"] + dla["other_layers_contribution"])
    sum_err = float(np.abs(parts - dla["logit_diff"]).max())
    heads = dla["head_contribution"].sum("head") + dla["attn_bias_contribution"]
    head_err = float(np.abs(heads - dla["diff_contribution"].sel(component="attn")).max())
    dev, r = float(np.abs(got - want).max()), float(np.corrcoef(got, want)[0, 1])
    print(f"4-bit ({kind}) on {device}: max |LD(4bit) - LD(float32)| = {dev:.3f} over {2 * len(chosen)} prompts, "
          f"r = {r:.3f}; attribution parts - logit_diff <= {sum_err:.1e}; heads + bias - attention <= {head_err:.1e}")
    ok = kind == "Linear4bit" and r > 0.9 and sum_err < 1e-3 and head_err < 1e-2
    print("4-bit check:", "OK" if ok else "FAILED")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--pairs", type=int, default=70, help="shipped pairs to time (default: all 70)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--skip-4bit", action="store_true")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device here; use --device cpu --shape tiny for a dry run of this script")
    if args.device.startswith("cuda"):
        print(torch.cuda.get_device_name(), f"torch {torch.__version__}", flush=True)
    ok = time_analyses(args.shape, args.device, getattr(torch, args.dtype), args.pairs, args.batch_size)
    if not args.skip_4bit:
        ok = check_4bit(args.device, min(args.pairs, 8)) and ok
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

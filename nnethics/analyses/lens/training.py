"""Training tuned lenses: cache a corpus' residuals once, fit every layer's translator, evaluate per layer.

:func:`train_tuned_lens` is what ``nnethics lens train`` runs: it splits the corpus into training and
held-out documents, caches the frozen model's residuals of the training tokens
(:func:`collect_residuals`), fits the translators to minimise KL(final ‖ lens) with Adam
(:func:`fit_tuned_lens`, checkpointed so an interrupted run resumes) and saves the lens with its
training record. :func:`layer_kl` measures any lenses on cached residuals. The lens classes themselves
live in :mod:`nnethics.analyses.lens.lenses`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...store.atomic import write_via_temp
from .lenses import Lens, TunedLens, Unembed, lens_cache_dir


@dataclass(frozen=True)
class TrainOptions:
    """How :func:`train_tuned_lens` trains. ``batch_tokens`` positions (drawn at random from the cached
    residuals) per step; Adam with linear warm-up over ``warmup`` of the steps, then cosine decay.
    ``matmul_dtype`` is the dtype of the unembedding matmuls while training (``auto``: bfloat16 where it
    is faster, e.g. CUDA or CPUs with bf16 units; the loss, softmax and evaluation stay in float32).
    ``chat_fraction`` of the documents are wrapped in the model's chat template (when it has one), as
    the analyses' prompts are (:func:`nnethics.data.corpus.chat_documents`)."""

    steps: int = 200
    lr: float = 1e-3
    warmup: float = 0.1
    weight_decay: float = 0.0
    batch_tokens: int = 128
    seq_len: int = 128
    train_tokens: int = 16384
    eval_tokens: int = 1024
    heldout: float = 0.1
    chat_fraction: float = 0.5
    seed: int = 0
    matmul_dtype: str = "auto"
    checkpoint_every: int = 25

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@torch.no_grad()
def collect_residuals(model: Any, windows: list[list[int]], batch_size: int = 8, progress: Any = None) -> Tensor:
    """Every layer's output at every position of ``windows`` (token-id lists), from one trace per batch.

    Returns float32 ``[n_layers, n_tokens, d]`` on the CPU (windows concatenated in order).
    """
    import nnsight

    lm, n_layers = model.lm, model.n_layers
    device = model.weights_device
    total = sum(len(w) for w in windows)
    out = torch.empty(n_layers, total, model.d_model, dtype=torch.float32)
    at = 0
    groups: dict[int, list[list[int]]] = {}
    for w in windows:  # equal-length windows batch without padding
        groups.setdefault(len(w), []).append(w)
    for ws in groups.values():
        for i in range(0, len(ws), batch_size):
            ids = torch.tensor(ws[i:i + batch_size], dtype=torch.long, device=device)
            with model.trace({"input_ids": ids, "attention_mask": torch.ones_like(ids)}):
                hs = nnsight.save([])
                for layer in lm.model.layers:
                    o = layer.output
                    hs.append((o[0] if isinstance(o, tuple) else o).clone())
            n = ids.numel()
            out[:, at:at + n] = torch.stack([h.float().cpu().reshape(n, -1) for h in hs])
            at += n
            if progress is not None:
                progress.update(len(ids))
    return out


def _matmul_dtype(name: str, unembed: Unembed) -> torch.dtype:
    if name != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]
    w = unembed.weight(torch.float32)
    if w.is_cuda:
        return torch.bfloat16
    import time

    x = torch.randn(256, w.shape[1])
    timings = {}
    for dt in (torch.float32, torch.bfloat16):
        xw, ww = x.to(dt), unembed.weight(dt)
        xw @ ww.T  # warm-up
        t0 = time.perf_counter()
        xw @ ww.T
        timings[dt] = time.perf_counter() - t0
    return torch.bfloat16 if timings[torch.bfloat16] < 0.7 * timings[torch.float32] else torch.float32


def _lr_factor(step: int, options: TrainOptions) -> float:
    warm = max(1, round(options.warmup * options.steps))
    if step < warm:
        return (step + 1) / warm
    frac = (step - warm) / max(1, options.steps - warm)
    return 0.5 * (1 + np.cos(np.pi * min(1.0, frac)))


@torch.no_grad()
def _kl_and_grad(n: Tensor, p: Tensor, p_w: Tensor, p_b: Any, neg_entropy: Tensor, unembed: Unembed,
                 dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """KL(p ‖ softmax(unembed(n))) per row of post-norm states ``n [B, d]``, and the gradient of its mean
    with respect to ``n``.

    The gradient with respect to the logits is ``softmax(z) - p``; it goes through the frozen unembedding by
    hand, so no ``[B, V]`` autograd graph is kept. ``p_w = p @ W`` and ``p_b = p · bias`` make Σ p·z a
    ``[B, d]`` dot product when there is no soft-cap.
    """
    cap, w = unembed.softcap, unembed.weight(dtype)
    z = n.to(dtype) @ w.T
    if unembed._bias is not None:
        z += unembed._bias.to(dtype)
    if cap:
        z = torch.tanh(z.float() / cap) * cap
        p_z = (p * z).sum(-1)
    else:
        p_z = (n.float() * p_w).sum(-1) + p_b
    z_max, at = z.max(-1, keepdim=True)
    q = torch.softmax(z, -1, dtype=torch.float32)
    lse = (z_max.float() - q.gather(-1, at).log()).squeeze(-1)  # log-sum-exp from the softmax's max entry
    grad = q.sub_(p)
    if cap:  # z = cap·tanh(u/cap): dz/du = 1 - (z/cap)²
        grad.mul_(1 - (z / cap) ** 2)
    return neg_entropy - p_z + lse, (grad.to(dtype) @ w).to(n.dtype) / len(n)


def _optimizer(trained: list, options: TrainOptions) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the translators' parameters and its warm-up/decay schedule."""
    params = [p for t in trained for p in t.parameters()]
    try:  # the fused kernel is ~7x faster than the per-parameter loop on CPU
        opt = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay, fused=True)
    except (RuntimeError, ValueError):
        opt = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, options))


def fit_tuned_lens(lens: TunedLens, unembed: Unembed, resid: Tensor, options: TrainOptions = TrainOptions(), *,
                   state: dict | None = None, on_checkpoint: Any = None, progress: Any = None) -> list[float]:
    """Train ``lens``'s translators in place on cached residuals ``resid [n_layers, n_tokens, d]``.

    Each step draws ``batch_tokens`` positions, computes the final distribution p from the last layer's
    output, and for every other layer minimises KL(p ‖ softmax(unembed(h + A h + b))). The gradient of
    the KL with respect to the lens logits is ``softmax(z) - p``; it is pushed through the (frozen)
    unembedding by hand so no ``[tokens, V]`` autograd graph is kept. ``state`` (from a checkpoint)
    resumes; ``on_checkpoint(state)`` is called every ``checkpoint_every`` steps and at the end.
    Returns the mean KL (nats, averaged over layers) of every step run.
    """
    n_layers, n_tokens, _ = resid.shape
    dtype = _matmul_dtype(options.matmul_dtype, unembed)
    trained = list(lens.layer_translators[1:])
    opt, sched = _optimizer(trained, options)
    start = 0
    if state is not None:
        lens.layer_translators.load_state_dict(state["translators"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = int(state["step"])
    w32, bias = unembed.weight(torch.float32), unembed._bias
    history: list[float] = []

    def snapshot(step: int) -> dict:
        return {"step": step, "translators": lens.layer_translators.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict()}

    for step in range(start, options.steps):
        gen = torch.Generator().manual_seed(options.seed * 1_000_003 + step)  # resumable without RNG state
        idx = torch.randint(n_tokens, (options.batch_tokens,), generator=gen)
        hs = resid[:, idx].to(w32.device)
        with torch.no_grad():
            log_p = unembed(hs[-1]).log_softmax(-1)
            p = log_p.exp()
            neg_entropy = (p * log_p).sum(-1)
            p_w = p @ w32  # Σ_v p_v W_v: without a soft-cap, Σ_v p_v z_v = n · p_w (+ p · bias)
            p_b = p @ bias.float() if bias is not None else 0.0
        # all translators at once (few small ops), then one unembedding per layer, then one backward
        weight = torch.stack([t.weight for t in trained])  # [L-1, d, d]
        x = hs[:-1] + torch.bmm(hs[:-1], weight.transpose(1, 2))
        if lens.config.bias:
            x = x + torch.stack([t.bias for t in trained])[:, None, :]
        n = unembed.norm(x)
        grad_n, kls = torch.empty_like(n), []
        for layer in range(n_layers - 1):
            kl, grad_n[layer] = _kl_and_grad(n[layer].detach(), p, p_w, p_b, neg_entropy, unembed, dtype)
            kls.append(float(kl.mean()))
        n.backward(grad_n)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        history.append(float(np.mean(kls)))
        if progress is not None:
            progress.update(1)
            progress.set_postfix(kl=f"{history[-1]:.3f}", refresh=False)
        done = step + 1
        if on_checkpoint is not None and (done % max(1, options.checkpoint_every) == 0 or done == options.steps):
            on_checkpoint(snapshot(done))
    return history


@torch.no_grad()
def layer_kl(unembed: Unembed, resid: Tensor, lenses: dict[str, Lens], chunk: int = 256) -> dict[str, dict[str, Tensor]]:
    """Held-out fit of each lens, per layer, in float32: ``{name: {"kl": [L], "top1": [L]}}``.

    ``kl`` is the mean over positions of KL(final ‖ lens) in nats; ``top1`` the fraction of positions where
    the lens' argmax token is the model's final argmax token.
    """
    n_layers, n_tokens, _ = resid.shape
    for lens in lenses.values():
        lens.to(unembed._weight.device)
    sums = {name: {"kl": torch.zeros(n_layers, dtype=torch.float64), "top1": torch.zeros(n_layers, dtype=torch.float64)}
            for name in lenses}
    for start in range(0, n_tokens, chunk):
        hs = resid[:, start:start + chunk].to(unembed._weight.device)
        log_p = unembed(hs[-1]).log_softmax(-1)
        p, final_top = log_p.exp(), log_p.argmax(-1)
        for name, lens in lenses.items():
            for layer in range(n_layers):
                log_q = unembed(lens.transform(hs[layer], layer)).log_softmax(-1)
                sums[name]["kl"][layer] += (p * (log_p - log_q)).sum(-1).clamp_min(0).sum().double().cpu()
                sums[name]["top1"][layer] += (log_q.argmax(-1) == final_top).sum().double().cpu()
    return {name: {k: (v / n_tokens).float() for k, v in d.items()} for name, d in sums.items()}


def train_tuned_lens(model: Any, corpus: list[str | Path] | None = None, options: TrainOptions = TrainOptions(), *,
                     out: str | Path | None = None, progress: bool | None = None, resume: bool = True,
                     log: Any = None) -> tuple[TunedLens, dict]:
    """Train a tuned lens for ``model`` on ``corpus`` (text files; default: the shipped corpus) and save it.

    The corpus is split into training and held-out documents (``options.heldout``); the residuals of
    ``options.train_tokens`` training tokens are cached once, then :func:`fit_tuned_lens` runs. A
    checkpoint in ``out`` (default :func:`lens_cache_dir`) makes an interrupted run resumable. Returns the
    lens and a dict with timings and the loss history; the held-out split is recorded in the lens config
    so that ``nnethics lens eval`` evaluates on exactly the held-out documents.
    """
    import sys
    import time

    from ...data.corpus import chat_documents, read_documents, split_documents, token_windows
    from ...progress import progress_bar

    say = log or (lambda msg: print(msg, file=sys.stderr))
    show = progress
    out = Path(out) if out is not None else lens_cache_dir(model.slug)
    unembed = Unembed.from_model(model)
    lens = TunedLens.from_model(model).to(unembed._weight.device)
    files = [str(Path(f).expanduser().resolve()) for f in corpus] if corpus else []
    docs, corpus_sha = read_documents(files or None)
    train_docs, _ = split_documents(docs, options.heldout, options.seed)
    key = hashlib.sha256(json.dumps([options.to_dict(), corpus_sha, lens.config.unembed_sha256]).encode()).hexdigest()
    ckpt_file, state = out / "checkpoint.pt", None
    if resume and ckpt_file.exists():
        saved = torch.load(ckpt_file, map_location="cpu", weights_only=False)
        if saved.get("key") == key:
            state = saved
            say(f"resuming from {ckpt_file} at step {state['step']}/{options.steps}")
        else:
            say(f"{ckpt_file} was made with other options, corpus or model: starting over")
    t0 = time.perf_counter()
    train_docs = chat_documents(model.tokenizer, train_docs, options.chat_fraction, options.seed)
    windows = token_windows(model.tokenizer, train_docs, options.seq_len, options.train_tokens)
    with progress_bar(len(windows), "caching residuals", unit="windows", show=show) as bar:
        resid = collect_residuals(model, windows, progress=bar)
    t_cache = time.perf_counter() - t0

    def checkpoint(snap: dict) -> None:
        out.mkdir(parents=True, exist_ok=True)
        write_via_temp(ckpt_file, lambda tmp: torch.save({**snap, "key": key}, tmp))

    t1 = time.perf_counter()
    with progress_bar(options.steps, "training tuned lens", unit="steps", show=show,
                      initial=state["step"] if state else 0) as bar:
        history = fit_tuned_lens(lens, unembed, resid, options, state=state, on_checkpoint=checkpoint, progress=bar)
    t_train = time.perf_counter() - t1
    info = {"options": options.to_dict(), "corpus_files": files, "corpus_sha256": corpus_sha,
            "n_train_tokens": int(resid.shape[1]), "n_documents": len(docs), "cache_seconds": round(t_cache, 1),
            "train_seconds": round(t_train, 1), "final_train_kl": history[-1] if history else None}
    lens.config.training = info
    lens.cpu().save(out)
    ckpt_file.unlink(missing_ok=True)
    return lens, {**info, "history": history, "path": str(out)}

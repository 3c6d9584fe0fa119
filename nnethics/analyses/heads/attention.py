"""The attention of the top heads at the decision position (torch loads here).

Which heads are the top ones is known only across all prompts, so each chunk's session
(:func:`.heads_engine.execute`) guesses: once its patched rows are done, :func:`rank_candidates` ranks the heads
by |mean effect| over the prompts so far (the previous chunks' sums, sent along, plus this chunk's effects),
ties by |DLA|, and :func:`chunk_candidates` brings back the attention of the top ``count`` candidates from one
forward of the base and cf rows with transformers' eager attention (:class:`eager_attention`) over the chunk's
prefix: ``2 x candidates x tokens`` floats per pair, in the chunk's one request. Once
:func:`~nnethics.analyses.heads.finalize` has chosen the top heads, :func:`.candidates.assemble` takes
their attention from the candidates; only for the prompts whose candidates miss a chosen head does
:func:`top_attention` (the fallback of the ``complete`` pass) run one session per chunk of pairs: the prefix on
the KV path (as ``execute`` makes it) and the same eager forward, for the chosen heads. Both are the same
forward over the same prefix and padding, so both give the same bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...models.adapters import get_path
from ...models.errors import halving
from ...prompts import PromptPair
from ..attribution.trace import Projections, project
from ..common import encode_pairs
from ..patching.engine import Row, inputs_full, run_prefix
from ..prefix_cache import Prefix, inputs_token, shared_attention

if TYPE_CHECKING:
    from .results import HeadsOptions


def side_inputs(enc: Any, n: int, prefix: Prefix | None, shared: bool = False) -> tuple[dict, bool | None]:
    """Inputs of the rows ``[base..., cf...]`` (one token over the prefix cache, or full; ``shared``: for
    :func:`.prefix_cache.shared_prefix_attention`)."""
    seqs = list(range(2 * n))
    if prefix is not None:
        rows = [prefix.index[(s, None)] for s in seqs]
        return inputs_token(enc, seqs, prefix.width, prefix.cache, rows, shared), None
    return inputs_full(enc, seqs)[0], False


class _Reads:
    """The state trace's own reads, made through :func:`..attribution.trace.project`'s ``tap`` so that they come in
    forward order between the projection's: the layer-0 input made a graph leaf (AtP), then per layer the o_proj
    input (``z``), the attention weights and the layer's output."""

    def __init__(self, model: Any, atp: bool):
        L = model.n_layers
        self.layers = [model.layer(i) for i in range(L)]
        self.projs = [model.o_proj(i) for i in range(L)]
        self.attns = [attention_module(model, i) for i in range(L)]
        self.atp = atp
        self.zs, self.ws, self.outs = [], [], []

    def __call__(self, i: int, where: str) -> None:
        if where == "input":
            if self.atp:
                x = self.layers[0].inputs[0][0]
                if not x.requires_grad:  # frozen parameters: make the graph start at the layer-0 input
                    x.requires_grad_(True)
        elif where == "z":
            self.zs.append(self.projs[i].input)
        elif where == "attn":
            self.ws.append(self.attns[i].output[1][:, :, -1].detach().float())
        elif where == "layer":
            o = self.layers[i].output
            self.outs.append((o[0] if isinstance(o, tuple) else o)[:, -1].detach())


def _trace_state(model: Any, inputs: dict, n: int, ids: tuple[int, int], atp: bool) -> tuple:
    """Rows ``[base_0..base_{n-1}, cf_0..cf_{n-1}]``, one token over the prefix cache under
    :class:`~.prefix_cache.shared_attention` with weights, in one forward (and one backward with ``atp``): the LD per
    row ``[2n]``; every layer's output ``[2n, L, d]`` and o_proj input (the heads' ``z``) ``[2n, L, H * d_head]`` at
    the last position, which the block forwards read; every head's attention weights from the last position
    ``[2n, L, H, keys]``; with ``atp`` ``(z_cf - z_base) . dLD(base)/dz`` per head ``[L, n, H]`` (else None); and
    the heads' DLA projections (:func:`..attribution.trace.project`, as ``collect`` brings them). All left where the
    model is (remotely: on the server, in the chunk's session)."""
    a, b = ids
    H = model.n_heads
    reads = _Reads(model, atp)
    est = None  # (set inside the trace, nnsight would not hand a None back)
    with (torch.enable_grad() if atp else torch.no_grad()), model.trace(inputs, logits_to_keep=1):
        got = project(model, 2 * n, list(ids), True, None, False, adhoc_logits=False, tap=reads)
        resid = torch.stack(reads.outs, dim=1).clone().save()
        z = torch.stack([t[:, -1].detach() for t in reads.zs], dim=1).clone().save()
        weights = torch.stack(reads.ws, dim=1).clone().save()
        logits = model.lm.output.logits[:, -1]
        ld_rows = logits[:, a].float() - logits[:, b].float()
        ld = ld_rows.detach().clone().save()
        if atp:
            grads = torch.autograd.grad(ld_rows[:n].sum(), reads.zs, allow_unused=True)
            est = atp_terms(reads.zs, grads, n, H).save()
    return ld, resid, z, weights, est, Projections(**got)


def atp_terms(zs: list, grads: Sequence, n: int, n_heads: int) -> torch.Tensor:
    """Inside a trace, for rows ``[base_0..base_{n-1}, cf_0..cf_{n-1}]``: ``(z_cf - z_base) . dLD(base)/dz`` per
    head at the last position, ``[L, n, H]`` (detached), from each layer's o_proj input ``zs`` and its gradient
    (None: the layer does not reach the LD, 0). Both paths' AtP (:func:`_trace_state`, and
    :func:`.heads_engine._trace_atp` on full forwards)."""
    est = []
    for z, g in zip(zs, grads):
        zl = z[:, -1].float().reshape(z.shape[0], n_heads, -1)
        if g is None:
            est.append(torch.zeros(n, n_heads, device=zl.device))
        else:
            est.append(((zl[n:] - zl[:n]) * g[:n, -1].float().reshape(n, n_heads, -1)).sum(-1))
    return torch.stack(est).detach().clone()


def side_state(model: Any, enc: Any, n: int, prefix: Prefix, ids: tuple[int, int], atp: bool) -> tuple:
    """:func:`_trace_state` of the base and cf rows over ``prefix`` (the chunk's state and the fallback's
    attention: the same forward, so the same bits)."""
    with shared_attention(model, weights=True):
        return _trace_state(model, side_inputs(enc, n, prefix, shared=True)[0], n, ids, atp)


def attention_module(model: Any, layer: int) -> Any:
    """The envoy of layer ``layer``'s attention block (the parent of the adapter's ``o_proj``)."""
    parent = model.adapter.o_proj.rsplit(".", 1)[0]
    return get_path(model.layer(layer), parent)


class eager_attention:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Switch the model to transformers' eager attention for one trace, so that every attention block returns
    its weights (``output[1]``, ``[N, H, q, k]``, query heads), then switch back. It runs where
    :func:`top_attention`'s session runs: locally, or inside the remote session (the model there is the
    server's)."""

    def __init__(self, model: Any):
        self.config = model.lm._module.config
        self.old = None

    def __enter__(self):
        self.old = self.config._attn_implementation
        self.config._attn_implementation = "eager"
        return self

    def __exit__(self, *exc):
        self.config._attn_implementation = self.old
        return False


def _trace_attention(model: Any, inputs: dict, attns: list, heads: list[list[int]],
                     use_cache: bool | None) -> torch.Tensor:
    """The eager attention weights of the last position to every key for the heads ``heads[i]`` of the attention
    module ``attns[i]`` (modules in layer order): ``[N, sum of len(heads[i]), keys]`` (float32), in that order.
    Only these come back: nothing else leaves the trace."""
    kw = {} if use_cache is None else {"use_cache": use_cache}
    with torch.no_grad(), model.trace(inputs, logits_to_keep=1, **kw):
        got = [m.output[1][:, hs, -1].detach().float() for m, hs in zip(attns, heads)]
        weights = torch.cat(got, dim=1).cpu().save()
    return weights


def eager_weights(model: Any, enc: Any, n: int, prefix: Prefix | None, layers: list[int],
                  heads: list[list[int]]) -> Any:
    """One eager forward of the base and cf rows (over ``prefix``, or full); the weights of ``heads[i]`` of layer
    ``layers[i]``, ``[2n, heads, keys]`` (the candidates' and the fallback's one forward)."""
    inputs, use_cache = side_inputs(enc, n, prefix)
    with eager_attention(model):
        return _trace_attention(model, inputs, [attention_module(model, la) for la in layers], heads, use_cache)


def _attention_session(model: Any, enc: Any, groups: list[list[Row]], n: int, use_kv: bool, layers: list[int],
                       heads: list[list[int]], ids: tuple[int, int], atp: bool) -> Any:
    """One session of the fallback pass, the forward the chunk's candidates came from: on the KV path the prefix
    and :func:`side_state` (as :func:`.heads_engine.execute` runs them, AtP included: the same bits), else
    :func:`eager_weights`. Returns ``[2n, heads, keys]`` in the order of ``layers``/``heads``."""
    if not use_kv:
        return eager_weights(model, enc, n, None, layers, heads)
    every = side_state(model, enc, n, run_prefix(model, enc, groups), ids, atp)[3]
    return pick(every, [(la, h) for la, hs in zip(layers, heads) for h in hs])


def rank_candidates(patched: Any, sides: Any, dla: Any, job: dict) -> list[tuple[int, int]]:
    """Inside a chunk's session (remote-safe: NumPy only): the ``job["count"]`` (layer, head)s with the largest
    |mean effect| over the prompts so far, ties by the larger sum of |DLA|, then by (layer, head); sorted by
    (layer, head), the trace's order. ``patched [n, L, H]`` (or ``[n][L * H]``), ``sides [2n]`` (base rows, then cf), ``dla [2n, L,
    H]`` are this chunk's; ``job`` holds the previous chunks' ``effect_sum``, ``effect_count``, ``dla_sum``
    ``[L, H]`` and ``min_gap``. The effect is :func:`nnethics.metrics.normalized_effect`'s formula with its
    ``min_gap`` test; a guess, so its float order need not be the file's."""
    L, H = np.shape(job["effect_sum"])
    p = np.asarray(patched, dtype=np.float64).reshape(-1, L, H)
    n = p.shape[0]
    s = np.asarray(sides.cpu().tolist() if hasattr(sides, "cpu") else sides, dtype=np.float64)
    gap = s[n:] - s[:n]
    ok = np.abs(gap) >= job["min_gap"]
    eff = (p[ok] - s[:n][ok, None, None]) / gap[ok, None, None]
    finite = np.isfinite(eff)
    total = np.asarray(job["effect_sum"], dtype=np.float64) + np.where(finite, eff, 0.0).sum(0)
    count = np.asarray(job["effect_count"], dtype=np.float64) + finite.sum(0)
    score = np.where(count > 0, np.abs(total) / np.maximum(count, 1.0), -1.0)
    d = np.abs(np.asarray(dla.detach().float().cpu().numpy() if hasattr(dla, "detach") else dla, dtype=np.float64))
    tie = np.asarray(job["dla_sum"], dtype=np.float64) + d.reshape(-1, L, H).sum(0)
    order = sorted(((la, h) for la in range(L) for h in range(H)), key=lambda c: (-score[c], -tie[c], c))
    return sorted(order[:int(job["count"])])


def chunk_candidates(model: Any, enc: Any, n: int, prefix: Prefix | None, patched: Any, sides: Any, dla: Any,
                     job: dict, every: Any = None) -> tuple[list[tuple[int, int]], Any]:
    """Inside a chunk's session, after its patched rows: the candidates (:func:`rank_candidates`) and their
    weights ``[2n, candidates, keys]``: on the KV path taken from ``every`` head's (:func:`side_state`'s, the
    fallback's forward), on full forwards from :func:`eager_weights` (the fallback's there)."""
    chosen = rank_candidates(patched, sides, dla, job)
    if every is not None:
        return chosen, pick(every, chosen)
    layers = sorted({la for la, _ in chosen})
    heads = [[h for la2, h in chosen if la2 == la] for la in layers]
    return chosen, eager_weights(model, enc, n, prefix, layers, heads)


def pick(every: Any, chosen: Sequence[tuple[int, int]]) -> Any:
    """``every [N, L, H, keys]`` at the (layer, head)s ``chosen``, in that order: ``[N, len(chosen), keys]`` on the
    CPU (inside a session: only these come back)."""
    la = torch.tensor([int(c[0]) for c in chosen], device=every.device)
    h = torch.tensor([int(c[1]) for c in chosen], device=every.device)
    return every[:, la, h].cpu()


def _plan(model: Any, pairs: list[PromptPair], options: HeadsOptions, label_ids: Sequence[int] | None,
          chosen: Sequence[tuple[int, int]], use_kv: bool) -> tuple:
    """The arguments of :func:`_attention_session` for one chunk: its rows encoded as the chunk's were."""
    batch = encode_pairs(model, pairs, list(options.labels), options.chat, label_ids)
    layers = sorted({la for la, _ in chosen})
    heads = [[h for la2, h in chosen if la2 == la] for la in layers]
    groups = [[Row(batch.row(i, "cf")), Row(batch.row(i, "base"))] for i in range(batch.n)]
    ids = (batch.label_ids[0], batch.label_ids[1])
    return batch.encoded, groups, batch.n, use_kv, layers, heads, ids, bool(options.atp)


def _ordered(weights: Any, plan: tuple, chosen: Sequence[tuple[int, int]]) -> np.ndarray:
    """A chunk's weights (the trace's order: by layer) as ``[pair, side, rank, token]`` in ``chosen``'s order."""
    enc, _, n, _, layers, heads, *_ = plan
    flat = [(la, h) for la, hs in zip(layers, heads) for h in hs]
    rank = [flat.index(tuple(c)) for c in chosen]
    return right_aligned(weights.numpy()[:, rank], [enc.lengths[r] for r in range(2 * n)], n)


def _sessions(model: Any, plans: list[tuple]) -> list[Any]:
    """Several chunks' :func:`_attention_session`, one after the other in one session (one request remotely)."""
    return [_attention_session(model, *plan) for plan in plans]


def fallback_attention(model: Any, chunks: Sequence[tuple[list[PromptPair], list[tuple[int, int]], bool]],
                       options: HeadsOptions, label_ids: Sequence[int] | None) -> list[np.ndarray]:
    """:func:`top_attention` of each ``(pairs, chosen, use_kv)`` chunk, all in ONE session (one request remotely,
    each chunk still encoded and run as its own, so the same bits); on out-of-memory, half as many chunks per
    session (:func:`~nnethics.models.errors.halving`), down to one chunk, which :func:`top_attention` halves."""
    out: list[np.ndarray] = []

    def rest(size: int) -> None:
        while len(out) < len(chunks):
            part = chunks[len(out):len(out) + size]
            if len(part) == 1:
                pairs, chosen, kv = part[0]
                out.append(top_attention(model, pairs, options, label_ids, chosen, kv))
                continue
            plans = [_plan(model, list(pairs), options, label_ids, chosen, kv) for pairs, chosen, kv in part]
            got = model.session(_sessions, plans)
            out.extend(_ordered(w, plan, chosen) for w, plan, (_, chosen, _) in zip(got, plans, part))

    halving(len(chunks), rest)
    return out


def top_attention(model: Any, pairs: Sequence[PromptPair], options: HeadsOptions, label_ids: Sequence[int] | None,
                  chosen: Sequence[tuple[int, int]], use_kv: bool) -> np.ndarray:
    """The attention weights of the decision position to every token for the ``chosen`` (layer, head)s, in their
    order: ``[pair, side, rank, token]`` (token 0 = the first prompt token, NaN padding), for one chunk of pairs in
    one session, over the same inputs as the chunk's :func:`.heads_engine.execute` (on the KV path one token over
    the prefix cache); on out-of-memory, in parts of half as many pairs (:func:`~nnethics.models.errors.halving`),
    their token widths padded to the widest with NaN."""
    pairs = list(pairs)
    parts: list[np.ndarray] = []
    done = [0]

    def rest(size: int) -> None:
        while done[0] < len(pairs):
            part = pairs[done[0]:done[0] + size]
            plan = _plan(model, part, options, label_ids, chosen, use_kv)
            parts.append(_ordered(model.session(_attention_session, *plan), plan, chosen))
            done[0] += len(part)

    halving(len(pairs), rest)
    if len(parts) == 1:
        return parts[0]
    width = max(h.shape[-1] for h in parts)
    return np.concatenate([np.pad(h, [(0, 0)] * 3 + [(0, width - h.shape[-1])], constant_values=np.nan)
                           for h in parts])


def right_aligned(weights: np.ndarray, lengths: list[int], n: int) -> np.ndarray:
    """``[2n, ..., keys]`` (rows ``[base..., cf...]``, left-padded keys) -> ``[n, side, ..., token]`` with token 0
    the first prompt token (padded at the end with NaN, as ``input_ids`` are with -1)."""
    width = max(lengths)
    out = np.full((n, 2, *weights.shape[1:-1], width), np.nan, dtype=np.float32)
    for row, length in enumerate(lengths):
        out[row % n, row // n, ..., :length] = weights[row, ..., -length:]
    return out

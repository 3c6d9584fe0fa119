"""The computation of per-head activation patching for one chunk of pairs (torch and nnsight load here).

A patched head is the slice ``[h*dh:(h+1)*dh]`` of ``o_proj``'s input (TransformerLens' ``z``; query heads for
GQA models) at the decision position, copied from the counterfactual.

KV-cache path, per chunk, every forward inside one :meth:`~nnethics.models.handle.ModelHandle.session` (one
request remotely): the prefix (:func:`..patching.engine.run_prefix`); one forward of the base and cf rows
(:func:`.attention.side_state`: their LDs, every layer's output and ``z`` at the last position, every head's
attention weights there, the heads' DLA projections, and with AtP one backward: ``(z_cf - z_base) . dLD/dz`` per
head); then the ``L x H`` patched rows per pair, one token each over the prefix cache, in layer blocks
(:func:`run_blocks`: a row patched in block k skips the layers before the block, starting from the base row's
state there; its head gets the cf row's ``z`` from the side forward); then the candidates' attention is picked
from every head's (:func:`.attention.chunk_candidates`). Full path (``kv_cache="off"``): rows ``[cf, base,
base with head (l, h) patched, ...]`` per pair as full forwards (:func:`run_rows`), AtP, DLA and the candidates'
eager attention in traces of their own. The ``complete`` pass takes the top heads' attention from the candidates
once ``finalize`` has chosen the heads across all prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import xarray as xr

from ...models.errors import halving
from ...prompts import PromptPair
from ..attribution.trace import collect, contributions
from ..common import encode_pairs
from ..decisions import decoded_tokens, prompt_tokens
from ..patching.engine import Patch, Row, each_forward, inputs_full, kv_possible, run_prefix
from ..prefix_cache import Prefix, inputs_token, shared_attention
from . import candidates
from .attention import atp_terms, chunk_candidates, right_aligned, side_inputs, side_state
from .results import HeadsOptions, build_dataset

if TYPE_CHECKING:
    from .candidates import RunningRank

BLOCKS = 6  # layer blocks of the KV path: a row patched in block k skips the layers before the block


# ---------------------------------------------------------------------------------------------
# trace bodies (remote-safe: envoys, ints, lists; tensors created inside the trace)


def copy_heads(projs: dict, patches: dict, n_heads: int) -> None:
    """Inside a trace: for each layer in ``patches[layer] = (rows, source rows, heads)``, copy those heads' slice of
    o_proj's input at the last position from the source rows (both head-patching forwards use it)."""
    import torch

    for layer in sorted(patches):
        z = projs[layer].input
        rows, srcs, heads = patches[layer]
        zh = z.view(z.shape[0], z.shape[1], n_heads, -1)
        r = torch.tensor(rows, device=z.device)
        s = torch.tensor(srcs, device=z.device)
        h = torch.tensor(heads, device=z.device)
        zh[r, -1, h] = zh[s, -1, h]


def _trace_heads(model: Any, inputs: dict, projs: dict, patches: dict, n_heads: int, ids: tuple[int, int],
                 use_cache: bool | None) -> torch.Tensor:
    """One forward of a batch of rows; ``patches[layer] = (rows, src rows, heads)``: the head slice of o_proj's
    input at the last position is copied from the source row. Returns the LD per row."""
    a, b = ids
    kw = {} if use_cache is None else {"use_cache": use_cache}
    with torch.no_grad(), model.trace(inputs, logits_to_keep=1, **kw):
        copy_heads(projs, patches, n_heads)
        logits = model.lm.output.logits[:, -1]
        ld = (logits[:, a].float() - logits[:, b].float()).save()
    return ld


def _trace_atp(model: Any, inputs: dict, projs: list, n: int, n_heads: int, ids: tuple[int, int],
               use_cache: bool | None) -> torch.Tensor:
    """Rows ``[base_0..base_{n-1}, cf_0..cf_{n-1}]``: ``(z_cf - z_base) . dLD(base)/dz`` per head at the last
    position, ``[L, n, H]``, from one forward and one backward."""
    a, b = ids
    kw = {} if use_cache is None else {"use_cache": use_cache}
    with torch.enable_grad(), model.trace(inputs, logits_to_keep=1, **kw):
        x = model.lm.model.layers[0].inputs[0][0]
        if not x.requires_grad:  # frozen parameters: make the graph start at the layer-0 input
            x.requires_grad_(True)
        zs = [p.input for p in projs]
        logits = model.lm.output.logits[:, -1]
        ld = logits[:, a].float() - logits[:, b].float()
        grads = torch.autograd.grad(ld[:n].sum(), zs, allow_unused=True)
        atp = atp_terms(zs, grads, n, n_heads).save()
    return atp


# ---------------------------------------------------------------------------------------------
# running


def _groups(batch: Any, L: int, H: int) -> tuple[list[list[Row]], list[list[tuple[int, int]]]]:
    """Per pair: rows ``[cf, base, base patched at (l, h) ...]`` and the (layer, head) of each patched row."""
    groups, cells = [], []
    for i in range(batch.n):
        b, c = batch.row(i, "base"), batch.row(i, "cf")
        rows = [Row(c), Row(b)]
        cell = []
        for layer in range(L):
            for head in range(H):
                rows.append(Row(b, None, Patch((layer,), "z")))
                cell.append((layer, head))
        groups.append(rows)
        cells.append(cell)
    return groups, cells


def run_rows(model: Any, enc: Any, groups: list[list[Row]], cells: list[list[tuple[int, int]]],
             ids: tuple[int, int], prefix: Prefix | None, max_tokens: int) -> list[list[float]]:
    """Every row of every group (patched rows in as few forwards as ``max_tokens`` allows); the rows per
    forward halve on out-of-memory."""
    L, H = model.n_layers, model.n_heads
    projs = {layer: model.o_proj(layer) for layer in range(L)}

    def forward(chunk: list[tuple[int, int]], local: dict, seqs: list[int]) -> Any:
        patches: dict[int, tuple[list, list, list]] = {}
        for g, j in chunk:
            if j >= 2:
                layer, head = cells[g][j - 2]
                R, S, Hs = patches.setdefault(layer, ([], [], []))
                R.append(local[(g, j)])
                S.append(local[(g, 0)])
                Hs.append(head)
        if prefix is not None:
            rows_idx = [prefix.index[(s, None)] for s in seqs]
            inputs, use_cache = inputs_token(enc, seqs, prefix.width, prefix.cache, rows_idx), None
        else:
            (inputs, _), use_cache = inputs_full(enc, seqs), False
        return _trace_heads(model, inputs, {k: projs[k] for k in patches}, patches, H, ids, use_cache)

    return each_forward(enc, groups, max_tokens, prefix is not None, forward)


def execute(model: Any, enc: Any, groups, cells, ids, n: int, use_kv: bool, max_tokens: int, atp: bool,
            job: dict, prefix: Prefix | None = None) -> tuple[Any, Any, Any, Any, Any]:
    """Every forward of a chunk, in one session. KV path: the prefix (``prefix``, the chunk's shared trace's cache
    cut to it; None: a prefix forward of its own, the same bits); the base and cf rows' state
    (:func:`.attention.side_state`: LDs, the states the blocks read, every head's attention, AtP, DLA); the
    patched rows in layer blocks. Full forwards: the rows, AtP, DLA and the candidates' eager attention.
    Returns the LDs of the patched rows ``[n, L, H]`` and of the base and cf rows ``[2n]``, AtP, DLA and
    ``(candidates, their weights)`` (:func:`.attention.chunk_candidates` with ``job``)."""
    L, H = model.n_layers, model.n_heads
    every = None
    if use_kv:
        prefix = prefix if prefix is not None else run_prefix(model, enc, groups)
        sides, resid, z, every, grads, proj = side_state(model, enc, n, prefix, ids, atp)
        patched = run_blocks(model, enc, prefix, ids, n, resid, z, max_tokens)
    else:
        prefix = None
        lds = run_rows(model, enc, groups, cells, ids, None, max_tokens)
        patched = [g[2:] for g in lds]
        sides = [g[1] for g in lds] + [g[0] for g in lds]
        grads = _trace_atp(model, inputs_full(enc, list(range(2 * n)))[0], [model.o_proj(i) for i in range(L)], n,
                           H, ids, False) if atp else None
        proj = collect(model, side_inputs(enc, n, None)[0], list(ids), heads=True, per_option=False)
    dla = contributions(proj)["heads"][..., 0]
    return patched, sides, grads, dla, chunk_candidates(model, enc, n, prefix, patched, sides, dla, job, every)


# ---------------------------------------------------------------------------------------------
# the KV path in layer blocks: a row patched at layer l skips the layers before its block


def _trace_block(model: Any, inputs: dict, layers: list, start: int, resid: Any, z: Any, src: list[int],
                 projs: dict, patches: dict, n_heads: int, ids: tuple[int, int], cap: float | None) -> torch.Tensor:
    """One forward of rows (one token over the prefix cache, :func:`.prefix_cache.shared_prefix_attention`) whose
    patches are all at layers >= ``start``: layers ``0..start-1`` are skipped, their output being each row's own
    state after layer ``start-1`` (``resid[src[r], start-1]``, exact: nothing differs from the unpatched run before
    the patch); ``patches[layer] = (rows, side rows, heads)``: the head slice of o_proj's input at the last
    position is the counterfactual's, ``z[side row, layer]`` from :func:`.attention.side_state`. ``cap``: the model's
    final-logit soft-cap, if any."""
    a, b = ids
    with torch.no_grad(), model.trace(inputs, logits_to_keep=1):
        if start > 0:
            x = resid[torch.tensor(src, device=resid.device), start - 1][:, None]
            for j in range(start):
                layers[j].skip(x)
        for layer in sorted(patches):
            zin = projs[layer].input
            rows, sides, heads = patches[layer]
            zh = zin.view(zin.shape[0], zin.shape[1], n_heads, -1)
            h = torch.tensor(heads, device=zin.device)
            cf = z[torch.tensor(sides, device=z.device), layer].view(len(sides), n_heads, -1)
            zh[torch.tensor(rows, device=zin.device), -1, h] = cf[torch.arange(len(sides), device=z.device), h]
        # only the two label logits: lm_head's full vocabulary would cost a quarter of a small model's row
        head = model.lm.lm_head
        pair = model.lm.model.norm.output[:, -1] @ head.weight[[a, b]].T
        bias = getattr(head, "bias", None)
        if bias is not None:
            pair = pair + bias[[a, b]]
        if cap:  # the final-logit soft-cap (Gemma 2), per logit as the model applies it
            pair = cap * torch.tanh(pair / cap)
        head.skip(pair[:, None])
        ld = (pair[:, 0].float() - pair[:, 1].float()).save()
    return ld


def _units(n: int, L: int, H: int, blocks: int) -> list[list[tuple[int, int, list]]]:
    """Work units ``(start layer, pair, [(layer, head), ...])``, one per (layer block, pair), grouped by block."""
    bounds = sorted(set(np.linspace(0, L, min(blocks, L) + 1).round().astype(int).tolist()))
    return [[(lo, i, [(la, h) for la in range(lo, hi) for h in range(H)]) for i in range(n)]
            for lo, hi in zip(bounds[:-1], bounds[1:])]


def _pack(units: list[tuple[int, int, list]], max_rows: int) -> list[list[tuple[int, int, list]]]:
    """Units of one block into forwards of at most ``max_rows`` rows (a unit's patched rows)."""
    out, cur, size = [], [], 0
    for u in units:
        need = len(u[2])
        if cur and size + need > max_rows:
            out.append(cur)
            cur, size = [], 0
        cur.append(u)
        size += need
    return out + ([cur] if cur else [])


def _repack(todo: list[list[tuple[int, int, list]]], rows: int) -> list[list[tuple[int, int, list]]]:
    """The units of forwards not yet run, their heads cut into pieces of at most ``rows`` and packed again, block by
    block (a forward starts at one block's first layer)."""
    by_block: dict[int, list] = {}
    for lo, i, cells in (u for chunk in todo for u in chunk):
        for k in range(0, len(cells), rows):
            by_block.setdefault(lo, []).append((lo, i, cells[k:k + rows]))
    return [c for block in by_block.values() for c in _pack(block, rows)]


def run_blocks(model: Any, enc: Any, prefix: Prefix, ids: tuple[int, int], n: int, resid: Any, z: Any,
               max_tokens: int, blocks: int = BLOCKS) -> np.ndarray:
    """The patched LD of every (pair, layer, head) ``[n, L, H]`` on the KV path, in ``blocks`` layer blocks."""
    L, H = model.n_layers, model.n_heads
    layers = [model.layer(i) for i in range(L)]
    projs = {la: model.o_proj(la) for la in range(L)}
    out = np.full((n, L, H), np.nan)
    max_rows = max(2, min(4096, max_tokens // 4))
    attr = model.adapter.softcap_attr
    cap = getattr(model.config, attr, None) if attr else None
    state = {"todo": [c for block in _units(n, L, H, blocks) for c in _pack(block, max_rows)], "rows": max_rows}

    def rest(rows: int) -> None:
        if rows != state["rows"]:  # a retry: the failed forward and the rest, packed smaller
            state["todo"], state["rows"] = _repack(state["todo"], rows), rows
        while state["todo"]:
            chunk = state["todo"][0]
            for t, v in zip(*_run_chunk(chunk)):
                out[t] = v
            state["todo"].pop(0)

    def _run_chunk(chunk: list) -> tuple[list, list]:
        seqs, targets, patches = [], [], {}
        for _, i, cells in chunk:
            for la, h in cells:
                R, S, Hs = patches.setdefault(la, ([], [], []))
                R.append(len(seqs))
                S.append(n + i)
                Hs.append(h)
                seqs.append(i)
                targets.append((i, la, h))
        inputs = inputs_token(enc, seqs, prefix.width, prefix.cache, [prefix.index[(s, None)] for s in seqs],
                              shared=True)
        with shared_attention(model):
            ld = _trace_block(model, inputs, layers, chunk[0][0], resid, z, seqs,
                              {k: projs[k] for k in patches}, patches, H, ids, cap)
        return targets, ld.cpu().tolist()

    halving(max_rows, rest)
    return out


def start(model: Any, batch: Any, options: HeadsOptions, prepared: dict) -> dict:
    """A chunk's plan, here, before its forwards: its rows, whether the KV path runs (``cache``: the chunk's shared
    trace keeps its key/value cache for it) and the candidates' ranking job over the chunks done so far
    (``prepared["running"]``); the ``_`` keys stay on this machine."""
    L, H = model.n_layers, model.n_heads
    groups, cells = _groups(batch, L, H)
    why = "off" if options.kv_cache == "off" else kv_possible(model, batch.encoded, groups)
    if why and options.kv_cache == "on":
        raise ValueError(f"the KV-cache path cannot run here: {why}")
    running = prepared.get("running")
    rank = candidates.ranking_job(running, L, H, options.min_gap, candidates.candidate_count(options.top_heads, L, H))
    return {"cache": why is None, "groups": groups, "cells": cells, "max_tokens": options.max_tokens,
            "atp": options.atp, "rank": rank, "_why": why or "", "_options": options, "_running": running}


def read(model: Any, batch: Any, job: dict) -> None:
    """Inside the chunk's shared trace: nothing to read (what heads takes from it is its key/value cache)."""
    return None


def rows(model: Any, batch: Any, job: dict, got: Any, prefix: Prefix | None) -> tuple:
    """After the shared trace, in its session: every forward of :func:`execute`, over the trace's cache cut to the
    prefix (the rows of a KV chunk need no prefix forward of their own: beside patching the prefix runs once)."""
    return execute(model, batch.encoded, job["groups"], job["cells"], (batch.label_ids[0], batch.label_ids[1]),
                   batch.n, job["cache"], job["max_tokens"], job["atp"], job["rank"], prefix)


def build(model: Any, batch: Any, job: dict, got: tuple) -> xr.Dataset:
    """The chunk's Dataset from what :func:`execute` brought back, here; the run's ranking sums get this chunk."""
    options, running = job["_options"], job["_running"]
    L, H, n, enc = model.n_layers, model.n_heads, batch.n, batch.encoded
    patched, sides, atp, dla, (chosen, weights) = got
    patched = np.asarray(patched, dtype=np.float64).reshape(n, L, H)
    sides = np.asarray(sides.cpu().tolist() if hasattr(sides, "cpu") else sides, dtype=np.float64)
    input_ids, _, _ = prompt_tokens(batch)
    ds = build_dataset(
        pairs=batch.pairs, labels=list(options.labels), base_ld=sides[:n], cf_ld=sides[n:], patched_ld=patched,
        atp_delta=None if atp is None else atp.cpu().numpy().astype(np.float64).transpose(1, 0, 2),
        dla=dla.numpy().reshape(2, n, L, H).transpose(1, 0, 2, 3), input_ids=input_ids,
        token_text=decoded_tokens(model.tokenizer, input_ids), min_gap=options.min_gap,
        forward_path="kv_cache" if job["cache"] else "full", why=job["_why"], top_heads=options.top_heads)
    att = right_aligned(weights.numpy(), [enc.lengths[r] for r in range(2 * n)], n)
    ds = candidates.with_candidates(ds, [(int(a), int(b)) for a, b in chosen], att)
    if running is not None:
        running.update(ds)
    return ds


def run_heads(model: Any, pairs: Sequence[PromptPair], options: HeadsOptions,
              label_ids: Sequence[int] | None = None, running: RunningRank | None = None) -> xr.Dataset:
    """The computation behind :func:`nnethics.analyses.heads.head_patching` with forwards of its own (the full
    path, ``kv_cache="off"``; the KV path reads the shared trace instead: :func:`start`, :func:`rows`,
    :func:`build`); ``running``: the sums of the chunks done so far (updated with this one)."""
    batch = encode_pairs(model, list(pairs), list(options.labels), options.chat, label_ids)
    job = start(model, batch, options, {"running": running})
    got = model.session(execute, batch.encoded, job["groups"], job["cells"], (batch.label_ids[0],
                        batch.label_ids[1]), batch.n, job["cache"], job["max_tokens"], job["atp"], job["rank"])
    return build(model, batch, job, got)

"""The computation of per-head activation patching for one chunk of pairs (torch and nnsight load here).

Rows per pair, as in :mod:`.patching_engine`: ``[cf, base, base with head (l, h) patched, ...]``. A patched
head is the slice ``[h*dh:(h+1)*dh]`` of ``o_proj``'s input (TransformerLens' ``z``; query heads for GQA
models) at the decision position, copied from the counterfactual row of the same forward. On the KV-cache
path every row is a one-token forward over the prefix cache of its sequence (:func:`run_prefix`), so the
``L x H`` patched rows of a pair cost about ``L x H`` tokens of compute; without it, full forwards.

Four kinds of forward, all inside one :meth:`~nnethics.models.handle.ModelHandle.session` (one request
remotely): the prefix (KV path), the patched rows, attribution patching (one forward + one backward over the
base and cf rows: ``(z_cf - z_base) . dLD/dz`` per head), and one eager-attention forward of the base and
cf rows that brings back the attention weights of the decision position to every token (every head: the
heads worth showing are chosen across all prompts by ``finalize``) and each head's direct logit
attribution (DLA, through :func:`~.attribution_trace.collect`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import xarray as xr

from ..models.errors import is_oom
from ..prompts import PromptPair
from .attribution_trace import collect, contributions
from .common import encode_pairs
from .patching_engine import (
    Patch,
    Prefix,
    Row,
    _chunks,
    _chunks_subset,
    _inputs_full,
    _inputs_token,
    kv_possible,
    run_prefix,
)

if TYPE_CHECKING:
    from .heads import HeadsOptions


def attention_module(model: Any, layer: int) -> Any:
    """The envoy of layer ``layer``'s attention block (the parent of the adapter's ``o_proj``)."""
    from ..models.adapters import get_path

    parent = model.adapter.o_proj.rsplit(".", 1)[0]
    return get_path(model.layer(layer), parent)


class eager_attention:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Switch the (local) model to transformers' eager attention for one trace, so that every attention
    block returns its weights (``output[1]``, ``[N, H, q, k]``, query heads), then switch back."""

    def __init__(self, model: Any):
        self.config = model.lm._module.config if not model.remote else None
        self.old = None

    def __enter__(self):
        if self.config is not None:
            self.old = self.config._attn_implementation
            self.config._attn_implementation = "eager"
        return self

    def __exit__(self, *exc):
        if self.config is not None:
            self.config._attn_implementation = self.old
        return False


# ---------------------------------------------------------------------------------------------
# trace bodies (remote-safe: envoys, ints, lists; tensors created inside the trace)


def _trace_heads(model: Any, inputs: dict, projs: dict, patches: dict, n_heads: int, ids: tuple[int, int],
                 use_cache: bool | None) -> torch.Tensor:
    """One forward of a batch of rows; ``patches[layer] = (rows, src rows, heads)``: the head slice of o_proj's
    input at the last position is copied from the source row. Returns the LD per row."""
    a, b = ids
    kw = {} if use_cache is None else {"use_cache": use_cache}
    with torch.no_grad(), model.trace(inputs, logits_to_keep=1, **kw):
        for layer in sorted(patches):
            z = projs[layer].input
            rows, src, heads = patches[layer]
            zh = z.view(z.shape[0], z.shape[1], n_heads, -1)
            r = torch.tensor(rows, device=z.device)
            s = torch.tensor(src, device=z.device)
            h = torch.tensor(heads, device=z.device)
            zh[r, -1, h] = zh[s, -1, h]
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
        est = []
        for z, g in zip(zs, grads):
            zl = z[:, -1].float().reshape(z.shape[0], n_heads, -1)
            if g is None:
                est.append(torch.zeros(n, n_heads, device=zl.device))
            else:
                gl = g[:n, -1].float().reshape(n, n_heads, -1)
                est.append(((zl[n:] - zl[:n]) * gl).sum(-1))
        atp = torch.stack(est).detach().clone().save()
    return atp


def _trace_attention(model: Any, inputs: dict, attns: list, use_cache: bool | None) -> torch.Tensor:
    """The eager attention weights of the last position to every key: ``[N, L, H, keys]`` (float32)."""
    kw = {} if use_cache is None else {"use_cache": use_cache}
    with torch.no_grad(), model.trace(inputs, logits_to_keep=1, **kw):
        got = [m.output[1][:, :, -1].detach().float() for m in attns]
        weights = torch.stack(got, dim=1).cpu().save()
    return weights


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
    lds: list[list[float]] = [[float("nan")] * len(g) for g in groups]
    width = max(enc.lengths[r.seq] for g in groups for r in g)
    max_rows = max(2, max_tokens // width) if prefix is None else max(2, min(4096, max_tokens // 4))
    todo = _chunks(groups, max_rows)
    while todo:
        chunk = todo.pop(0)
        seqs = [groups[g][j].seq for g, j in chunk]
        local = {gj: i for i, gj in enumerate(chunk)}
        patches: dict[int, tuple[list, list, list]] = {}
        for g, j in chunk:
            if j >= 2:
                layer, head = cells[g][j - 2]
                R, S, Hs = patches.setdefault(layer, ([], [], []))
                R.append(local[(g, j)])
                S.append(local[(g, 0)])
                Hs.append(head)
        try:
            if prefix is not None:
                rows_idx = [prefix.index[(s, None)] for s in seqs]
                inputs, use_cache = _inputs_token(enc, seqs, prefix.width, prefix.cache, rows_idx), None
            else:
                (inputs, _), use_cache = _inputs_full(enc, seqs), False
            ld = _trace_heads(model, inputs, {k: projs[k] for k in patches}, patches, H, ids, use_cache)
        except Exception as err:  # noqa: BLE001 - only out-of-memory is retried
            if not is_oom(err) or len(chunk) <= 2:
                raise
            max_rows = max(2, len(chunk) // 2)
            todo = _chunks_subset(groups, chunk, max_rows) + todo
            continue
        for (g, j), v in zip(chunk, ld.cpu().tolist()):
            lds[g][j] = v
    return lds


def _side_inputs(enc: Any, n: int, prefix: Prefix | None) -> tuple[dict, bool | None]:
    """Inputs of the rows ``[base..., cf...]`` (one token over the prefix cache, or full)."""
    seqs = list(range(2 * n))
    if prefix is not None:
        return _inputs_token(enc, seqs, prefix.width, prefix.cache, [prefix.index[(s, None)] for s in seqs]), None
    return _inputs_full(enc, seqs)[0], False


def execute(model: Any, enc: Any, groups, cells, ids, n: int, use_kv: bool, max_tokens: int, atp: bool,
            ) -> tuple[list[list[float]], Any, Any, Any]:
    """Every forward of a chunk, as one session: prefix, patched rows, AtP, attention + DLA."""
    prefix = run_prefix(model, enc, groups) if use_kv else None
    lds = run_rows(model, enc, groups, cells, ids, prefix, max_tokens)
    inputs, use_cache = _side_inputs(enc, n, prefix)
    L, H = model.n_layers, model.n_heads
    grads = _trace_atp(model, inputs, [model.o_proj(i) for i in range(L)], n, H, ids, use_cache) if atp else None
    proj = collect(model, _side_inputs(enc, n, prefix)[0], list(ids), heads=True, per_option=False)
    with eager_attention(model):
        weights = _trace_attention(model, _side_inputs(enc, n, prefix)[0],
                                   [attention_module(model, i) for i in range(L)], use_cache)
    return lds, grads, contributions(proj)["heads"][..., 0], weights


def run_heads(model: Any, pairs: Sequence[PromptPair], options: HeadsOptions,
              label_ids: Sequence[int] | None = None) -> xr.Dataset:
    """The computation behind :func:`nnethics.analyses.heads.head_patching` (see there)."""
    from . import heads as decl
    from .decisions import _decoded, _prompt_tokens

    pairs = list(pairs)
    L, H = model.n_layers, model.n_heads
    batch = encode_pairs(model, pairs, list(options.labels), options.chat, label_ids)
    ids = (batch.label_ids[0], batch.label_ids[1])
    enc, n = batch.encoded, batch.n
    groups, cells = _groups(batch, L, H)
    why = "off" if options.kv_cache == "off" else kv_possible(model, enc, groups)
    if why and options.kv_cache == "on":
        raise ValueError(f"the KV-cache path cannot run here: {why}")
    use_kv = why is None
    lds, atp, dla, weights = model.session(execute, enc, groups, cells, ids, n, use_kv, options.max_tokens,
                                           options.atp)
    patched = np.array([g[2:] for g in lds], dtype=np.float64).reshape(n, L, H)
    base = np.array([g[1] for g in lds])
    cf = np.array([g[0] for g in lds])
    input_ids, n_tokens, _ = _prompt_tokens(batch)
    att = _right_aligned(weights.numpy(), [enc.lengths[r] for r in range(2 * n)], n)
    return decl.build_dataset(
        pairs=pairs, labels=list(options.labels), base_ld=base, cf_ld=cf, patched_ld=patched,
        atp_delta=None if atp is None else atp.cpu().numpy().astype(np.float64).transpose(1, 0, 2),
        dla=dla.numpy().reshape(2, n, L, H).transpose(1, 0, 2, 3), attention=att, input_ids=input_ids,
        token_text=_decoded(model.tokenizer, input_ids), min_gap=options.min_gap,
        forward_path="kv_cache" if use_kv else "full", why=why or "", top_heads=options.top_heads)


def _right_aligned(weights: np.ndarray, lengths: list[int], n: int) -> np.ndarray:
    """``[2n, L, H, keys]`` (left-padded keys) -> ``[n, side, L, H, token]`` with token 0 the first prompt token
    (padded at the end with NaN, as ``input_ids`` are with -1)."""
    width = max(lengths)
    out = np.full((n, 2, weights.shape[1], weights.shape[2], width), np.nan, dtype=np.float32)
    for row, length in enumerate(lengths):
        out[row % n, row // n, :, :, :length] = weights[row, :, :, -length:]
    return out

"""The computation of activation patching for one chunk of pairs: the plan of patched rows, the forwards (through
the model handle's seam, so one request remotely), attribution patching and the Dataset.

:mod:`nnethics.analyses.patching` declares the analysis and imports this module when it runs (torch and nnsight
load here, not when the registry is read).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from ...prompts import PromptPair
from ..common import PairBatch, encode_pairs
from ..unembed import label_columns
from . import results
from .engine import Noise, Patch, Row, attribution, forward_keys, kv_possible, run_groups, run_prefix
from .noise import SpanError, pair_seed, restore_layers, span_chars, span_tokens

if TYPE_CHECKING:
    from .options import PatchingOptions


@dataclass
class _Plan:
    groups: list[list[Row]]
    owner: list[int]                 # per group: its pair (noise mode: one group per pair and noise draw)
    cells: list[list[tuple]]         # per group, per patched row: index into the cell array
    positions: list[int] | None      # grid coordinate
    skip: list[str]                  # per pair, "" when run
    extra: dict                      # per-prompt variables (noise span etc.)


def _positions_of(pair_len: int, mode: str) -> list[tuple[int, ...]]:
    if mode == "last":
        return [(-1,)]
    if mode == "all":
        return [tuple(range(-pair_len, 0))]
    return [(p,) for p in range(-pair_len, 0)]


def _plan(model: Any, batch: PairBatch, opts: PatchingOptions, layers: Sequence[int]) -> _Plan:
    n, L = batch.n, model.n_layers
    enc = batch.encoded
    comps = list(opts.components)
    noise_mode = opts.corruption == "noise"
    groups, owner, cells, skip = [], [], [], []
    starts, ends, texts = np.full(n, -1, np.int32), np.full(n, -1, np.int32), [""] * n
    width = max(enc.lengths)
    for i, pair in enumerate(batch.pairs):
        b, c = batch.row(i, "base"), batch.row(i, "cf")
        tb, tc = enc.lengths[b], enc.lengths[c]
        reason, draws = "", [None]
        if noise_mode:
            try:
                lo, hi = span_chars(enc.texts[b], opts.noise_span, opts.labels)
                s, e = span_tokens(model.tokenizer, enc.texts[b], enc.tokens(b), (lo, hi))
                draws = [Noise(s - tb, e - tb, pair_seed(opts.seed, pair.prompt_id, k), opts.noise_scale,
                               opts.noise_std) for k in range(opts.noise_samples)]
                starts[i], ends[i], texts[i] = s, e, enc.texts[b][lo:hi]
            except SpanError as err:
                reason = f"noise span {opts.noise_span!r} not found: {err}"
        elif opts.positions != "last" and tb != tc:
            reason = f"base and counterfactual tokenize to different lengths ({tb} vs {tc})"
        for noise in draws if not reason else [None]:
            # noise: the clean base restores into a noised base; counterfactual: cf patches into base
            rows = [Row(b), Row(b, noise)] if noise_mode else [Row(c), Row(b)]
            if noise_mode and reason:
                rows = rows[:1]  # no span to noise: only the clean run
            group_cells = []
            if not reason:
                for ci, comp in enumerate(comps):
                    for li, layer in enumerate(layers):
                        window = restore_layers(L, layer, opts.window)
                        for pos in _positions_of(tb, opts.positions):
                            rows.append(Row(b, noise, Patch(window, comp, pos)))
                            pi = width + pos[0] if opts.positions == "grid" else None
                            group_cells.append((pi, li, ci))
            groups.append(rows)
            owner.append(i)
            cells.append(group_cells)
        skip.append(reason)
    positions = list(range(-max(enc.lengths), 0)) if opts.positions == "grid" else None
    extra: dict = {"skipped": (("prompt",), np.array([bool(r) for r in skip])),
                   "skip_reason": (("prompt",), np.array(skip, dtype=str)),
                   "n_tokens_base": (("prompt",), np.array([enc.lengths[batch.row(i, "base")] for i in range(n)], np.int32)),
                   "n_tokens_cf": (("prompt",), np.array([enc.lengths[batch.row(i, "cf")] for i in range(n)], np.int32))}
    if noise_mode:
        extra.update(noise_start=(("prompt",), starts), noise_end=(("prompt",), ends),
                     noise_span_text=(("prompt",), np.array(texts, dtype=str)))
    return _Plan(groups, owner, cells, positions, skip, extra)


def _choose_path(model: Any, batch: PairBatch, plan: _Plan, opts: PatchingOptions) -> tuple[bool, str]:
    if opts.kv_cache == "off":
        return False, "off"
    why = kv_possible(model, batch.encoded, plan.groups)
    if why and opts.kv_cache == "on":
        raise ValueError(f"the KV-cache path cannot run here: {why}")
    return why is None, why or ""


def run_patching(model: Any, pairs: Sequence[PromptPair], options: PatchingOptions,
                 label_ids: Sequence[int] | None = None) -> xr.Dataset:
    """The computation behind :func:`nnethics.engine.activation_patching` on its own forwards (see
    there); the last-position counterfactual path reads the chunk's shared trace instead (:data:`SHARED`)."""
    batch = encode_pairs(model, list(pairs), list(options.labels), options.chat, label_ids)
    job = start(model, batch, options, {})
    return build(model, batch, job, model.session(_execute, batch.encoded, job["groups"], job["ids"], job["use_kv"],
                                                  job["max_tokens"], job["atp"], None, job["columns"]))


def atp_wanted(opts: PatchingOptions) -> bool:
    """Attribution patching: as asked, else on in grid and all-position modes only (on the last-position path
    the exact values cost about one token each, less than its forward and backward)."""
    return opts.atp if opts.atp is not None else opts.positions != "last"


def start(model: Any, batch: PairBatch, options: PatchingOptions, prepared: dict) -> dict:
    """The plan of a chunk: its patched rows, the forward path and the attribution-patching job."""
    opts, L = options, model.n_layers
    layers = list(range(L)) if opts.layers is None else sorted(set(opts.layers))
    if layers[0] < 0 or layers[-1] >= L:
        raise ValueError(f"layers must lie in 0..{L - 1}, got {opts.layers}")
    plan = _plan(model, batch, opts, layers)
    use_kv, why = _choose_path(model, batch, plan, opts)
    atp_job = _atp_job(batch, plan, opts, layers) if atp_wanted(opts) and opts.corruption == "counterfactual" and \
        opts.window == 1 else None
    # keys with "_" stay here; the rest travel to the session (the server, remotely)
    ids = (batch.label_ids[0], batch.label_ids[1])
    return {"_options": opts, "_layers": layers, "_plan": plan, "_why": why, "groups": plan.groups, "use_kv": use_kv,
            "atp": atp_job, "ids": ids, "cache": use_kv, "max_tokens": opts.max_tokens,
            "columns": label_columns(model.lm.lm_head._module, ids)}


def read(model: Any, batch: PairBatch, job: dict) -> None:
    """Patching reads nothing in the shared trace itself: its prefix cache comes with the rows step."""
    return None


def rows(model: Any, batch: PairBatch, job: dict, saved: Any, prefix: Any) -> tuple:
    """After the shared trace, in its session: the patched rows (one-token rows over ``prefix`` on the KV path)
    and attribution patching."""
    return _execute(model, batch.encoded, job["groups"], job["ids"], job["use_kv"], job["max_tokens"], job["atp"],
                    prefix, job["columns"])


def build(model: Any, batch: PairBatch, job: dict, got: tuple) -> xr.Dataset:
    """The patching Dataset of a chunk from the LDs of its rows."""
    opts, plan, layers, why = job["_options"], job["_plan"], job["_layers"], job["_why"]
    pairs, atp_job, use_kv = batch.pairs, job["atp"], job["use_kv"]
    lds, sigma, atp_raw = got
    n, nL, nC = batch.n, len(layers), len(opts.components)
    shape = (n, len(plan.positions), nL, nC) if plan.positions is not None else (n, nL, nC)
    # noise mode: a pair's groups are its noise draws, and the LDs are their means
    patched, ran, draws = np.zeros(shape), np.zeros(shape, bool), np.bincount(plan.owner, minlength=n)
    src, recv = np.full(n, np.nan), np.zeros(n)
    for g, (i, group_cells) in enumerate(zip(plan.owner, plan.cells)):
        for j, (pi, li, ci) in enumerate(group_cells):
            cell = (i, pi, li, ci) if pi is not None else (i, li, ci)
            patched[cell] += lds[g][j + 2] / draws[i]
            ran[cell] = True
        src[i] = lds[g][0]
        recv[i] += lds[g][1] / draws[i] if len(lds[g]) > 1 else np.nan
    patched[~ran] = np.nan  # skipped pairs; grid positions before a pair's first token
    atp = None if atp_job is None else _atp_array(atp_raw, batch, plan, opts, layers, atp_job)
    base_ld = src if opts.corruption == "noise" else recv
    labels = list(opts.labels)
    chose = [labels[0 if v > 0 else 1] == p.base_ethical for v, p in zip(base_ld, pairs)]
    chose_cf = None
    if opts.corruption == "counterfactual":
        chose_cf = [labels[0 if v > 0 else 1] == p.cf_ethical for v, p in zip(src, pairs)]
    extra = dict(plan.extra)
    extra["forward_path"] = (("prompt",), np.array(["kv_cache" if use_kv else "full"] * n, dtype=str))
    if opts.corruption == "noise":
        first = {i: plan.owner.index(i) for i in range(n)}  # every draw of a pair has the same std
        extra["noise_std"] = (("prompt",), np.array([sigma.get(first[i], np.nan) for i in range(n)], np.float32))
    ds = results.build_dataset(
        prompt_ids=[p.prompt_id for p in pairs], categories=[p.category for p in pairs], layers=layers,
        components=list(opts.components), positions=plan.positions, corruption=opts.corruption,
        receiver_ld=recv, source_ld=src, patched_ld=patched, atp_delta=atp, min_gap=opts.min_gap,
        base_ethical=chose, cf_ethical=chose_cf, per_prompt=extra)
    ds["forward_path"].attrs["description"] = "kv_cache: one-token rows over the prefix cache; full: full forwards" + (
        f" ({why})" if why else "")
    return ds


def _execute(model: Any, enc, groups, ids, use_kv: bool, max_tokens: int,
             atp_job: dict | None, prefix: Any = None, columns: list[int] | None = None
             ) -> tuple[list[list[float]], dict[int, float], Any]:
    """Every forward of a chunk: the prefix (KV path), the patched rows, the AtP forward + backward.

    Returns the LD of every row, the noise std per group and the raw AtP tensor ``[K, n, P]`` (or None).
    It runs as one :meth:`~nnethics.models.handle.ModelHandle.session`: on NDIF, one request, so the
    prefix cache never travels. ``prefix``: the KV path's prefix cache, already computed (by the shared trace);
    ``columns``: the lm_head columns the KV path's rows compute (:func:`.unembed.label_columns`)."""
    if use_kv and prefix is None:
        prefix = run_prefix(model, enc, groups)
    lds, sigma = run_groups(model, enc, groups, ids, prefix=prefix, max_tokens=max_tokens, columns=columns)
    atp = None
    if atp_job is not None:
        atp, _, _ = attribution(model, enc, atp_job["recv"], atp_job["src"], atp_job["keys"], atp_job["positions"],
                                ids, prefix=prefix if atp_job["last"] else None)
    return lds, sigma, atp


def _atp_job(batch: PairBatch, plan: _Plan, opts: PatchingOptions, layers) -> dict:
    """What attribution patching runs: receiver/source rows, (layer, component) keys, positions."""
    n = batch.n
    lens = [batch.encoded.lengths[batch.row(i, "base")] for i in range(n)]
    positions = [-1] if opts.positions == "last" else plan.positions or list(range(-int(max(lens)), 0))
    return {"recv": [batch.row(i, "base") for i in range(n)], "src": [batch.row(i, "cf") for i in range(n)],
            "keys": forward_keys([(la, c) for la in layers for c in opts.components]),
            "positions": positions, "last": opts.positions == "last"}


def _atp_array(atp, batch: PairBatch, plan: _Plan, opts: PatchingOptions, layers, job: dict) -> np.ndarray:
    """AtP estimates shaped like ``patched`` (NaN for skipped pairs and padding positions)."""
    n, comps, positions = batch.n, list(opts.components), job["positions"]
    lens = np.array([batch.encoded.lengths[r] for r in job["recv"]])
    a = atp.numpy().astype(np.float64)                    # [K, n, P]
    pos = np.array(positions)
    valid = (-pos[None, :] <= lens[:, None]) & ~np.array([bool(s) for s in plan.skip])[:, None]
    a = np.where(valid[None], a, np.nan)
    nL, nC = len(layers), len(comps)
    out = np.full((n, len(positions), nL, nC), np.nan)
    for k, (layer, comp) in enumerate(job["keys"]):
        out[:, :, layers.index(layer), comps.index(comp)] = a[k]
    if opts.positions == "grid":
        return out
    if opts.positions == "all":
        summed = np.nansum(out, axis=1)
        return np.where(np.all(np.isnan(out), axis=1), np.nan, summed)
    return out[:, 0]

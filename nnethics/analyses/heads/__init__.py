"""Activation patching per attention head at the decision position, and what the decisive heads read.

For every layer ``l`` and head ``h`` the base run receives, at the decision position (the last prompt token)
only, the counterfactual's per-head attention result: the slice ``[h*dh:(h+1)*dh]`` of the input of the
layer's ``o_proj`` (TransformerLens' ``z``). For GQA models the heads are the **query** heads (``o_proj``'s
input has one slice per query head). The decision ``LD = logit(label 1) - logit(label 2)`` is measured as in
:mod:`.patching`, with the same normalisation (:func:`nnethics.metrics.normalized_effect`) and the same
``effect_defined``; attribution patching ``(z_cf - z_base) . dLD/dz`` per head sits beside it.

Every patched row is a one-token forward over the prefix's key/value cache (the KV-cache path of
:mod:`..patching.engine`), so the ``L x H`` heads of a pair cost about ``L x H`` tokens of compute; the rows
attend through :func:`.prefix_cache.shared_prefix_attention` (one product per prompt's prefix, not a copy of it
per row; the last bits differ from SDPA's).

Stored as ``store/<slug>/heads.nc``; dims ``prompt``, ``layer``, ``head`` (read it as ``ds["head"]``),
``side``, ``token``, and after ``finalize`` ``rank``:

* ``base_logit_diff``, ``cf_logit_diff``, ``effect_defined``, ``atp_correlation`` ``(prompt)``;
* ``patched_logit_diff``, ``effect``, ``flipped``, ``atp_delta``, ``atp_effect`` ``(prompt, layer, head)``;
* ``head_dla (prompt, side, layer, head)``: each head's direct logit attribution (as ``attribution``'s
  ``head_contribution``), the tie-break of the ranking and shown beside the effect in the report;
* ``input_ids``/``token_text (prompt, side, token)`` as in ``decisions`` (padded with -1 / "");
* after ``finalize``: ``mean_effect``, ``effect_ci_low``/``effect_ci_high`` (bootstrap 95% CI over prompts,
  :func:`nnethics.metrics.mean_ci` as patching), ``flip_rate``, ``mean_atp_effect``, ``mean_head_dla``
  ``(layer, head)``, ``atp_exact_correlation_pooled``; and for the ``top_heads`` heads with the largest mean
  |effect| (ties: mean |head_dla|) ``top_layer``/``top_head (rank)``;
* after the ``complete`` pass (:func:`complete_attention`, run once after ``finalize`` by ``run`` and
  ``analyze``): ``attention (prompt, side, rank, token)``, the top heads' attention weights from the decision
  position to every prompt token (token 0 = the first; NaN padding), from the base and cf rows' own forward
  (on the KV path the shared-prefix attention of :mod:`.prefix_cache` returns its weights; on full forwards
  transformers' eager attention for that trace); its attr ``fallback_prompts`` counts the prompts computed again.

Which heads are the top ones is known only across all prompts, so each chunk guesses: its session ranks the heads
on the prompts so far and brings back the attention of ``CANDIDATE_FACTOR x top_heads`` candidates
(:mod:`.candidates`: ``candidate_attention (prompt, side, candidate, token)``, ``candidate_layer``/
``candidate_head (prompt, candidate)``, in the parts only). The ``complete`` pass takes the chosen heads' attention
from them, and runs the base and cf rows again (the same forward, so the same bits; every such chunk in one
request remotely) only for the heads a chunk's candidates miss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from ... import metrics
from ...prompts import PromptPair
from ...store.variables import LD, LOGIT, ONE
from ..base import Analysis, OptionError, Prepared, SharedReads, recorded_option, register
from .candidates import CANDIDATES, RunningRank, assemble
from .results import CELL, HeadsOptions, build_dataset

__all__ = ["ANALYSIS", "CELL", "HeadsOptions", "build_dataset", "complete_attention", "finalize", "head_patching",
           "summarize", "top_heads"]


def head_patching(model: Any, pairs: Sequence[PromptPair], options: HeadsOptions = HeadsOptions(),
                  label_ids: Sequence[int] | None = None, running: RunningRank | None = None) -> xr.Dataset:
    """Patch every (layer, head) of every pair at the decision position; see the module docstring. ``running``
    (:func:`prepare`'s, one per run): the previous chunks' sums the candidate heads are ranked with (None: this
    chunk's alone); this chunk is added to it."""
    from .engine import run_heads

    return run_heads(model, pairs, options, label_ids, running)


def shares(model: Any, options: HeadsOptions, prepared: dict) -> SharedReads | None:
    """The KV path reads the chunk's shared trace: its key/value cache cut to the prefix replaces a prefix forward
    of its own (the same bits), and its patched rows run after it in the same session, so beside patching the
    prefix runs once. The full path (``kv_cache="off"``) and a model whose cache has sliding-window layers (it
    cannot be cut: :func:`~nnethics.analyses.prefix_cache.cut_prefix`) run forwards of their own."""
    if options.kv_cache == "off" or getattr(model.config, "sliding_window", None):
        return None
    from . import engine

    return SharedReads(start=engine.start, read=engine.read, rows=engine.rows, build=engine.build)


def prepare(model: Any, options: HeadsOptions) -> Prepared:
    """One :class:`~.candidates.RunningRank` per run, passed to every chunk (nothing is recorded: which
    heads are candidates changes no number of the file)."""
    return Prepared({"running": RunningRank()})


def resume(prepared: Prepared, done: list[xr.Dataset]) -> None:
    """A resumed run: the running ranking starts from what is done (the earlier result and the parts)."""
    prepared.values["running"].resume(done)


def top_heads(ds: xr.Dataset, k: int) -> list[tuple[int, int]]:
    """The ``k`` (layer, head) with the largest mean |effect| over prompts (NaN-free means first), ties broken
    by the larger mean |head_dla| over prompts and sides, then by (layer, head)."""
    eff = np.abs(_nanmean0(ds["effect"].values))                                # [L, H]
    dla = np.abs(ds["head_dla"].values).mean(axis=(0, 1))                       # [L, H]
    eff = np.where(np.isnan(eff), -1.0, eff)
    L, H = eff.shape
    order = sorted(((la, h) for la in range(L) for h in range(H)), key=lambda c: (-eff[c], -dla[c], c))
    return order[:min(k, L * H)]


def _nanmean0(a: np.ndarray) -> np.ndarray:
    ok = ~np.isnan(a)
    n = ok.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.where(ok, a, 0).sum(0) / np.where(n > 0, n, 1), np.nan)


def finalize(ds: xr.Dataset, top: int | None = None, n_resamples: int = metrics.N_RESAMPLES, seed: int = 0
             ) -> xr.Dataset:
    """Cross-prompt statistics per head and the ``top`` heads (default: the ``top_heads`` option the file was
    computed with) as ``top_layer``/``top_head (rank)``, whose attention :func:`complete_attention` adds; see the
    module docstring."""
    ds = ds.copy()
    top = int(recorded_option(ds, "top_heads", 8)) if top is None else int(top)
    ds.attrs["heads"] = "query heads (GQA models: one o_proj input slice per query head)"
    mean, low, high = metrics.mean_ci(ds["effect"].values, axis=0, n_resamples=n_resamples, seed=seed)
    cell = ("layer", "head")
    ds["mean_effect"] = (cell, mean.astype(np.float32))
    ds["effect_ci_low"] = (cell, low.astype(np.float32))
    ds["effect_ci_high"] = (cell, high.astype(np.float32))
    for end in ("low", "high"):  # the same CI as patching's per-layer mean effect
        ds[f"effect_ci_{end}"].attrs["description"] = (f"{metrics.ci_label('prompts where effect is defined')} "
                                                      f"({n_resamples} resamples, seed {seed})")
        ds[f"effect_ci_{end}"].attrs.update(metrics.ci_attrs(seed, n_resamples))
    ds["flip_rate"] = (cell, ds["flipped"].values.mean(axis=0).astype(np.float32))
    ds["mean_head_dla"] = (cell, ds["head_dla"].values.mean(axis=(0, 1)).astype(np.float32))
    if "atp_delta" in ds:
        exact = ds["patched_logit_diff"].values - ds["base_logit_diff"].values[:, None, None]
        ds["mean_atp_effect"] = (cell, _nanmean0(ds["atp_effect"].values).astype(np.float32))
        ds["atp_exact_correlation_pooled"] = ((), np.float32(metrics.pearson(ds["atp_delta"].values, exact)))
    old = ds.drop_vars([v for v in ("attention", "rank", "top_layer", "top_head") if v in ds.variables])
    chosen = top_heads(old, top)
    same = "attention" in ds and [(int(a), int(b)) for a, b in zip(ds["top_layer"].values, ds["top_head"].values)]
    new = old.assign_coords(rank=np.arange(len(chosen), dtype=np.int32),
                            top_layer=("rank", np.array([c[0] for c in chosen], dtype=np.int32)),
                            top_head=("rank", np.array([c[1] for c in chosen], dtype=np.int32)))
    # a rerun of a finished file: the same heads keep their attention (complete_attention then computes none)
    if same != chosen:
        return new
    out = with_attention(new, ds["attention"].values)
    out["attention"].attrs.update(ds["attention"].attrs)  # e.g. fallback_prompts
    return out


def complete_attention(model: Any, ds: xr.Dataset, pairs: Sequence[PromptPair], options: HeadsOptions = HeadsOptions(),
                       label_ids: Sequence[int] | None = None, batch_size: int = 8, **_: Any) -> xr.Dataset:
    """The ``complete`` pass: ``attention (prompt, side, rank, token)`` of the heads ``finalize`` chose
    (``top_layer``/``top_head``) for every prompt of ``ds`` among ``pairs``: from the chunks' candidates
    (:func:`~.candidates.assemble`); the heads a prompt's candidates miss are computed again (the
    fallback, :func:`_fallback`), each prompt on the forward path it was patched on (``forward_path``).
    Prompts that have them already (a rerun of a finished file: ``finalize`` kept them, the top heads being the
    same) are not computed again. The candidates are dropped; ``attention``'s attr ``fallback_prompts`` counts
    the prompts the fallback computed. Only the chosen heads' weights come back from a remote model."""
    if "top_layer" not in ds.coords:
        return ds
    chosen = [(int(la), int(h)) for la, h in zip(ds["top_layer"].values, ds["top_head"].values)]
    ids = [str(x) for x in ds["prompt"].values]
    by_id = {p.prompt_id: p for p in pairs}
    have = ds["attention"].values if "attention" in ds else None
    rows = [i for i, pid in enumerate(ids) if pid in by_id and (have is None or np.isnan(have[i]).all())]
    if have is not None and not rows:
        return ds.drop_vars([v for v in CANDIDATES if v in ds.variables])
    att = np.full((len(ids), 2, len(chosen), ds.sizes["token"]), np.nan, dtype=np.float32)
    if have is not None:
        att[:] = have
    missed = {i: list(range(len(chosen))) for i in rows}
    if "candidate_layer" in ds:
        missed = assemble(chosen, ds["candidate_layer"].values, ds["candidate_head"].values,
                          ds["candidate_attention"].values, att, rows)
    _fallback(model, ds, missed, by_id, att, options, label_ids, chosen, batch_size)
    out = with_attention(ds.drop_vars([v for v in CANDIDATES if v in ds.variables]), att)
    before = int(ds["attention"].attrs.get("fallback_prompts", 0)) if have is not None else 0  # earlier runs'
    out["attention"].attrs["fallback_prompts"] = before + len(missed)
    return out


def _fallback(model: Any, ds: xr.Dataset, missed: dict[int, list[int]], by_id: dict[str, PromptPair],
              att: np.ndarray, options: HeadsOptions, label_ids: Sequence[int] | None, chosen: list[tuple[int, int]],
              batch_size: int) -> None:
    """``att``'s ranks ``missed[row]`` (those heads only) in chunks of ``batch_size`` pairs in ``ds``'s order that
    never mix prompts of different candidate sets (different chunks of the run, so the same padding), all in one
    session (:func:`~.attention.fallback_attention`: one request remotely), in place."""
    from .attention import fallback_attention

    ids = [str(x) for x in ds["prompt"].values]
    path = ds["forward_path"].values.tolist()
    cand = [ds[v].values for v in ("candidate_layer", "candidate_head") if v in ds]

    def key(i: int) -> tuple:  # the chunk (its candidates; none for a prompt of an earlier file) and the heads
        return [(int(la), int(h)) for la, h in zip(*[c[i] for c in cand]) if np.isfinite(la) and la >= 0] \
            if cand else [], missed[i]

    runs: list[list[int]] = []
    for i in sorted(missed):
        if runs and key(runs[-1][-1]) == key(i) and len(runs[-1]) < batch_size:
            runs[-1].append(i)
        else:
            runs.append([i])
    if not runs:
        return
    jobs = [([by_id[ids[i]] for i in chunk], [chosen[r] for r in missed[chunk[0]]],
             all(path[i] == "kv_cache" for i in chunk)) for chunk in runs]
    for chunk, got in zip(runs, fallback_attention(model, jobs, options, label_ids)):  # one request for them all
        ranks = missed[chunk[0]]
        for k, i in enumerate(chunk):
            att[i][:, ranks, :got.shape[-1]] = got[k]  # att[i, :, ranks] would put the ranks first


def with_attention(ds: xr.Dataset, att: np.ndarray) -> xr.Dataset:
    """``ds`` (finalized) with ``attention (prompt, side, rank, token)`` set to ``att`` and described."""
    ds = ds.copy()
    ds["attention"] = (("prompt", "side", "rank", "token"), att.astype(np.float32))
    ds["attention"].attrs["description"] = (
        "attention weights of the top heads (rank 0: largest mean |effect|) from the decision position to each "
        "prompt token (token 0 = first; NaN padding); query heads")
    return ds


def summarize(ds: xr.Dataset) -> str:
    """One line: pairs behind the means, the heads with the largest mean effect (with CI), AtP agreement."""
    n, k = ds.sizes["prompt"], int(ds["effect_defined"].sum())
    parts = [f"{n} pairs, {k} with a normalisable gap"]
    if "mean_effect" in ds:
        chosen = top_heads(ds, 3)
        heads = []
        for la, h in chosen:
            m = float(ds["mean_effect"].values[la, h])
            lo, hi = float(ds["effect_ci_low"].values[la, h]), float(ds["effect_ci_high"].values[la, h])
            heads.append(f"L{la}H{h} {m:+.3f} ({metrics.format_ci(lo, hi, '+.3f')})")
        parts.append("largest mean effect: " + ", ".join(heads))
    if "atp_exact_correlation_pooled" in ds:
        parts.append(f"AtP vs exact r = {float(ds['atp_exact_correlation_pooled']):.3f}")
    fallback = int(ds["attention"].attrs.get("fallback_prompts", 0)) if "attention" in ds else 0
    if fallback:
        parts.append(f"top heads' attention of {fallback} pairs computed again (not among their chunk's candidates)")
    return "; ".join(parts)


def tables(name: str, ds: xr.Dataset, data: Mapping[str, xr.Dataset]) -> dict[str, Any]:
    """``heads``: one row per (prompt, layer, head); ``heads_attention``: one row per (prompt, side, rank, token)."""
    def per_head():
        keep = [v for v in ("patched_logit_diff", "effect", "flipped", "atp_delta", "atp_effect") if v in ds]
        return ds[keep].to_dataframe().reset_index()

    jobs: dict[str, Any] = {"heads": per_head}
    if "attention" in ds:
        def attention():
            df = ds[["attention", "token_text"]].to_dataframe().reset_index()
            return df[df["attention"].notna()]
        jobs["heads_attention"] = attention
    return jobs


def check_model(model: Any, options: HeadsOptions) -> None:
    if options.top_heads > model.n_layers * model.n_heads:
        raise OptionError("top_heads", f"the model has {model.n_layers * model.n_heads} heads, got {options.top_heads}")


VARIABLES = {  # what each variable and coordinate it writes is (CF long_name, units): see store.variables
    "head_dla": (f"attention head's direct contribution to {LD} (as head_contribution)", LOGIT),
    "mean_head_dla": (f"mean over prompts and sides of the head's direct contribution to {LD}", LOGIT),
    "attention": ("attention weight of a top head from the decision position to each prompt token", ONE),
    "rank": ("rank of a head by mean |patching effect| (0 = largest)", ONE),
    "top_layer": ("layer of the head at this rank", ONE),
    "top_head": ("head index (query head) of the head at this rank", ONE),
    "candidate_attention": ("attention weight of a chunk's candidate head from the decision position to each "
                            "prompt token (chunk parts only)", ONE),
    "candidate_layer": ("layer of a chunk's candidate head (chunk parts only)", ONE),
    "candidate_head": ("head index (query head) of a chunk's candidate head (chunk parts only)", ONE),
}


ANALYSIS = register(Analysis(
    variables=VARIABLES,
    name="heads", options=HeadsOptions, compute=head_patching, shares=shares, summarize=summarize, finalize=finalize,
    complete=complete_attention, check=check_model, prepare=prepare, resume=resume, default=False,
    help="Activation patching per attention head at the decision position, and the attention of the top heads; "
         "writes STORE/<model>/heads.nc.",
    tables=tables, render=("nnethics.analyses.heads.figures",)))

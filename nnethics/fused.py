"""ONE shared trace per chunk for every analysis that declares its reads (:class:`~nnethics.analyses.base.SharedReads`).

The base and counterfactual rows of a chunk run once, left-padded exactly as every analysis encoded them alone
(``[base_0..base_{n-1}, cf_0..cf_{n-1}]``, ``logits_to_keep=1``, the model's default cache). Each analysis reads
that forward in an invoke of its own (nnsight runs every invoke's body against the same forward, in forward
order each), so none knows about the others: decisions read the label logits, attribution projects every part on
the label directions, the lens decodes every layer at the last position. After the trace, in the same session (one
request on NDIF), the analyses that run extra rows do so, patching over the trace's key/value cache cut to the
prefix (every token but the last). An analysis alone runs this same path with itself as the only member, so a
fused run and separate runs give the same bits; an analysis that declares nothing runs its own ``compute``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import nnsight
import torch
import xarray as xr

from .analyses.base import Analysis, SharedReads
from .analyses.patching_engine import Prefix

# This module loads torch: the pipeline imports it when a run starts. Nothing in the session imports (a server
# runs its body without the module's import machinery).


@dataclass(frozen=True)
class Member:
    """One analysis of a fused chunk: its declared reads, options and what ``prepare`` resolved."""

    name: str
    reads: SharedReads
    options: Any
    prepared: dict


def member(analysis: Analysis, model: Any, options: Any, prepared: dict | None = None, name: str | None = None
           ) -> Member | None:
    """The analysis as a member of a fused chunk, or None where it (with these options) declares no reads."""
    prepared = dict(prepared or {})
    reads = analysis.shares(model, options, prepared) if analysis.shares is not None else None
    return None if reads is None else Member(name or analysis.name, reads, options, prepared)


def groups(members: Sequence[Member]) -> list[list[Member]]:
    """Members that can share one trace: the same labels and chat setting (one encoding of the rows)."""
    out: dict[tuple, list[Member]] = {}
    for m in members:
        out.setdefault((tuple(m.options.labels), m.options.chat), []).append(m)
    return list(out.values())


def cut_prefix(cache: Any) -> bool:
    """The trace's key/value cache of every row, cut to all tokens but the last, in place (the prefix the
    patched one-token rows read; the same bits as a forward of the prefix alone, checked by the tests). Only a
    plain cache of full-attention layers is cut (False for others, e.g. Gemma's sliding-window layers, whose
    bookkeeping is not just the keys: the rows step then runs its own prefix forward)."""
    layers = getattr(cache, "layers", None)
    if type(cache).__name__ != "DynamicCache" or not layers or \
            any(type(layer).__name__ != "DynamicLayer" for layer in layers):
        return False
    for layer in layers:  # contiguous: the one-token rows gather from it once per layer and forward
        layer.keys = layer.keys[..., :-1, :].contiguous()
        layer.values = layer.values[..., :-1, :].contiguous()
    return True


@dataclass
class Rows:
    """What the session needs of a :class:`~nnethics.analyses.common.PairBatch`: the encoded rows (texts left
    here), the label ids and the number of pairs ``n`` (rows ``[base_0..base_{n-1}, cf_0..cf_{n-1}]``)."""

    encoded: Any
    label_ids: list[int]
    n: int


def _session(model: Any, batch: Rows, steps: list[tuple], jobs: list[dict]) -> list[Any]:
    """The shared trace and every member's extra rows: one :meth:`~nnethics.models.handle.ModelHandle.session`.
    ``steps``: each member's ``(read, rows)`` (only those travel: ``start`` and ``build`` run here)."""
    cache_wanted = any(j.get("cache") for j in jobs)
    inputs = batch.encoded.inputs()
    width = int(inputs["input_ids"].shape[1])
    cache = None
    with torch.no_grad(), model.trace(logits_to_keep=1) as tracer:
        saved = nnsight.save({})  # by member: invokes finish in any order
        with tracer.invoke(inputs):
            if cache_wanted:
                cache = model.lm.output.cache.save()
        for i, ((read, _), job) in enumerate(zip(steps, jobs)):
            with tracer.invoke():
                saved[i] = read(model, batch, job)
    prefix = None
    if cache is not None and cut_prefix(cache):
        prefix = Prefix(cache, {(s, None): s for s in range(2 * batch.n)}, width - 1, {})
    out = []
    for (_, rows), job, got in zip(steps, jobs, [saved.get(i) for i in range(len(steps))]):
        out.append(got if rows is None else rows(model, batch, job, got, prefix if job.get("cache") else None))
    return out


def _sessions(model: Any, batches: list[Rows], steps: list[tuple], jobs: list[list[dict]]) -> list[list[Any]]:
    """:func:`_session` for each of several chunks, one after the other: one session (one request) for all."""
    return [_session(model, batch, steps, chunk_jobs) for batch, chunk_jobs in zip(batches, jobs)]


def run_chunks(model: Any, chunks: Sequence[Sequence], members: Sequence[Member],
               label_ids: Sequence[int] | None = None) -> list[dict[str, xr.Dataset]]:
    """Every member's Dataset for each chunk of pairs: ONE session (one request remotely) per group for all the
    chunks (``run --per-request``). Each chunk keeps its own encoding and trace, so its bits do not depend on the
    chunks it travels with."""
    from .analyses.common import encode_pairs

    out: list[dict[str, xr.Dataset]] = [{} for _ in chunks]
    for group in groups(members):
        first = group[0].options
        batches = [encode_pairs(model, pairs, list(first.labels), first.chat, label_ids) for pairs in chunks]
        jobs = [[m.reads.start(model, batch, m.options, m.prepared) for m in group] for batch in batches]
        wire = [[{k: v for k, v in job.items() if not k.startswith("_")} for job in js] for js in jobs]  # "_": here
        rows = [Rows(dataclasses.replace(b.encoded, texts=[]), list(b.label_ids), b.n) for b in batches]
        steps = [(m.reads.read, m.reads.rows) for m in group]
        if len(chunks) == 1:  # the request a chunk has always sent
            got = [model.session(_session, rows[0], steps, wire[0])]
        else:
            got = model.session(_sessions, rows, steps, wire)
        for i, (batch, js, g) in enumerate(zip(batches, jobs, got)):
            for m, job, gi in zip(group, js, g):
                out[i][m.name] = m.reads.build(model, batch, job, gi)
    return out


def run_chunk(model: Any, pairs: Sequence, members: Sequence[Member], label_ids: Sequence[int] | None = None
              ) -> dict[str, xr.Dataset]:
    """Every member's Dataset for one chunk of pairs, from ONE shared trace (one request remotely) per group."""
    return run_chunks(model, [pairs], members, label_ids)[0]


def compute_alone(analysis: Analysis, model: Any, pairs: Sequence, options: Any, label_ids: Sequence[int] | None,
                  fallback: Callable[[], xr.Dataset], prepared: dict | None = None) -> xr.Dataset:
    """An analysis' ``compute``: the fused path with itself alone when it declares reads, else ``fallback()``."""
    m = member(analysis, model, options, prepared)
    if m is None:
        return fallback()
    return run_chunk(model, pairs, [m], label_ids)[m.name]


def _todo_groups(parts: dict, prompts: Any) -> dict[tuple[str, ...], list[str]]:
    """Analyses grouped by the prompts each still lacks (its parts and result on disk): a group shares its
    chunks, so each analysis sees the chunks a run of its own would, and a complete one computes nothing."""
    by: dict[tuple[str, ...], list[str]] = {}
    for name, store in parts.items():
        done = store.done_ids()
        todo = tuple(p.prompt_id for p in prompts.pairs if p.prompt_id not in done)
        by.setdefault(todo, []).append(name)
    return by


def run_stored(plans: dict, members: dict[str, Member], model: Any, prompts: Any, store: str,
               label_ids: Sequence[int], batch_size: int = 8, overwrite: bool = False,
               progress: bool | None = None, per_request: int = 1) -> dict[str, xr.Dataset]:
    """The fused analyses of a run, resumably: each writes its own parts and file as a run of its own would
    (``plans``: :class:`nnethics.pipeline.Plan` by name). The caller holds the model folder's lock. Chunks run
    through :func:`nnethics.runner.run_in_chunks` (its out-of-memory halving) with one progress bar per group;
    ``per_request`` chunks share one request (each still its own part: a failed request loses only its chunks)."""
    from .models.remote.stats import STATS
    from .progress import progress_bar, remote_status
    from .runner import chunk_failure, run_in_chunks, say_skipped
    from .store import PartStore, provenance

    parts = {n: PartStore(store, model.store_folder, n, provenance(n, model, prompts, p.recorded, **p.extra_attrs))
             for n, p in plans.items()}
    for ps in parts.values():
        ps.check(overwrite)
    by_id = {p.prompt_id: p for p in prompts.pairs}
    for todo, names in _todo_groups(parts, prompts).items():
        label = f"{'+'.join(names)} [{model.store_folder}]"
        say_skipped(label, len(prompts) - len(todo), len(prompts), parts[names[0]].final.parent)

        def step(chunks: list, names: list[str] = names) -> list[dict]:
            with STATS.scope("+".join(names)):  # one request for every analysis of the chunks
                return run_chunks(model, chunks, [members[n] for n in names], label_ids)

        def write(chunks: list, outs: list[dict], names: list[str] = names) -> None:
            for out in outs:
                for n in names:
                    parts[n].write_part(out[n])

        with progress_bar(len(prompts), label, show=progress, initial=len(prompts) - len(todo)) as bar, \
                remote_status(bar):
            run_in_chunks([by_id[t] for t in todo], batch_size, step, write, bar,
                          chunk_failure(parts[names[0]].final.parent, label), per_step=per_request)
    return {n: parts[n].consolidate(order=prompts.ids(), finalize=plans[n].analysis.finalize) for n in plans}

"""ONE shared trace per chunk for every analysis that declares its reads (:class:`~nnethics.analyses.base.SharedReads`).

The base and counterfactual rows of a chunk run once, left-padded exactly as every analysis encoded them alone
(``[base_0..base_{n-1}, cf_0..cf_{n-1}]``, ``logits_to_keep=1``, the model's default cache). Each analysis reads
that forward in an invoke of its own (nnsight runs every invoke's body against the same forward, in forward
order each), so none knows about the others: decisions read the label logits, attribution projects every part on
the label directions, the lens decodes every layer at the last position. After the trace, in the same session (one
request on NDIF), the analyses that run extra rows do so, patching over the trace's key/value cache cut to the
prefix (every token but the last, :func:`~nnethics.analyses.prefix_cache.trace_prefix`). An analysis alone runs
this same path with itself as the only member, so a fused run and separate runs give the same bits.

This module loads torch. Nothing in the session imports (a server runs its body without the module's import
machinery).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nnsight
import torch
import xarray as xr

from ..analyses.base import Analysis, SharedReads
from ..analyses.common import encode_pairs
from ..analyses.prefix_cache import trace_prefix


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
    prefix = trace_prefix(cache, 2 * batch.n, width)
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

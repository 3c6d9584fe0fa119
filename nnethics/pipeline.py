"""Running registered analyses over a prompt set: options, provenance, chunks, finalisation, one file each."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import xarray as xr

from .analyses import ANALYSES, default_names
from .analyses.common import format_pairs
from .models.remote.stats import STATS
from .prompts import DEFAULT_LABELS, PromptPair, PromptSet, check_context_length, resolve_label_tokens
from .runner import run_analysis
from .store import fingerprint, provenance, result_path, store_lock
from .store.parts import combine
from .store.variables import describe

DEFAULT_ANALYSES = default_names()


@dataclass(frozen=True)
class RunContext:
    """What every analysis of a run shares, resolved once: the labels, their token ids and the chat setting."""

    labels: tuple[str, ...]
    label_ids: tuple[int, ...]
    chat: bool | None = None


def make_context(model: Any, prompts: PromptSet, chat: bool | None = None) -> RunContext:
    """Check the prompts fit the model's context and resolve the label tokens (before any forward)."""
    texts = format_pairs(model.tokenizer, prompts.pairs, chat)
    limit = getattr(model, "context_length", None)
    if limit is not None:
        check_context_length(model.tokenizer, prompts.pairs, texts, *limit)
    label_ids = resolve_label_tokens(model.tokenizer, texts, prompts.labels)
    return RunContext(labels=tuple(prompts.labels), label_ids=tuple(label_ids), chat=chat)


@dataclass(frozen=True)
class Plan:
    """One analysis of a run, resolved once and shared by :func:`run_one` (the CLI) and :func:`analyze` (the API),
    so both compute with the same options and record the same provenance."""

    name: str
    analysis: Any
    options: Any
    prepared: dict
    recorded: dict  # every option as provenance stores it, with what ``prepare`` resolved
    extra_attrs: dict  # provenance attrs beside the options (the resolved label token ids)

    def compute(self, model: Any, pairs: Sequence, label_ids: Sequence[int]) -> Any:
        return self.analysis.compute(model, pairs, self.options, label_ids=label_ids, **self.prepared)

    def attrs(self, model: Any, prompts: PromptSet) -> dict:
        """The file attrs (provenance and its fingerprint), as :meth:`~nnethics.store.PartStore.consolidate` sets
        them."""
        attrs = provenance(self.name, model, prompts, self.recorded, **self.extra_attrs)
        return {**attrs, "fingerprint": fingerprint(attrs)}


def finishing(p: Plan, model: Any, pairs: Sequence[PromptPair], label_ids: Sequence[int], batch_size: int,
              ) -> Callable[[xr.Dataset], xr.Dataset] | None:
    """What runs once on the consolidated Dataset, shared by :func:`run_one` and :func:`analyze`: the analysis'
    ``finalize``, then its ``complete`` pass over ``pairs`` (chunks of ``batch_size``; its remote requests count
    under the analysis name); None when it has neither."""
    fin, done = p.analysis.finalize, p.analysis.complete
    if done is None:
        return fin

    def run(ds: xr.Dataset) -> xr.Dataset:
        ds = fin(ds) if fin is not None else ds
        with STATS.scope(p.name):
            return done(model, ds, pairs, p.options, label_ids=label_ids, batch_size=batch_size, **p.prepared)

    return run


def plan(name: str, model: Any, ctx: RunContext, options: Any = None,
         note: Callable[[str], None] | None = None) -> Plan:
    """Resolve the analysis registered as ``name``: ``options`` default to its defaults (with the variant's fixed
    values) and the context's labels and chat setting; ``prepare`` runs (``note`` receives what it has to say, e.g.
    why a cached tuned lens is not used); every option is recorded, with what ``prepare`` resolved."""
    analysis = ANALYSES[name]
    if options is None:
        options = analysis.make_options(name, labels=ctx.labels, chat=ctx.chat)
    prepared, resolved, notes = analysis.prepare(model, options) if analysis.prepare else ({}, {}, [])
    for text in notes:
        (note or (lambda _: None))(text)
    recorded = {"labels": list(ctx.labels), "chat": ctx.chat, **analysis.record(options), **resolved}
    return Plan(name, analysis, options, prepared, recorded, {"label_token_ids": list(ctx.label_ids)})


def run_one(name: str, model: Any, prompts: PromptSet, store: str, ctx: RunContext, batch_size: int = 8,
            progress: bool | None = None, overwrite: bool = False, lock_timeout: float | None = None,
            options: Any = None, note: Callable[[str], None] | None = None) -> tuple[str, str]:
    """Run the analysis registered as ``name`` (resumably, holding the model folder's lock); its ``finalize`` runs
    once on the consolidated Dataset, then its ``complete`` pass (:func:`finishing`); the file is written once,
    after both; returns ``(path, summary)``. ``options`` and ``note``:
    see :func:`plan`."""
    p = plan(name, model, ctx, options, note)

    def compute(m: Any, pairs: Sequence) -> Any:
        return p.compute(m, pairs, ctx.label_ids)

    # a prepared value with a ``resume`` method (heads' running ranking) learns the chunks a resumed run skips
    resumers = [v.resume for v in p.prepared.values() if callable(getattr(v, "resume", None))]
    path = result_path(store, model.store_folder, name)
    with store_lock(path.parent, timeout=lock_timeout):
        ds = run_analysis(name, compute, model, prompts, store, p.recorded, batch_size=batch_size, progress=progress,
                          extra_attrs=p.extra_attrs, overwrite=overwrite,
                          finalize=finishing(p, model, prompts.pairs, ctx.label_ids, batch_size),
                          resume=(lambda done: [r(done) for r in resumers]) if resumers else None)
    return str(path), p.analysis.summarize(ds)


def run_all(model: Any, prompts: PromptSet, store: str, analyses: Sequence[str] | None = None, chat: bool | None = None,
            batch_size: int = 8, progress: bool | None = None, overwrite: bool = False,
            lock_timeout: float | None = None, note: Callable[[str], None] | None = None,
            overrides: dict[str, dict[str, Any]] | None = None, per_request: int = 1) -> dict[str, tuple[str, str]]:
    """Run each named analysis (default: every default one) with its default options (``overrides``: option values by
    analysis name, e.g. ``{"patching": {"atp": True}}``); ``{name: (path, summary)}``. The analyses that declare
    their reads share ONE trace per chunk (:mod:`nnethics.fused`); the others run one after the other.
    ``per_request``: chunks of the shared trace sent in one session (one NDIF request), each still its own part."""
    _at_least_one(per_request=per_request)
    from .fused import member, run_stored

    ctx = make_context(model, prompts, chat)
    names = tuple(analyses or default_names())
    given = {name: ANALYSES[name].make_options(name, labels=ctx.labels, chat=ctx.chat, **values)
             for name, values in (overrides or {}).items() if name in names}
    plans = {name: plan(name, model, ctx, given.get(name), note) for name in names}
    members = {name: member(p.analysis, model, p.options, p.prepared, name) for name, p in plans.items()}
    fused = {name: p for name, p in plans.items() if members[name] is not None}
    done = {}
    if fused:  # ONE shared trace (one request remotely) per chunk for every analysis that declares its reads
        with store_lock(result_path(store, model.store_folder, next(iter(fused))).parent, timeout=lock_timeout):
            datasets = run_stored(fused, members, model, prompts, store, ctx.label_ids, batch_size, overwrite,
                                  progress, per_request)
        done = {name: (str(result_path(store, model.store_folder, name)), fused[name].analysis.summarize(ds))
                for name, ds in datasets.items()}
    return {name: done[name] if name in done else
            run_one(name, model, prompts, store, ctx, batch_size, progress, overwrite, lock_timeout,
                    options=plans[name].options)
            for name in names}


def _at_least_one(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


def pairs_as_set(pairs: Sequence[PromptPair], labels: Sequence[str] = DEFAULT_LABELS) -> PromptSet:
    """A list of pairs as a :class:`PromptSet` whose ``sha256`` is that of the pairs themselves (every field, in
    order), so provenance names exactly what ran; its name is ``"pairs"``."""
    # a pair's parts (``dilemma``) are left out: they are the text's, and sets hashed before they existed keep their sha
    blob = json.dumps([{k: v for k, v in dataclasses.asdict(p).items() if k != "dilemma"} for p in pairs],
                      sort_keys=True, ensure_ascii=False)
    return PromptSet(tuple(pairs), name="pairs", sha256=hashlib.sha256(blob.encode()).hexdigest(), labels=tuple(labels))


def _options_for(name: str, given: Any, ctx: RunContext) -> Any:
    """``given`` Options for ``name``: the variant's fixed values applied, the shared labels/chat from the prompts."""
    analysis = ANALYSES[name]
    if not isinstance(given, analysis.options):
        raise TypeError(f"{name}= takes {analysis.options.__name__}, got {type(given).__name__}")
    defaults = analysis.options()
    for key, value in (("labels", ctx.labels), ("chat", ctx.chat)):
        mine = getattr(given, key)
        if mine != getattr(defaults, key) and mine != value:
            raise ValueError(f"{name}: {key}={mine!r} differs from the run's {key}={value!r}; pass {key}= to analyze")
    options = dataclasses.replace(given, labels=ctx.labels, chat=ctx.chat, **dict(analysis.variants.get(name, {})))
    if analysis.name_for(options) != name:
        raise ValueError(f"{name}: these options write {analysis.name_for(options)!r}; pass them as "
                         f"{analysis.name_for(options)}=...")
    return options


def analyze(model: Any, prompts: PromptSet | Sequence[PromptPair], analyses: Sequence[str] | None = None, *,
            chat: bool | None = None, labels: Sequence[str] | None = None, batch_size: int = 8,
            note: Callable[[str], None] | None = None, framings: str | Sequence[Any] | None = None,
            templates: dict[str, str] | None = None, per_request: int = 1, **options: Any) -> dict[str, xr.Dataset]:
    """Run each named analysis (default: every default one) over every pair in memory; ``{name: Dataset}``.

    Each Dataset is the one ``nnethics run`` (or the analysis' command) writes to ``store/<model>/<name>.nc``: the
    same variables, ``finalize`` applied, the same provenance and fingerprint (only ``created`` differs). ``prompts``: a :class:`PromptSet` (``ne.load_prompts(...)``) or a list of
    :class:`PromptPair` (recorded as prompt set ``"pairs"`` with the sha256 of the pairs). ``options``: one
    keyword per analysis name with its Options (``patching=PatchingOptions(layers=(0, 1))``; a variant such as
    ``patching_grid`` takes its analysis' class, with the variant's fixed values applied). ``labels`` (for a list
    of pairs), ``chat`` and ``batch_size`` are those options of the CLI (``--labels``, ``--chat``,
    ``--batch-size``): pairs run in chunks of ``batch_size`` as there, because a batched forward's floats depend on
    what else is in the batch (padding), so the same chunks give the same bits.

    ``framings``/``templates``: as ``run --framings``/``--templates`` (keys: :func:`.framings_run.analyze_framings`).
    ``per_request``: as ``run --per-request`` (chunks per NDIF request; the same chunks, the same bits)."""
    _at_least_one(batch_size=batch_size, per_request=per_request)
    if not isinstance(prompts, PromptSet):
        prompts = pairs_as_set(list(prompts), labels or DEFAULT_LABELS)
    elif labels is not None and tuple(labels) != tuple(prompts.labels):
        prompts = dataclasses.replace(prompts, labels=tuple(labels))
    names = tuple(analyses) if analyses is not None else default_names()
    if framings is not None:
        from .framings_run import analyze_framings
        return analyze_framings(model, prompts, framings, names, chat=chat, batch_size=batch_size, note=note,
                                templates=templates, per_request=per_request, **options)
    unknown = [n for n in (*names, *options) if n not in ANALYSES]
    if unknown:
        raise ValueError(f"unknown analysis {unknown[0]!r}; one of {', '.join(ANALYSES)}")
    extra = [n for n in options if n not in names]
    if extra:
        raise ValueError(f"options given for {', '.join(extra)}, which is not among the analyses run ({', '.join(names)})")
    from .fused import member, run_chunks

    ctx = make_context(model, prompts, chat)
    plans = {}
    for name in names:
        opts = _options_for(name, options[name], ctx) if name in options else None
        if opts is not None and ANALYSES[name].check is not None:
            ANALYSES[name].check(model, opts)
        plans[name] = plan(name, model, ctx, opts, note)
    members = {n: member(p.analysis, model, p.options, p.prepared, n) for n, p in plans.items()}
    fused = [n for n in names if members[n] is not None]
    chunks = [prompts.pairs[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    with STATS.scope("+".join(fused)):  # ONE shared trace (one request remotely) per chunk for all of them
        got = [out for i in range(0, len(chunks), per_request) for out in
               run_chunks(model, chunks[i:i + per_request], [members[n] for n in fused], ctx.label_ids)] if fused else []
    out = {}
    for name, p in plans.items():
        if name in fused:
            ds = combine([g[name] for g in got], prompts.ids())
        else:
            with STATS.scope(name):
                ds = combine([p.compute(model, chunk, ctx.label_ids) for chunk in chunks], prompts.ids())
        ds.attrs = p.attrs(model, prompts)
        finish = finishing(p, model, prompts.pairs, ctx.label_ids, batch_size)
        ds = finish(ds) if finish is not None else ds
        out[name] = describe(ds)  # the CF attrs the store's writer adds
    return out

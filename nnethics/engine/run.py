"""The one owner of a run's life: plans -> chunk loop -> one shared trace per chunk -> a sink -> finish.

:func:`execute` is the only driver. For each group of analyses (those that declare their reads and lack the same
prompts share their chunks and ONE trace per chunk; an analysis that declares none computes its chunks alone),
it asks the sink what is still to run, tells an analysis' ``resume`` hook what a resumed run finds done, runs the
chunks through :func:`~.chunks.run_in_chunks` (progress, out-of-memory halving, a failed remote chunk in one line)
and hands each chunk to the sink as it finishes; then, per analysis, ``finalize``, ``complete`` and the sink's
``commit``, once. The sink decides where chunks go (:class:`~.sinks.StoreSink`, :class:`~.sinks.MemorySink`), so
the CLI and the API run the same code and give the same Datasets.

:class:`Run` holds a model folder's lock for a whole run (the analyses, the framings and the report that reads
them): the one place a run takes it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import xarray as xr

from ..analyses import ANALYSES, Analysis, Prepared, default_names
from ..models.remote.stats import STATS
from ..progress import progress_bar, remote_status
from ..prompts import PromptPair, PromptSet
from ..store import StoreConflict, store_lock, write_atomic
from .chunks import run_in_chunks
from .plan import Plan, RunContext, make_context, plans, provenance_attrs
from .sinks import MemorySink, StoreSink


def _groups(members: dict[str, Any], sink: Any) -> Iterator[tuple[list[str], list[PromptPair]]]:
    """``(names, todo)``: the analyses with reads grouped by the prompts each still lacks (a group shares its
    chunks, so each sees the chunks a run of its own would, and a complete one computes nothing); then each
    analysis without reads alone."""
    shared: dict[tuple[str, ...], tuple[list[str], list[PromptPair]]] = {}
    for name, m in members.items():
        if m is not None:
            todo = sink.todo(name)
            shared.setdefault(tuple(p.prompt_id for p in todo), ([], todo))[0].append(name)
    yield from shared.values()
    for name, m in members.items():
        if m is None:
            yield [name], sink.todo(name)


def _step(model: Any, plans_: dict[str, Plan], members: dict[str, Any], names: list[str]) -> Callable:
    """A group's step: a list of chunks -> ``[{name: Dataset}]`` (ONE session for all of a shared group)."""
    from .trace import run_chunks

    scope = "+".join(names)
    if members[names[0]] is not None:
        def step(chunks: list) -> list[dict[str, xr.Dataset]]:
            with STATS.scope(scope):  # one request for every analysis of the chunks
                return run_chunks(model, chunks, [members[n] for n in names], plans_[names[0]].label_ids)
        return step
    p = plans_[names[0]]

    def alone(chunks: list) -> list[dict[str, xr.Dataset]]:
        with STATS.scope(scope):
            return [{p.name: p.analysis.compute(model, chunk, p.options, label_ids=p.label_ids, **p.prepared.values)}
                    for chunk in chunks]
    return alone


def _finish(model: Any, p: Plan, ds: xr.Dataset, pairs: Sequence[PromptPair], batch_size: int) -> xr.Dataset:
    """``finalize``, then the ``complete`` pass over ``pairs`` (its remote requests count under the analysis)."""
    if p.analysis.finalize is not None:
        ds = p.analysis.finalize(ds)
    if p.analysis.complete is not None:
        with STATS.scope(p.name):
            ds = p.analysis.complete(model, ds, pairs, p.options, label_ids=p.label_ids, batch_size=batch_size,
                                     **p.prepared.values)
    return ds


def execute(model: Any, prompts: PromptSet, plans_: dict[str, Plan], sink: Any, batch_size: int = 8,
            per_request: int = 1, progress: bool | None = False) -> dict[str, xr.Dataset]:
    """Every plan's Dataset, through ``sink``; see the module docstring. ``per_request``: chunks of a shared group
    sent in one session (one NDIF request), each still its own chunk for the sink."""
    from .trace import member

    for p in plans_.values():  # the API's path to what the CLI checks before the model loads
        if p.analysis.check_pairs is not None:
            p.analysis.check_pairs(p.options, prompts.pairs)
    members = {n: member(p.analysis, model, p.options, p.prepared.values, n) for n, p in plans_.items()}
    out: dict[str, xr.Dataset] = {}
    for names, todo in _groups(members, sink):
        for name in names:
            if todo and len(todo) < len(prompts) and plans_[name].analysis.resume is not None:
                plans_[name].analysis.resume(plans_[name].prepared, sink.done(name))
        label = f"{'+'.join(names)} [{model.store_folder}]"
        sink.skipped(label, len(todo))

        def put(chunks: list, outs: list[dict], names: list[str] = names) -> None:
            for got in outs:
                for n in names:
                    sink.put(n, got[n])

        if todo:
            with progress_bar(len(prompts), label, show=progress, initial=len(prompts) - len(todo)) as bar, \
                    remote_status(bar):
                run_in_chunks(todo, batch_size, _step(model, plans_, members, names), put, bar, sink.failure(label),
                              per_step=per_request if members[names[0]] is not None else 1)
        for name in names:
            out[name] = sink.commit(name, _finish(model, plans_[name], sink.gather(name), prompts.pairs, batch_size))
    return out


def at_least_one(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


def refuse_existing(path: Path, overwrite: bool) -> None:
    """:class:`StoreConflict` when ``path`` exists and ``overwrite`` is not given (:meth:`Run.write`'s rule, which a
    command can also check before its model loads)."""
    if path.exists() and not overwrite:
        raise StoreConflict(f"{path} exists; rerun with --overwrite to replace it, or pass another --store to keep both")


class Run:
    """A run over one model's store folder (``store/<model>/``): holds its lock from ``with`` to its end, and runs
    analyses there (:meth:`analyses`, :meth:`one`); the CLI builds the report inside it too. A busy folder is
    waited for (``lock_timeout`` seconds; 0 refuses at once; None: ``$NNETHICS_LOCK_TIMEOUT``, else as long as it
    takes)."""

    def __init__(self, model: Any, store: str | Path, *, overwrite: bool = False, lock_timeout: float | None = None,
                 batch_size: int = 8, progress: bool | None = None, per_request: int = 1,
                 note: Callable[[str], None] | None = None) -> None:
        at_least_one(batch_size=batch_size, per_request=per_request)
        self.model, self.store, self.overwrite, self.lock_timeout = model, str(store), overwrite, lock_timeout
        self.batch_size, self.progress, self.per_request, self.note = batch_size, progress, per_request, note
        self._lock: Any = None

    @property
    def folder(self) -> Path:
        return Path(self.store) / self.model.slug

    def __enter__(self) -> Run:
        self._lock = store_lock(self.folder, timeout=self.lock_timeout)
        self._lock.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._lock.__exit__(*exc)

    def write(self, name: str, ds: xr.Dataset, recorded: Mapping[str, Any], prompts: PromptSet | None = None) -> Path:
        """A file that no analysis writes (``nnethics lens eval``'s lens_eval.nc) into this run's folder, under its
        lock: its provenance by :func:`~nnethics.engine.plan.provenance_attrs` (``recorded``: its options), written
        atomically. One already there is replaced only with ``overwrite`` (else :class:`StoreConflict`, nothing
        written)."""
        path = self.folder / f"{name}.nc"
        refuse_existing(path, self.overwrite)
        ds = ds.copy(deep=False)
        ds.attrs = {**provenance_attrs(name, self.model, prompts, recorded), **ds.attrs}
        return Path(write_atomic(ds, path))

    def results(self, model: Any, prompts: PromptSet, plans_: dict[str, Plan]) -> dict[str, tuple[str, xr.Dataset]]:
        """:func:`execute` into the store (``model``: this run's, or a framing of it, which writes a subfolder);
        ``{name: (path, Dataset)}``."""
        sink = StoreSink(model, prompts, plans_, self.store, self.overwrite)
        got = execute(model, prompts, plans_, sink, self.batch_size, self.per_request, self.progress)
        return {n: (sink.path(n), ds) for n, ds in got.items()}

    def execute(self, model: Any, prompts: PromptSet, plans_: dict[str, Plan]) -> dict[str, tuple[str, str]]:
        """:meth:`results`, each Dataset as its summary line: ``{name: (path, summary)}``."""
        return {n: (path, plans_[n].analysis.summarize(ds))
                for n, (path, ds) in self.results(model, prompts, plans_).items()}

    def analyses(self, prompts: PromptSet, names: Sequence[str] | None = None, chat: bool | None = None,
                 overrides: dict[str, dict[str, Any]] | None = None, model: Any = None
                 ) -> dict[str, tuple[str, str]]:
        """Each named analysis (default: every default one) with its default options (``overrides``: option values
        by analysis name, e.g. ``{"patching": {"atp": True}}``); ``{name: (path, summary)}``."""
        model = model or self.model
        ctx = make_context(model, prompts, chat)
        names = tuple(names or default_names())
        given = {name: ANALYSES[name].make_options(name, labels=ctx.labels, chat=ctx.chat, **values)
                 for name, values in (overrides or {}).items() if name in names}
        return self.execute(model, prompts, plans(model, ctx, names, given, self.note))

    def one(self, name: str, prompts: PromptSet, ctx: RunContext | None = None, options: Any = None,
            chat: bool | None = None) -> tuple[str, str]:
        """The analysis (or variant) ``name`` alone, with ``options`` (default: its defaults, with ``chat``);
        ``(path, summary)``."""
        ctx = ctx or make_context(self.model, prompts, options.chat if options is not None else chat)
        given = {name: options} if options is not None else {}
        return self.execute(self.model, prompts, plans(self.model, ctx, [name], given, self.note))[name]


def run_all(model: Any, prompts: PromptSet, store: str, analyses: Sequence[str] | None = None, chat: bool | None = None,
            batch_size: int = 8, progress: bool | None = None, overwrite: bool = False,
            lock_timeout: float | None = None, note: Callable[[str], None] | None = None,
            overrides: dict[str, dict[str, Any]] | None = None, per_request: int = 1) -> dict[str, tuple[str, str]]:
    """:meth:`Run.analyses` in a run of its own (the lock held for it alone)."""
    with Run(model, store, overwrite=overwrite, lock_timeout=lock_timeout, batch_size=batch_size, progress=progress,
             per_request=per_request, note=note) as run:
        return run.analyses(prompts, analyses, chat, overrides)


def run_one(name: str, model: Any, prompts: PromptSet, store: str, ctx: RunContext | None = None,
            batch_size: int = 8, progress: bool | None = None, overwrite: bool = False,
            lock_timeout: float | None = None, options: Any = None) -> tuple[str, str]:
    """:meth:`Run.one` in a run of its own (the lock held for it alone)."""
    with Run(model, store, overwrite=overwrite, lock_timeout=lock_timeout, batch_size=batch_size,
             progress=progress) as run:
        return run.one(name, prompts, ctx, options)


@dataclasses.dataclass(frozen=True)
class _NoOptions:
    labels: tuple[str, ...] = ()
    chat: bool | None = None


def run_function(name: str, fn: Callable[[Any, Sequence[PromptPair]], xr.Dataset], model: Any, prompts: PromptSet,
                 store: str, options: Mapping[str, Any], batch_size: int = 8, progress: bool | None = None,
                 overwrite: bool = False, lock_timeout: float | None = None,
                 finalize: Callable[[xr.Dataset], xr.Dataset] | None = None) -> xr.Dataset:
    """A plain function ``fn(model, pairs) -> Dataset`` (dim ``prompt``) run as an analysis of its own into
    ``store/<model>/<name>.nc``, through the same engine (parts, resume, out-of-memory halving, the lock):
    ``options`` is what provenance records of it; ``finalize`` runs once on the consolidated Dataset."""
    analysis = Analysis(name=name, options=_NoOptions, summarize=lambda ds: "", help="",
                        compute=lambda m, pairs, options, label_ids=None: fn(m, pairs), finalize=finalize)
    p = Plan(name, analysis, _NoOptions(), Prepared(), dict(options), None)
    with Run(model, store, overwrite=overwrite, lock_timeout=lock_timeout, batch_size=batch_size,
             progress=progress) as run:
        return run.results(model, prompts, {name: p})[name][1]


def in_memory(model: Any, prompts: PromptSet, plans_: dict[str, Plan], batch_size: int = 8, per_request: int = 1
              ) -> dict[str, xr.Dataset]:
    """:func:`execute` into memory (:func:`nnethics.engine.analyze`)."""
    return execute(model, prompts, plans_, MemorySink(model, prompts, plans_), batch_size, per_request, False)

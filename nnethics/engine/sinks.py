"""Where a run's chunks go: the store (:class:`StoreSink`, resumable) or memory (:class:`MemorySink`, the API).

Both take the same calls from :func:`nnethics.engine.run.execute`, in this order for each analysis: ``todo``
(the pairs still to run), ``done`` (what a resumed run finds finished, for an analysis' ``resume`` hook),
``put`` (each finished chunk), ``gather`` (the chunks in prompt order, with the plan's provenance) and ``commit``
(once, after ``finalize`` and ``complete``). The store writes each chunk as an atomic part, and the file once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import xarray as xr

from ..prompts import PromptPair, PromptSet
from ..store import PartStore
from ..store.parts import combine
from ..store.variables import describe
from .chunks import chunk_failure, say_skipped
from .plan import Plan


class MemorySink:
    """Chunks kept in memory: every pair runs; the Dataset is the file's, never written."""

    def __init__(self, model: Any, prompts: PromptSet, plans: dict[str, Plan]) -> None:
        self.model, self.prompts, self.plans = model, prompts, plans
        self.chunks: dict[str, list[xr.Dataset]] = {name: [] for name in plans}

    def todo(self, name: str) -> list[PromptPair]:
        return list(self.prompts.pairs)

    def done(self, name: str) -> list[xr.Dataset]:
        return []

    def put(self, name: str, ds: xr.Dataset) -> None:
        self.chunks[name].append(ds)

    def gather(self, name: str) -> xr.Dataset:
        ds = combine(self.chunks.pop(name), self.prompts.ids())
        ds.attrs = self.plans[name].attrs(self.model, self.prompts)
        return ds

    def commit(self, name: str, ds: xr.Dataset) -> xr.Dataset:
        return describe(ds)  # the CF attrs the store's writer adds

    def failure(self, label: str) -> Callable[..., BaseException | None] | None:
        return None

    def skipped(self, label: str, todo: int) -> None:
        pass

    def path(self, name: str) -> str | None:
        return None


class StoreSink:
    """Chunks as parts under ``store/<model folder>/``: a rerun skips what is stored, a crash loses only the chunk
    that ran. The caller holds the store's lock (:class:`nnethics.engine.run.Run`). A result or parts of other
    options are refused (:class:`~nnethics.store.StoreConflict`) unless ``overwrite``, before any forward."""

    def __init__(self, model: Any, prompts: PromptSet, plans: dict[str, Plan], store: str | Path,
                 overwrite: bool = False) -> None:
        self.model, self.prompts, self.plans = model, prompts, plans
        self.parts = {name: PartStore(store, model.store_folder, name, p.provenance(model, prompts))
                      for name, p in plans.items()}
        for parts in self.parts.values():
            parts.check(overwrite)

    @property
    def folder(self) -> Path:
        return next(iter(self.parts.values())).final.parent

    def todo(self, name: str) -> list[PromptPair]:
        done = self.parts[name].done_ids()
        return [p for p in self.prompts.pairs if p.prompt_id not in done]

    def done(self, name: str) -> list[xr.Dataset]:
        prev = self.parts[name].previous()
        return [*([prev] if prev is not None else []), *self.parts[name].load_parts()]

    def put(self, name: str, ds: xr.Dataset) -> None:
        self.parts[name].write_part(ds)

    def gather(self, name: str) -> xr.Dataset:
        return self.parts[name].gather(order=self.prompts.ids())

    def commit(self, name: str, ds: xr.Dataset) -> xr.Dataset:
        self.parts[name].commit(ds)
        return ds

    def failure(self, label: str) -> Callable[..., BaseException | None]:
        return chunk_failure(self.folder, label)

    def skipped(self, label: str, todo: int) -> None:
        say_skipped(label, len(self.prompts) - todo, len(self.prompts), self.folder)

    def path(self, name: str) -> str:
        return str(self.parts[name].final)

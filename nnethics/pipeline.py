"""The registry of analyses that ``nnethics run`` composes, and the loop that runs them."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from .analyses.common import format_pairs
from .analyses.spec import AnalysisSpec, RunContext
from .prompts import PromptSet, check_context_length, resolve_label_tokens
from .runner import run_analysis
from .store import result_path, write_atomic
from .storelock import store_lock

# Modules that expose ``SPEC: AnalysisSpec``, in the order ``nnethics run`` runs them.
ANALYSIS_MODULES = ("decisions", "patching", "attribution", "lens")


def _collect() -> dict[str, AnalysisSpec]:
    specs = {}
    for mod in ANALYSIS_MODULES:
        try:
            module = importlib.import_module(f"nnethics.analyses.{mod}")
        except ModuleNotFoundError as e:
            if e.name == f"nnethics.analyses.{mod}":
                continue
            raise
        # A module exposes its main analysis as SPEC and optional variants (e.g. patching_grid) as SPECS.
        for spec in [getattr(module, "SPEC", None), *getattr(module, "SPECS", ())]:
            if spec is not None:
                specs.setdefault(spec.name, spec)
    return specs


ANALYSES: dict[str, AnalysisSpec] = _collect()
DEFAULT_ANALYSES = tuple(name for name, spec in ANALYSES.items() if spec.default)


def make_context(model: Any, prompts: PromptSet, chat: bool | None = None, extra: dict | None = None) -> RunContext:
    texts = format_pairs(model.tokenizer, prompts.pairs, chat)
    limit = getattr(model, "context_length", None)
    if limit is not None:
        check_context_length(model.tokenizer, prompts.pairs, texts, *limit)
    label_ids = resolve_label_tokens(model.tokenizer, texts, prompts.labels)
    return RunContext(labels=tuple(prompts.labels), label_ids=tuple(label_ids), chat=chat, extra=extra or {})


def run_one(name: str, model: Any, prompts: PromptSet, store: str, ctx: RunContext, batch_size: int = 8,
            progress: bool | None = None, overwrite: bool = False, lock_timeout: float | None = None) -> tuple[str, str]:
    """Run one analysis (resumably, holding the model folder's lock); returns ``(path, summary)``."""
    spec = ANALYSES[name]
    fn, options = spec.build(model, ctx)
    options = {"labels": list(ctx.labels), "chat": ctx.chat, **options}
    path = result_path(store, model.slug, name)
    with store_lock(path.parent, timeout=lock_timeout):
        ds = run_analysis(name, fn, model, prompts, store, options, batch_size=batch_size, progress=progress,
                          extra_attrs={"label_token_ids": list(ctx.label_ids)}, overwrite=overwrite)
        if spec.finalize is not None:
            ds = spec.finalize(ds)
            write_atomic(ds, path)
    return str(path), spec.summary(ds)


def run_all(model: Any, prompts: PromptSet, store: str, analyses: Sequence[str] | None = None, chat: bool | None = None,
            batch_size: int = 8, progress: bool | None = None, extra: dict | None = None, overwrite: bool = False,
            lock_timeout: float | None = None) -> dict[str, tuple[str, str]]:
    """Run each named analysis over the prompt set; returns ``{name: (path, summary)}``."""
    ctx = make_context(model, prompts, chat, extra)
    return {name: run_one(name, model, prompts, store, ctx, batch_size, progress, overwrite, lock_timeout)
            for name in (analyses or DEFAULT_ANALYSES)}

"""Running registered analyses over a prompt set: options, provenance, chunks, finalisation, one file each."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .analyses import ANALYSES, default_names
from .analyses.common import format_pairs
from .prompts import PromptSet, check_context_length, resolve_label_tokens
from .runner import run_analysis
from .store import result_path, store_lock

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


def run_one(name: str, model: Any, prompts: PromptSet, store: str, ctx: RunContext, batch_size: int = 8,
            progress: bool | None = None, overwrite: bool = False, lock_timeout: float | None = None,
            options: Any = None, note: Callable[[str], None] | None = None) -> tuple[str, str]:
    """Run the analysis registered as ``name`` (resumably, holding the model folder's lock); its ``finalize`` runs
    once on the consolidated Dataset, which is written once; returns ``(path, summary)``.

    ``options`` default to the analysis' defaults (with the variant's fixed values) and the context's labels and
    chat setting. Every option is recorded in provenance, with what ``prepare`` resolved; ``note`` receives what
    ``prepare`` has to say (e.g. why a cached tuned lens is not used).
    """
    analysis = ANALYSES[name]
    if options is None:
        options = analysis.make_options(name, labels=ctx.labels, chat=ctx.chat)
    prepared, resolved, notes = analysis.prepare(model, options) if analysis.prepare else ({}, {}, [])
    for text in notes:
        (note or (lambda _: None))(text)
    recorded = {"labels": list(ctx.labels), "chat": ctx.chat, **analysis.record(options), **resolved}

    def compute(m: Any, pairs: Sequence) -> Any:
        return analysis.compute(m, pairs, options, label_ids=ctx.label_ids, **prepared)

    path = result_path(store, model.slug, name)
    with store_lock(path.parent, timeout=lock_timeout):
        ds = run_analysis(name, compute, model, prompts, store, recorded, batch_size=batch_size, progress=progress,
                          extra_attrs={"label_token_ids": list(ctx.label_ids)}, overwrite=overwrite,
                          finalize=analysis.finalize)
    return str(path), analysis.summarize(ds)


def run_all(model: Any, prompts: PromptSet, store: str, analyses: Sequence[str] | None = None, chat: bool | None = None,
            batch_size: int = 8, progress: bool | None = None, overwrite: bool = False,
            lock_timeout: float | None = None, note: Callable[[str], None] | None = None) -> dict[str, tuple[str, str]]:
    """Run each named analysis (default: every default one) with its default options; ``{name: (path, summary)}``."""
    ctx = make_context(model, prompts, chat)
    return {name: run_one(name, model, prompts, store, ctx, batch_size, progress, overwrite, lock_timeout, note=note)
            for name in (analyses or default_names())}

"""What a run resolves before its first forward: the context every analysis shares and one :class:`Plan` each.

A plan is the same for the CLI and the API (:func:`nnethics.engine.analyze`): the same options, the same
``prepare`` output, and the one place provenance is built (:meth:`Plan.provenance`), so a file on disk and a
Dataset in memory carry the same attributes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..analyses import ANALYSES, Analysis, Prepared
from ..analyses.common import format_pairs
from ..prompts import DEFAULT_LABELS, PromptPair, PromptSet, check_context_length, resolve_label_tokens
from ..store import fingerprint, provenance


@dataclass(frozen=True)
class RunContext:
    """What every analysis of a run shares, resolved once: the labels, their token ids and the chat setting."""

    labels: tuple[str, ...]
    label_ids: tuple[int, ...]
    chat: bool | None = None


def make_context(model: Any, prompts: PromptSet, chat: bool | None = None) -> RunContext:
    """Check the prompts fit the model's context and resolve the label tokens (before any forward).

    The texts formatted here are formatted again when each chunk is encoded (``encode_pairs``), on purpose: an
    analysis' chunk stays self-contained (its pairs in, its Dataset out; ``ne.analyze`` and the per-technique
    functions take pairs, not texts), and the cost is negligible: 0.058 ms per text with the built-in model's chat
    template (140 texts in 8 ms, measured), against 0.39 s of CPU time for one forward of one prompt of that
    model at one thread (scripts/bench_run.py's unit)."""
    texts = format_pairs(model.tokenizer, prompts.pairs, chat)
    limit = getattr(model, "context_length", None)
    if limit is not None:
        check_context_length(model.tokenizer, prompts.pairs, texts, *limit)
    label_ids = resolve_label_tokens(model.tokenizer, texts, prompts.labels)
    return RunContext(labels=tuple(prompts.labels), label_ids=tuple(label_ids), chat=chat)


def provenance_attrs(name: str, model: Any, prompts: PromptSet | None, recorded: Mapping[str, Any],
                     label_ids: Sequence[int] | None = None) -> dict:
    """The provenance attrs (without their fingerprint) of a file nnethics stores: the one place they are built,
    for every analysis' file (:meth:`Plan.provenance`), framings.nc and lens_eval.nc alike. ``recorded``: every
    option; ``label_ids``: the labels' token ids (None: the file reads no labels)."""
    extra = {} if label_ids is None else {"label_token_ids": list(label_ids)}
    return provenance(name, model, prompts, recorded, **extra)


@dataclass(frozen=True)
class Plan:
    """One analysis of a run (``name``: its file name, the analysis' own or a variant's), resolved once."""

    name: str
    analysis: Analysis
    options: Any
    prepared: Prepared
    recorded: dict  # every option as provenance stores it, with what ``prepare`` resolved
    label_ids: tuple[int, ...] | None  # None: a function that reads no labels (:func:`nnethics.engine.run_function`)

    def provenance(self, model: Any, prompts: PromptSet) -> dict:
        """The file's provenance attrs (without their fingerprint), by :func:`provenance_attrs`."""
        return provenance_attrs(self.name, model, prompts, self.recorded, self.label_ids)

    def attrs(self, model: Any, prompts: PromptSet) -> dict:
        """:meth:`provenance` with its fingerprint, as the stored file has them."""
        attrs = self.provenance(model, prompts)
        return {**attrs, "fingerprint": fingerprint(attrs)}


def plan(name: str, model: Any, ctx: RunContext, options: Any = None,
         note: Callable[[str], None] | None = None) -> Plan:
    """Resolve the analysis registered as ``name``: ``options`` default to its defaults (with the variant's fixed
    values) and the context's labels and chat setting; ``prepare`` runs (``note`` receives what it has to say, e.g.
    why a cached tuned lens is not used); every option is recorded, with what ``prepare`` resolved."""
    analysis = ANALYSES[name]
    if options is None:
        options = analysis.make_options(name, labels=ctx.labels, chat=ctx.chat)
    prepared = analysis.prepare(model, options) if analysis.prepare else Prepared()
    for text in prepared.notes:
        (note or (lambda _: None))(text)
    recorded = {"labels": list(ctx.labels), "chat": ctx.chat, **analysis.record(options), **prepared.recorded}
    return Plan(name, analysis, options, prepared, recorded, tuple(ctx.label_ids))


def plans(model: Any, ctx: RunContext, names: Sequence[str], given: dict[str, Any] | None = None,
          note: Callable[[str], None] | None = None) -> dict[str, Plan]:
    """A :func:`plan` for each name (``given``: Options by name, checked against the model first)."""
    out = {}
    for name in names:
        options = (given or {}).get(name)
        if options is not None and ANALYSES[name].check is not None:
            ANALYSES[name].check(model, options)
        out[name] = plan(name, model, ctx, options, note)
    return out


def options_for(name: str, given: Any, ctx: RunContext) -> Any:
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


def pairs_as_set(pairs: Sequence[PromptPair], labels: Sequence[str] = DEFAULT_LABELS) -> PromptSet:
    """A list of pairs as a :class:`PromptSet` whose ``sha256`` is that of the pairs themselves (every field, in
    order), so provenance names exactly what ran; its name is ``"pairs"``."""
    # a pair's parts (``dilemma``) are left out: they are the text's, and sets hashed before they existed keep their sha
    blob = json.dumps([{k: v for k, v in dataclasses.asdict(p).items() if k != "dilemma"} for p in pairs],
                      sort_keys=True, ensure_ascii=False)
    return PromptSet(tuple(pairs), name="pairs", sha256=hashlib.sha256(blob.encode()).hexdigest(), labels=tuple(labels))

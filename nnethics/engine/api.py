"""The Python API of a run: :func:`analyze` (what ``nnethics run`` writes, in memory) and one function per
technique, each a thin call of the engine on one chunk of pairs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import xarray as xr

from ..analyses import ANALYSES, default_names
from ..prompts import DEFAULT_LABELS, PromptPair, PromptSet
from .plan import make_context, options_for, pairs_as_set, plans
from .run import at_least_one, in_memory


def analyze(model: Any, prompts: PromptSet | Sequence[PromptPair], analyses: Sequence[str] | None = None, *,
            chat: bool | None = None, labels: Sequence[str] | None = None, batch_size: int = 8,
            note: Callable[[str], None] | None = None, framings: str | Sequence[Any] | None = None,
            templates: dict[str, str] | None = None, per_request: int = 1, **options: Any) -> dict[str, xr.Dataset]:
    """Run each named analysis (default: every default one) over every pair in memory; ``{name: Dataset}``.

    Each Dataset is the one ``nnethics run`` (or the analysis' command) writes to ``store/<model>/<name>.nc``: the
    same variables, ``finalize`` applied, the same provenance and fingerprint (only ``created`` differs): the same
    engine runs both (:func:`nnethics.engine.run.execute`), into memory here. ``prompts``: a :class:`PromptSet`
    (``ne.load_prompts(...)``) or a list of :class:`PromptPair` (recorded as prompt set ``"pairs"`` with the sha256
    of the pairs). ``options``: one keyword per analysis name with its Options (``patching=PatchingOptions(layers=
    (0, 1))``; a variant such as ``patching_grid`` takes its analysis' class, with the variant's fixed values
    applied). ``labels`` (for a list of pairs), ``chat`` and ``batch_size`` are those options of the CLI
    (``--labels``, ``--chat``, ``--batch-size``): pairs run in chunks of ``batch_size`` as there, because a batched
    forward's floats depend on what else is in the batch (padding), so the same chunks give the same bits; a chunk
    that runs out of memory is halved, as there.

    ``framings``/``templates``: as ``run --framings``/``--templates`` (keys: :func:`.framings_run.analyze_framings`).
    ``per_request``: as ``run --per-request`` (chunks per NDIF request; the same chunks, the same bits)."""
    at_least_one(batch_size=batch_size, per_request=per_request)
    if not isinstance(prompts, PromptSet):
        prompts = pairs_as_set(list(prompts), labels or DEFAULT_LABELS)
    elif labels is not None and tuple(labels) != tuple(prompts.labels):
        prompts = dataclasses.replace(prompts, labels=tuple(labels))
    names = tuple(analyses) if analyses is not None else default_names()
    if framings is not None:
        from ..framings_run import analyze_framings
        return analyze_framings(model, prompts, framings, names, analyze=analyze, chat=chat, batch_size=batch_size,
                                note=note, templates=templates, per_request=per_request, **options)
    unknown = [n for n in (*names, *options) if n not in ANALYSES]
    if unknown:
        raise ValueError(f"unknown analysis {unknown[0]!r}; one of {', '.join(ANALYSES)}")
    extra = [n for n in options if n not in names]
    if extra:
        raise ValueError(f"options given for {', '.join(extra)}, which is not among the analyses run ({', '.join(names)})")
    ctx = make_context(model, prompts, chat)
    given = {name: options_for(name, options[name], ctx) for name in names if name in options}
    return in_memory(model, prompts, plans(model, ctx, names, given, note), batch_size, per_request)


def chunk(name: str, model: Any, pairs: Sequence[PromptPair], options: Any = None,
          label_ids: Sequence[int] | None = None, **prepared: Any) -> xr.Dataset:
    """The analysis ``name``'s Dataset of ``pairs`` as ONE chunk (one forward batch; no ``finalize``, no
    provenance): what each chunk of a run holds. ``options``: its Options (default: its defaults); ``label_ids``:
    the labels' token ids (default: resolved from these prompts); ``prepared``: what its ``prepare`` would pass
    (e.g. ``tuned_lens=``; default: ``prepare``'s own)."""
    from .trace import member, run_chunks

    analysis = ANALYSES[name]
    options = options if options is not None else analysis.make_options(name)
    if not prepared and analysis.prepare is not None:
        prepared = dict(analysis.prepare(model, options).values)
    m = member(analysis, model, options, prepared, name)
    if m is not None:
        return run_chunks(model, [list(pairs)], [m], label_ids)[0][name]
    return analysis.compute(model, list(pairs), options, label_ids=label_ids, **prepared)


def baseline_decisions(model: Any, pairs: Sequence[PromptPair], options: Any = None,
                       label_ids: Sequence[int] | None = None) -> xr.Dataset:
    """Decisions for every pair, both sides, as one chunk (see :mod:`nnethics.analyses.decisions`)."""
    return chunk("decisions", model, pairs, options, label_ids)


def activation_patching(model: Any, pairs: Sequence[PromptPair], options: Any = None,
                        label_ids: Sequence[int] | None = None) -> xr.Dataset:
    """Patch every (layer, component[, position]) cell of every pair and measure the decision, as one chunk
    (see :mod:`nnethics.analyses.patching`; a variant's options write the same variables)."""
    return chunk("patching", model, pairs, options, label_ids)


def causal_tracing(model: Any, pairs: Sequence[PromptPair], options: Any = None,
                   label_ids: Sequence[int] | None = None) -> xr.Dataset:
    """Noise corruption and clean-state restoration (ROME): :func:`activation_patching` with
    ``corruption="noise"``."""
    options = options if options is not None else ANALYSES["patching"].make_options("patching")
    return activation_patching(model, pairs, dataclasses.replace(options, corruption="noise"), label_ids)


def direct_logit_attribution(model: Any, pairs: Sequence[PromptPair], options: Any = None,
                             label_ids: Sequence[int] | None = None) -> xr.Dataset:
    """Each layer's attention and MLP (and head / expert) contribution to the label logit difference, as one chunk
    (see :mod:`nnethics.analyses.attribution`). Whether heads came back per option (it depends on where the handle
    runs traces, :func:`nnethics.analyses.attribution.per_option_heads`) is recorded as the attrs ``head_options``
    (``"true"``/``"false"``) and ``head_options_reason`` of ``head_contribution``."""
    return chunk("attribution", model, pairs, options, label_ids)


def logit_lens(model: Any, pairs: Sequence[PromptPair], options: Any = None,
               label_ids: Sequence[int] | None = None, tuned_lens: Any = None) -> xr.Dataset:
    """The logit lens (and ``tuned_lens``, if given) at the decision position of every pair, both sides, as one
    chunk (see :mod:`nnethics.analyses.lens`)."""
    return chunk("lens", model, pairs, options, label_ids, tuned_lens=tuned_lens)

"""The Python API of a run: :func:`analyze` (what ``nnethics run`` writes, in memory), :func:`chunk`, and the
functions the analyses declare (``ne.activation_patching`` ...: :func:`function`), each a thin call of
:func:`chunk` on one chunk of pairs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import xarray as xr

from ..analyses import ANALYSES, analyses, default_names
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


_MADE: dict[tuple[str, int], Callable[..., xr.Dataset]] = {}


def function(name: str) -> Callable[..., xr.Dataset]:
    """The Python API function ``name`` that a registered analysis declares (:class:`~nnethics.analyses.Function`):
    ``(model, pairs, options=None, label_ids=None, **prepared) -> xr.Dataset``, the analysis on one chunk
    (:func:`chunk`) with the function's fixed option values applied (``ne.causal_tracing`` is patching with
    ``corruption="noise"``)."""
    for analysis in analyses():
        if name in analysis.functions:
            key = (name, id(analysis))
            if key not in _MADE:  # one function object per declaration: ne.x is ne.x
                _MADE[key] = _function(analysis, name, analysis.functions[name])
            return _MADE[key]
    raise AttributeError(f"no registered analysis declares a function {name!r}")


def function_names() -> tuple[str, ...]:
    """Every API function the registered analyses declare, in registry order."""
    return tuple(name for analysis in analyses() for name in analysis.functions)


def _function(analysis: Any, name: str, spec: Any) -> Callable[..., xr.Dataset]:
    def technique(model: Any, pairs: Sequence[PromptPair], options: Any = None,
                  label_ids: Sequence[int] | None = None, **prepared: Any) -> xr.Dataset:
        options = options if options is not None else analysis.make_options(analysis.name)
        if spec.fixed:
            options = dataclasses.replace(options, **spec.fixed)
        return chunk(analysis.name, model, pairs, options, label_ids, **prepared)

    technique.__name__ = technique.__qualname__ = name
    technique.__doc__ = spec.doc
    technique.__module__ = __name__
    return technique

"""Running analyses across framings: every selected framing of the structured pairs, the cloze readout, the summary.

Layout of a model folder after ``nnethics run --framings ...``::

    store/<model>/framings/<framing id>/<analysis>.nc   each framing's files (attrs and a ``framing`` coordinate)
    store/<model>/cloze.nc                                the cloze readout of the structured pairs (no framing)
    store/<model>/framings.nc                             the decision across framings and its verdict

The model folder's own ``decisions.nc`` etc. are the prompts' own text, as without ``--framings``: a framed run
never touches them. :func:`run_framings` (the CLI) and :func:`analyze_framings` (``ne.analyze(...,
framings=...)``) run the same plans and give the same Datasets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import xarray as xr

from .framings import Framing, check_labels, frame, structured

SUMMARY = "framings"  # store/<model>/framings.nc
CLOZE = "cloze"
FOLDER = "framings"  # store/<model>/framings/<id>/


def framed_model(model: Any, framing: Framing) -> Any:
    """The model handle writing into its framing's folder (the same weights; a shallow copy)."""
    return dataclasses.replace(model, folder=f"{model.slug}/{FOLDER}/{framing.id}")


def framing_folder(store: str | Path, model: Any, framing_id: str) -> Path:
    return Path(store) / model.slug / FOLDER / framing_id


def prepare(prompts: Any, framings: Sequence[Framing]) -> tuple[dict[str, Any], list[str]]:
    """``({framing id: framed prompt set}, free-text ids)``, before the model loads (raises FramingError)."""
    sets = {f.id: frame(prompts, f) for f in framings}
    return sets, structured(prompts)[1]


def check_model(model: Any, framings: Sequence[Framing], sets: Mapping[str, Any], chat: bool | None) -> None:
    """Every framing's labels are single next tokens for this model, before any forward (FramingError)."""
    from .analyses.common import format_pairs

    check_labels(framings, model.tokenizer, lambda f: format_pairs(model.tokenizer, sets[f.id].pairs, chat))


def with_decisions(analyses: Sequence[str]) -> tuple[str, ...]:
    """The framings' summary reads each framing's decisions: they run whatever else is asked."""
    return tuple(dict.fromkeys(("decisions", *analyses)))


def summary(decisions: Mapping[str, xr.Dataset], cloze: xr.Dataset | None, attrs: Mapping[str, Any]) -> xr.Dataset:
    """framings.nc: :func:`nnethics.framings_verdict.summarize_framings` with the run's provenance attrs."""
    from .framings_verdict import summarize_framings
    from .store.variables import describe

    content = {k: v for k, v in decisions.items() if v.attrs.get("counterfactual_kind", "content") == "content"}
    ds = summarize_framings(content, cloze)
    ds.attrs = {**dict(attrs), **ds.attrs}
    return describe(ds)


def summary_attrs(model: Any, prompts: Any, framings: Sequence[Framing]) -> dict:
    from .store import provenance

    return provenance(SUMMARY, model, prompts, {"framings": [f.id for f in framings]})


def run_framings(model: Any, prompts: Any, framings: Sequence[Framing], store: str, analyses: Sequence[str],
                 chat: bool | None = None, batch_size: int = 8, progress: bool | None = None,
                 overwrite: bool = False, lock_timeout: float | None = None,
                 note: Callable[[str], None] | None = None,
                 overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, tuple[str, str]]:
    """Run ``analyses`` (decisions always among them) in every framing, the cloze readout on the structured pairs,
    and write framings.nc; ``{relative name: (path, summary line)}``, names as :func:`analyze_framings`' keys."""
    from .pipeline import make_context, run_all, run_one
    from .store import write_atomic

    sets, _ = prepare(prompts, framings)
    check_model(model, framings, sets, chat)
    out: dict[str, tuple[str, str]] = {}
    decisions = {}
    for f in framings:
        m = framed_model(model, f)
        done = run_all(m, sets[f.id], store, with_decisions(analyses), chat, batch_size, progress, overwrite,
                       lock_timeout, note, overrides)
        for name, got in done.items():
            out[f"{FOLDER}/{f.id}/{name}"] = got
        decisions[f.id] = xr.load_dataset(done["decisions"][0])
    source = dataclasses.replace(prompts, pairs=tuple(structured(prompts)[0]))
    ctx = make_context(model, source, chat)
    path, line = run_one(CLOZE, model, source, store, ctx, batch_size, progress, overwrite, lock_timeout)
    out[CLOZE] = (path, line)
    ds = summary(decisions, xr.load_dataset(path), summary_attrs(model, prompts, framings))
    target = Path(store) / model.slug / f"{SUMMARY}.nc"
    write_atomic(ds, target)
    out[SUMMARY] = (str(target), "")
    return out


def analyze_framings(model: Any, prompts: Any, framings: str | Sequence[Framing], analyses: Sequence[str], *,
                     chat: bool | None = None, batch_size: int = 8, note: Callable[[str], None] | None = None,
                     templates: Mapping[str, str] | None = None, **options: Any) -> dict[str, xr.Dataset]:
    """In memory, what :func:`run_framings` writes (``ne.analyze(..., framings=...)``): ``{"framings/<id>/<name>":
    Dataset, "cloze": ..., "framings": ...}``, the keys being the files' paths under the model folder without
    ``.nc``. ``framings``: ``"default"``, ``"all"``, ``"binding"``, ids with ``*`` (with ``templates``: extra ones by
    name), or a list of :class:`~nnethics.framings.Framing`."""
    from .framings import select
    from .pipeline import analyze

    framings = select(framings, templates) if isinstance(framings, str) else list(framings)

    sets, _ = prepare(prompts, framings)
    check_model(model, framings, sets, chat)
    out: dict[str, xr.Dataset] = {}
    for f in framings:
        got = analyze(model, sets[f.id], with_decisions(analyses), chat=chat, batch_size=batch_size, note=note,
                      **options)
        out.update({f"{FOLDER}/{f.id}/{name}": ds for name, ds in got.items()})
    source = dataclasses.replace(prompts, pairs=tuple(structured(prompts)[0]))
    out[CLOZE] = analyze(model, source, [CLOZE], chat=chat, batch_size=batch_size, note=note)[CLOZE]
    decisions = {f.id: out[f"{FOLDER}/{f.id}/decisions"] for f in framings}
    out[SUMMARY] = summary(decisions, out[CLOZE], summary_attrs(model, prompts, framings))
    return out

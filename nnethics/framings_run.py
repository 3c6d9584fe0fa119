"""Running analyses across framings: every selected framing of the structured pairs, the cloze readout, the summary.

Layout of a model folder after ``nnethics run --framings ...``::

    store/<model>/framings/<framing id>/<analysis>.nc   each framing's files (attrs and a ``framing`` coordinate)
    store/<model>/cloze.nc                                the cloze readout of the structured pairs (no framing)
    store/<model>/framings.nc                             the decision across framings and its verdict
    store/<model>/binding.nc (binding_grid.nc)           content swap vs label swap, where both ran with patching

The model folder's own ``decisions.nc`` etc. are the prompts' own text, as without ``--framings``: a framed run
never touches them. :func:`run_framings` (the CLI) and :func:`analyze_framings` (``ne.analyze(...,
framings=...)``) run the same plans and give the same Datasets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .analyses import BINDING_SOURCES, CLOZE, DECISIONS
from .framings import Framing, check_labels, frame, structured

SUMMARY = "framings"  # store/<model>/framings.nc
BINDING = "binding"  # store/<model>/binding.nc: content swap vs label swap (nnethics.binding)
FOLDER = "framings"  # store/<model>/framings/<id>/


def load_framings(model_dir: str | Path, name: str = DECISIONS, framings: Sequence[str] | None = None
                  ) -> xr.Dataset:
    """One analysis' files of every framing in a model folder (``store/<model>/framings/<id>/<name>.nc``), stacked
    along a ``framing`` dimension (coords ``framing_template``, ``framing_labels``, ``framing_order`` on it); the
    ``option`` coordinate becomes the positions ``a``/``b`` (the labels differ between label sets; which labels a
    framing used is ``framing_labels``). ``framings``: the ids to read (default: every folder holding the file)."""
    from .store import load

    root = Path(model_dir) / FOLDER
    ids = list(framings) if framings is not None else sorted(p.parent.name for p in root.glob(f"*/{name}.nc"))
    if not ids:
        raise FileNotFoundError(f"{root}: no framing folder holds {name}.nc; run `nnethics run --framings ...` first")
    parts = []
    for fid in ids:
        ds = load(root / fid / f"{name}.nc")
        if "option" in ds.dims:
            ds = ds.assign_coords(option=["a", "b"][: ds.sizes["option"]])
        extra = {k: ("framing", [str(ds.attrs.get(k, ""))]) for k in ("framing_template", "framing_labels",
                                                                      "framing_order")}
        parts.append(ds.expand_dims("framing").assign_coords(framing=[fid], **extra))
    return xr.concat(_same_widths(parts), dim="framing", coords="different", compat="equals",
                     combine_attrs="drop_conflicts", join="outer")


def _same_widths(parts: list[xr.Dataset]) -> list[xr.Dataset]:
    """Unindexed dims whose size differs between files (``token``: the framings' prompt lengths) padded to the
    widest, as the files pad them: −1 for ids and counts, "" for text, NaN for floats."""
    sizes: dict[str, int] = {}
    for ds in parts:
        for dim, n in ds.sizes.items():
            if dim not in ds.indexes:
                sizes[dim] = max(sizes.get(dim, 0), n)
    out = []
    for ds in parts:
        for dim, n in sizes.items():
            if dim in ds.dims and ds.sizes[dim] < n:
                fill = {v: -1 if ds[v].dtype.kind in "iu" else "" if ds[v].dtype.kind in "US" else
                        False if ds[v].dtype.kind == "b" else np.nan for v in ds.variables if dim in ds[v].dims}
                ds = ds.assign_coords({dim: np.arange(ds.sizes[dim])}).reindex({dim: np.arange(n)}, fill_value=fill)
                ds = ds.drop_vars(dim)
        out.append(ds)
    return out


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
    return tuple(dict.fromkeys((DECISIONS, *analyses)))


def summary(decisions: Mapping[str, xr.Dataset], cloze: xr.Dataset | None, attrs: Mapping[str, Any]) -> xr.Dataset:
    """framings.nc: :func:`nnethics.framings_verdict.summarize_framings` with the run's provenance attrs."""
    from .framings_verdict import summarize_framings
    from .store.variables import describe

    content = {k: v for k, v in decisions.items() if v.attrs.get("counterfactual_kind", "content") == "content"}
    ds = summarize_framings(content, cloze)
    ds.attrs = {**dict(attrs), **ds.attrs}
    return describe(ds)


def binding_couples(framings: Sequence[Framing]) -> list[tuple[Framing, Framing]]:
    """``(content framing, label swap)`` of each template and label set run both ways (``fwd`` with ``swap``)."""
    by = {f.id: f for f in framings}
    return [(by[f"{f.template}.{f.label_set}.fwd"], f) for f in framings
            if f.order == "swap" and f"{f.template}.{f.label_set}.fwd" in by]


def binding_results(framings: Sequence[Framing], get: Callable[[str, str], xr.Dataset | None]) -> dict[str, xr.Dataset]:
    """binding.nc (and binding_grid.nc) of the first content/label-swap couple whose patching (grid) files exist:
    ``{"binding": ds, "binding_grid": ds}``; ``get(framing id, analysis file name)`` reads a framing's file or
    gives None."""
    from .binding import binding_dataset
    from .store.variables import describe

    out: dict[str, xr.Dataset] = {}
    for content, label in binding_couples(framings):
        for name, target in zip(BINDING_SOURCES, (BINDING, f"{BINDING}_grid")):
            a, b = get(content.id, name), get(label.id, name)
            if target not in out and a is not None and b is not None:
                out[target] = describe(binding_dataset(a, b))
    return out


def summary_attrs(model: Any, prompts: Any, framings: Sequence[Framing]) -> dict:
    from .engine.plan import provenance_attrs

    return provenance_attrs(SUMMARY, model, prompts, {"framings": [f.id for f in framings]})


def run_framings(run: Any, prompts: Any, framings: Sequence[Framing], analyses: Sequence[str],
                 chat: bool | None = None, overrides: dict[str, dict[str, Any]] | None = None
                 ) -> dict[str, tuple[str, str]]:
    """In ``run`` (a :class:`nnethics.engine.Run`, which holds the model folder's lock), ``analyses`` (decisions
    always among them) in every framing, the cloze readout on the structured pairs, and framings.nc; ``{relative
    name: (path, summary line)}``, names as :func:`analyze_framings`' keys."""
    from .store import write_atomic

    model, store = run.model, run.store
    sets, _ = prepare(prompts, framings)
    check_model(model, framings, sets, chat)
    out: dict[str, tuple[str, str]] = {}
    decisions = {}
    for f in framings:
        done = run.analyses(sets[f.id], with_decisions(analyses), chat, overrides, model=framed_model(model, f))
        for name, got in done.items():
            out[f"{FOLDER}/{f.id}/{name}"] = got
        decisions[f.id] = xr.load_dataset(done[DECISIONS][0])
    source = dataclasses.replace(prompts, pairs=tuple(structured(prompts)[0]))
    path, line = run.one(CLOZE, source, chat=chat)
    out[CLOZE] = (path, line)
    ds = summary(decisions, xr.load_dataset(path), summary_attrs(model, prompts, framings))
    target = Path(store) / model.slug / f"{SUMMARY}.nc"
    write_atomic(ds, target)
    out[SUMMARY] = (str(target), "")

    def stored(fid: str, name: str) -> xr.Dataset | None:
        path = framing_folder(store, model, fid) / f"{name}.nc"
        return xr.load_dataset(path) if f"{FOLDER}/{fid}/{name}" in out and path.exists() else None

    for name, ds in binding_results(framings, stored).items():
        target = Path(store) / model.slug / f"{name}.nc"
        write_atomic(ds, target)
        out[name] = (str(target), str(ds.attrs.get("binding", "")))
    return out


def analyze_framings(model: Any, prompts: Any, framings: str | Sequence[Framing], analyses: Sequence[str], *,
                     analyze: Callable[..., dict[str, xr.Dataset]], chat: bool | None = None, batch_size: int = 8,
                     note: Callable[[str], None] | None = None, templates: Mapping[str, str] | None = None,
                     **options: Any) -> dict[str, xr.Dataset]:
    """In memory, what :func:`run_framings` writes (``ne.analyze(..., framings=...)``): ``{"framings/<id>/<name>":
    Dataset, "cloze": ..., "framings": ...}``, the keys being the files' paths under the model folder without
    ``.nc``. ``framings``: ``"default"``, ``"all"``, ``"binding"``, ids with ``*`` (with ``templates``: extra ones by
    name), or a list of :class:`~nnethics.framings.Framing`. ``analyze``: :func:`nnethics.engine.analyze`, which
    calls this with itself (so this module never imports the engine)."""
    from .framings import select

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
    out.update(binding_results(framings, lambda fid, name: out.get(f"{FOLDER}/{fid}/{name}")))
    return out

"""What ``nnethics run`` needs to know about an analysis."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import xarray as xr


@dataclass(frozen=True)
class RunContext:
    """Everything an analysis may need beyond (model, pairs): resolved once per run."""

    labels: tuple[str, ...]
    label_ids: tuple[int, ...]
    chat: bool | None = None
    extra: dict | None = None  # analysis-specific CLI options (e.g. patching's --components)


@dataclass(frozen=True)
class AnalysisSpec:
    """An analysis as ``nnethics run`` composes it.

    ``build(model, ctx) -> (fn, options)``: ``fn(model, pairs) -> xr.Dataset`` runs one chunk of
    pairs (dim ``prompt``); ``options`` is the dict recorded in provenance (and which decides whether
    parts of an interrupted run can be reused). ``summary(ds)`` is one line for the terminal;
    ``finalize(ds)`` may add cross-prompt variables after consolidation (e.g. confidence intervals).
    """

    name: str
    build: Callable[[Any, RunContext], tuple[Callable[[Any, Sequence], xr.Dataset], dict]]
    summary: Callable[[xr.Dataset], str]
    finalize: Callable[[xr.Dataset], xr.Dataset] | None = None
    default: bool = True

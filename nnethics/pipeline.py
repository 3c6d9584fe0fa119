"""The registry of analyses that ``nnethics run`` composes, and the loop that runs them."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

import xarray as xr

from .analyses.common import format_pairs
from .prompts import PromptSet, resolve_label_tokens
from .runner import run_analysis
from .store import result_path


@dataclass(frozen=True)
class AnalysisSpec:
    """How to run one analysis: ``build(model, prompts, label_ids, chat) -> fn(model, pairs) -> Dataset``,
    the options recorded in provenance, and a one-line summary of the result."""

    build: Callable[..., Callable]
    summary: Callable[[xr.Dataset], str]
    options: Callable[[PromptSet, Any], dict]


def _decisions_build(model, prompts, label_ids, chat):
    from .analyses.decisions import DecisionOptions, baseline_decisions

    opts = DecisionOptions(labels=prompts.labels, chat=chat)
    return partial(_call_decisions, opts=opts, label_ids=label_ids, fn=baseline_decisions)


def _call_decisions(model, pairs, *, opts, label_ids, fn):
    return fn(model, pairs, opts, label_ids=label_ids)


def _decisions_summary(ds: xr.Dataset) -> str:
    n = ds.sizes["prompt"]
    base = float(ds["chose_ethical"].sel(side="base").mean())
    cf = float(ds["chose_ethical"].sel(side="cf").mean())
    both = float(ds["chose_ethical"].all("side").mean())
    consistent = float(ds["consistent"].mean())
    top = float(ds["label_is_top"].mean())
    return (f"{n} pairs: ethical on base {base:.0%}, on counterfactual {cf:.0%}, on both {both:.0%}; "
            f"consistent {consistent:.0%}; a label is the top-1 token in {top:.0%} of prompts")


ANALYSES: dict[str, AnalysisSpec] = {
    "decisions": AnalysisSpec(
        build=_decisions_build,
        summary=_decisions_summary,
        options=lambda prompts, chat: {"labels": list(prompts.labels), "chat": chat},
    ),
}


def run_all(model: Any, prompts: PromptSet, store: str, analyses: Sequence[str] = ("decisions",), chat: bool | None = None,
            batch_size: int = 8, progress: bool | None = None) -> dict[str, tuple[str, str]]:
    """Run each named analysis over the prompt set; returns ``{name: (path, summary)}``."""
    texts = format_pairs(model.tokenizer, prompts.pairs, chat)
    label_ids = resolve_label_tokens(model.tokenizer, texts, prompts.labels)
    results = {}
    for name in analyses:
        spec = ANALYSES[name]
        fn = spec.build(model, prompts, label_ids, chat)
        ds = run_analysis(name, fn, model, prompts, store, spec.options(prompts, chat), batch_size=batch_size,
                          progress=progress, extra_attrs={"label_token_ids": list(label_ids)})
        results[name] = (str(result_path(store, model.slug, name)), spec.summary(ds))
    return results

"""The engine: the one owner of a run's life (see :mod:`.run`).

* :mod:`.plan`: what a run resolves before its first forward (the context, one :class:`Plan` per analysis,
  provenance);
* :mod:`.run`: :func:`execute`, the one driver (plans -> chunk loop -> one shared trace per chunk -> a sink ->
  finish), and :class:`Run`, which holds a model folder's lock for a whole run;
* :mod:`.sinks`: where chunks go, the store (resumable parts, one file each) or memory;
* :mod:`.trace`: the shared trace of a chunk and its extra rows, one session (one NDIF request);
* :mod:`.chunks`: the chunk loop (progress, out-of-memory halving, a failed remote chunk in one line);
* :mod:`.api`: :func:`analyze` and the per-technique functions, thin calls of the engine.

Analyses never import the engine: they declare what they do (:class:`nnethics.analyses.Analysis`), the engine runs
them.
"""

from .api import (
    activation_patching,
    analyze,
    baseline_decisions,
    causal_tracing,
    chunk,
    direct_logit_attribution,
    logit_lens,
)
from .plan import Plan, RunContext, make_context, pairs_as_set, plan, plans
from .run import Run, execute, run_all, run_function, run_one

__all__ = ["Plan", "Run", "RunContext", "activation_patching", "analyze", "baseline_decisions", "causal_tracing",
           "chunk", "direct_logit_attribution", "execute", "logit_lens", "make_context", "pairs_as_set", "plan",
           "plans", "run_all", "run_function", "run_one"]

"""The engine: the one owner of a run's life (see :mod:`.run`).

* :mod:`.plan`: what a run resolves before its first forward (the context, one :class:`Plan` per analysis,
  provenance);
* :mod:`.run`: :func:`execute`, the one driver (plans -> chunk loop -> one shared trace per chunk -> a sink ->
  finish), and :class:`Run`, which holds a model folder's lock for a whole run;
* :mod:`.sinks`: where chunks go, the store (resumable parts, one file each) or memory;
* :mod:`.trace`: the shared trace of a chunk and its extra rows, one session (one NDIF request);
* :mod:`.chunks`: the chunk loop (progress, out-of-memory halving, a failed remote chunk in one line);
* :mod:`.api`: :func:`analyze`, :func:`chunk`, and the functions the analyses declare (:func:`function`).

Analyses never import the engine: they declare what they do (:class:`nnethics.analyses.Analysis`), the engine runs
them.
"""

from typing import Any

from .api import analyze, chunk, function, function_names
from .plan import Plan, RunContext, make_context, pairs_as_set, plan, plans
from .run import Run, execute, run_all, run_function, run_one

__all__ = ["Plan", "Run", "RunContext", "analyze", "chunk", "execute", "function", "function_names", "make_context",
           "pairs_as_set", "plan", "plans", "run_all", "run_function", "run_one"]


def __getattr__(name: str) -> Any:
    """The functions the analyses declare (``nnethics.engine.activation_patching``): see :func:`function`."""
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        return function(name)
    except AttributeError:
        raise AttributeError(f"module 'nnethics.engine' has no attribute {name!r}") from None

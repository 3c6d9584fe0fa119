"""nnethics: where and how a language model decides an ethical dilemma.

The public functions, importable from here (loaded on first use, so ``import nnethics`` and the
render layer stay free of torch)::

    import nnethics as ne
    model = ne.load_model("smollm2-135m-instruct")          # or a hub id, a folder, remote=True
    pairs = ne.load_prompts("prompts").pairs
    ds = ne.activation_patching(model, pairs)               # xr.Dataset (prompt, layer, component)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "load_model": "nnethics.models",
    "wrap_model": "nnethics.models.loading",
    "analyze": "nnethics.engine",
    "load_prompts": "nnethics.prompts",
    "PromptPair": "nnethics.prompts",
    "baseline_decisions": "nnethics.engine",
    "finalize_decisions": "nnethics.verdict",
    "verdict": "nnethics.verdict",
    "activation_patching": "nnethics.engine",
    "causal_tracing": "nnethics.engine",
    "PatchingOptions": "nnethics.analyses.patching",
    "direct_logit_attribution": "nnethics.engine",
    "AttributionOptions": "nnethics.analyses.attribution",
    "logit_lens": "nnethics.engine",
    "LensOptions": "nnethics.analyses.lens",
    "evaluate_lenses": "nnethics.analyses.lens",
    "train_tuned_lens": "nnethics.analyses.lens.training",
    "TrainOptions": "nnethics.analyses.lens.training",
    "TunedLens": "nnethics.analyses.lens.lenses",
    "LogitLens": "nnethics.analyses.lens.lenses",
    "ClozeOptions": "nnethics.analyses.cloze",
    "load_framings": "nnethics.framings_run",
    "summarize_framings": "nnethics.framings_verdict",
    "load": "nnethics.store",
    "write_atomic": "nnethics.store",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'nnethics' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

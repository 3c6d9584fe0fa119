"""Causal tracing / activation patching of the decision, with attribution patching beside it.

For each prompt pair the base run receives states from a source run, one (layer, component,
positions) cell at a time, and the decision ``LD = logit(label 1) - logit(label 2)`` at the last
prompt token is measured:

* ``corruption="counterfactual"``: the source is the counterfactual prompt (options swapped);
* ``corruption="noise"`` (Meng et al. 2022): the receiver is the base with Gaussian noise added to
  the layer-0 input over a token span, the source is the clean base ("restoring" clean states);
  ``window`` restores a window of neighbouring layers around each layer (ROME's convention).

Components: ``resid`` (output of decoder layer i), ``attn`` / ``mlp`` (their contributions to the
residual stream, through the adapter). Positions (counted from the end, -1 = decision position):
``last`` (the decision position), ``all`` (every position at once) and ``grid`` (each position on
its own, dim ``position``); ``all``/``grid`` need base and counterfactual of equal token length,
and a pair that differs is skipped with the reason stored.

Every cell of a pair runs in a few batched forwards (see :mod:`.patching_engine`); patching only
the last position reuses the prefix's key/value cache, so each cell costs about one token's forward.
Attribution patching ``(cf - base) . dLD/dstate`` for every cell comes from one forward and one
backward and is stored beside the exact values (``atp_delta``, ``atp_effect``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import xarray as xr

from .. import export
from ..prompts import PromptPair
from . import patching_results as results
from .base import (
    Analysis,
    SharedReads,
    check_layers,
    register,
)
from .patching_options import CORRUPTIONS, POSITIONS, SPAN_HELP, PatchingOptions, parse_span
from .patching_results import COMPONENTS

__all__ = ["ANALYSIS", "COMPONENTS", "CORRUPTIONS", "POSITIONS", "SPAN_HELP", "VARIANTS", "PatchingOptions",
           "check_model", "own_forward", "parse_span", "shares"]


def own_forward(model: Any, pairs: Sequence[PromptPair], options: PatchingOptions, label_ids: Sequence[int] | None = None
                ) -> xr.Dataset:
    """Patch every (layer, component[, position]) cell of every pair and measure the decision, on forwards of its
    own (the modes that do not read the shared trace, :func:`shares`).

    Returns a Dataset with dims ``prompt``, ``layer``, ``component`` (and ``position`` in grid mode):
    ``base_logit_diff``, ``cf_logit_diff`` (noise: ``corrupted_logit_diff``) ``(prompt)``,
    ``patched_logit_diff``, ``effect``, ``flipped`` and (counterfactual, window 1) ``atp_delta``,
    ``atp_effect`` over the cells; ``effect_defined``, ``atp_correlation``, ``chose_ethical_base``,
    ``skipped``/``skip_reason``, token counts and, without positions, the per-prompt summary
    ``peak_layer``, ``num_choice_flips``, ``gini_coefficient``, ``top5_concentration``
    ``(prompt, component)``. ``forward_path`` says whether the KV-cache path ran.
    """
    from .patching_run import run_patching

    return run_patching(model, pairs, options, label_ids)


# ---------------------------------------------------------------------------------------------
# the Analysis: nnethics run / nnethics patch

def shares(model: Any, options: PatchingOptions, prepared: dict) -> SharedReads | None:
    """The last-position counterfactual path reads the shared trace (its prefix key/value cache) and runs its
    patched one-token rows after it; the other modes patch full forwards of their own."""
    if options.corruption != "counterfactual" or options.positions != "last":
        return None
    from . import patching_run as run

    return SharedReads(start=run.start, read=run.read, rows=run.rows, build=run.build)


def check_model(model: Any, options: PatchingOptions) -> None:
    check_layers("layers", options.layers, model.n_layers)


# stored file name -> the options that write it (store/<slug>/<name>.nc)
VARIANTS = {"patching_grid": {"corruption": "counterfactual", "positions": "grid"},
            "patching_all": {"corruption": "counterfactual", "positions": "all"},
            "patching_noise": {"corruption": "noise", "positions": "last"},
            "patching_noise_grid": {"corruption": "noise", "positions": "grid"},
            "patching_noise_all": {"corruption": "noise", "positions": "all"}}

ANALYSIS = register(Analysis(
    name="patching", options=PatchingOptions, compute=own_forward, summarize=results.summarize,
    finalize=results.finalize, check=check_model, variants=VARIANTS, command="patch",
    help="Activation patching / causal tracing of the decision; writes STORE/<model>/patching*.nc (the file name "
         "follows --corruption and --positions).",
    tables=export.patching_tables,
    render=("nnethics.render.patching",), shares=shares))

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

Every cell of a pair runs in a few batched forwards (see :mod:`.engine`); patching only
the last position reuses the prefix's key/value cache, so each cell costs about one token's forward.
Attribution patching ``(cf - base) . dLD/dstate`` for every cell comes from one forward and one
backward and is stored beside the exact values (``atp_delta``, ``atp_effect``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import xarray as xr

from ...prompts import PromptPair
from ...store.variables import LD, LOGIT, ONE
from ..base import Analysis, Function, SharedReads, check_layers, register
from . import results
from . import tables as export_tables
from .options import CORRUPTIONS, POSITIONS, SPAN_HELP, PatchingOptions, parse_span
from .results import COMPONENTS

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
    from .run import run_patching

    return run_patching(model, pairs, options, label_ids)


# ---------------------------------------------------------------------------------------------
# the Analysis: nnethics run / nnethics patch

def shares(model: Any, options: PatchingOptions, prepared: dict) -> SharedReads | None:
    """The last-position counterfactual path reads the shared trace (its prefix key/value cache) and runs its
    patched one-token rows after it; the other modes patch full forwards of their own."""
    if options.corruption != "counterfactual" or options.positions != "last":
        return None
    from . import run

    return SharedReads(start=run.start, read=run.read, rows=run.rows, build=run.build)


def check_model(model: Any, options: PatchingOptions) -> None:
    check_layers("layers", options.layers, model.n_layers)


# stored file name -> the options that write it (store/<slug>/<name>.nc)
VARIANTS = {"patching_grid": {"corruption": "counterfactual", "positions": "grid"},
            "patching_all": {"corruption": "counterfactual", "positions": "all"},
            "patching_noise": {"corruption": "noise", "positions": "last"},
            "patching_noise_grid": {"corruption": "noise", "positions": "grid"},
            "patching_noise_all": {"corruption": "noise", "positions": "all"}}

VARIABLES = {  # what each variable and coordinate it writes is (CF long_name, units): see store.variables
    "base_logit_diff": (f"{LD} of the base (receiver) run", LOGIT),
    "cf_logit_diff": (f"{LD} of the counterfactual (source) run", LOGIT),
    "corrupted_logit_diff": (f"{LD} of the base run with its noise span corrupted", LOGIT),
    "patched_logit_diff": (f"{LD} of the receiver run with one state patched in", LOGIT),
    "effect": ("patching effect", ONE),
    "effect_defined": ("the effect is defined (source and receiver differ by at least min_gap)", ONE),
    "mean_effect": ("mean patching effect over prompts where it is defined", ONE),
    "effect_ci_low": ("mean patching effect, 95% CI lower bound", ONE),
    "effect_ci_high": ("mean patching effect, 95% CI upper bound", ONE),
    "flipped": ("the patch flips the model's choice", ONE),
    "flip_rate": ("fraction of prompts whose choice the patch flips", ONE),
    "chose_ethical_base": ("the base run chooses the ethical option", ONE),
    "chose_ethical_cf": ("the counterfactual run chooses the ethical option", ONE),
    "atp_delta": ("attribution-patching estimate of patched − base logit difference", LOGIT),
    "atp_effect": ("attribution-patching estimate of the effect", ONE),
    "mean_atp_effect": ("mean attribution-patching effect over prompts", ONE),
    "atp_correlation": ("Pearson correlation of atp_delta and exact patching, per prompt", ONE),
    "atp_exact_correlation": ("Pearson correlation of atp_delta and exact patching, per component", ONE),
    "atp_exact_correlation_pooled": ("Pearson correlation of atp_delta and exact patching, pooled", ONE),
    "peak_layer": ("layer with the largest |patched − receiver logit difference| (−1: none)", ONE),
    "gini_coefficient": ("Gini coefficient of |patched − receiver logit difference| over layers", ONE),
    "top5_concentration": ("share of the total |patched − receiver logit difference| in the 5 largest layers", ONE),
    "num_choice_flips": ("number of layers whose patch flips the choice", ONE),
    "n_tokens_base": ("number of tokens of the base prompt", ONE),
    "n_tokens_cf": ("number of tokens of the counterfactual prompt", ONE),
    "skipped": ("the prompt pair was skipped", ONE),
    "skip_reason": ("why the prompt pair was skipped ('' if it was not)", ONE),
    "forward_path": ("how patched runs were computed (kv_cache or full)", ONE),
    "noise_start": ("first token position of the corrupted span", ONE),
    "noise_end": ("token position after the corrupted span", ONE),
    "noise_span_text": ("text of the corrupted span", ONE),
    "noise_std": ("standard deviation of the noise added to the span's embeddings (embedding units)", ONE),
}


ANALYSIS = register(Analysis(
    variables=VARIABLES, compare="nnethics.analyses.patching.figures", run_flags=("atp",),
    functions={
        "activation_patching": Function(
            "Patch every (layer, component[, position]) cell of every pair and measure the decision, as one chunk "
            "(see :mod:`nnethics.analyses.patching`; a variant's options write the same variables)."),
        "causal_tracing": Function(
            "Noise corruption and clean-state restoration (ROME): :func:`activation_patching` with "
            "``corruption=\"noise\"`` (over the given options, or the defaults).", fixed={"corruption": "noise"})},
    name="patching", options=PatchingOptions, compute=own_forward, summarize=results.summarize,
    finalize=results.finalize, check=check_model, variants=VARIANTS, command="patch",
    help="Activation patching / causal tracing of the decision; writes STORE/<model>/patching*.nc (the file name "
         "follows --corruption and --positions).",
    tables=export_tables.tables,
    render=("nnethics.analyses.patching.figures",), shares=shares))

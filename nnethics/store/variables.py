"""What every stored variable and coordinate is: ``long_name`` and ``units`` (CF conventions).

:data:`VARIABLES` declares, once for every file an analysis writes, ``name -> (long_name, units)``;
:func:`describe` sets them on a Dataset (``store.write_atomic`` calls it on every file it writes, parts
included, and ``store.load`` on every file it reads, so older files explain themselves too) and marks the
file ``Conventions = "CF-1.12"``. An existing ``description`` is kept beside ``long_name``.

The unit rule: every variable and coordinate has a ``units`` attr.

* ``logit``: logits, logit differences and their parts (direct contributions, raw patching effects);
* ``nats``: KL divergences and log-probabilities (cloze);
* ``1`` (UDUNITS' dimensionless) for everything else: probabilities, fractions, shares, ratios,
  correlations, normalised effects, p-values, booleans, counts, indices (layer, head, expert, token
  position, token id) and strings (text, labels, categories). CF would omit ``units`` on strings; we
  write ``1`` there as well so that "has ``units``" holds for every variable without exception.

Quantities whose unit depends on an option say so through :data:`~nnethics.store.schema.EFFECT_KIND`:
patching's effects are ``1`` when normalised and ``logit`` when raw.
"""

from __future__ import annotations

from collections.abc import Mapping

import xarray as xr

from .schema import EFFECT_KIND, RAW

CONVENTIONS = "CF-1.12"
LOGIT, NATS, ONE = "logit", "nats", "1"
LD = "logit(label 1) − logit(label 2)"

VARIABLES: dict[str, tuple[str, str]] = {  # what no one analysis owns; each analysis declares its own (declare)
    # coordinates
    "prompt": ("prompt pair id", ONE),
    "side": ("side of the pair: base prompt or counterfactual (options swapped)", ONE),
    "framing": ("framing the prompts were rendered in: <template>.<label set>.<order> (nnethics.framings)", ONE),
    "framing_template": ("framing's question template (ne.load_framings)", ONE),
    "framing_labels": ("framing's answer labels a,b (ne.load_framings)", ONE),
    "framing_order": ("framing's label order: fwd, rev or swap (ne.load_framings)", ONE),
    "option": ("answer label", ONE),
    "label_token": ("answer label's token", ONE),
    "label_token_id": ("answer label's token id", ONE),
    "layer": ("transformer layer index (0 = first)", ONE),
    "component": ("patched or attributed component (attn, mlp, resid)", ONE),
    "head": ("attention head index", ONE),
    "expert": ("MoE expert index", ONE),
    "position": ("token position patched, counted from the end of the prompt", ONE),
    "group": ("prompt group the statistics cover (all, or one category)", ONE),
    "n_model_layers": ("number of layers of the model", ONE),
    # framings (framings.nc: the verdict across framings, nnethics.framings_verdict)
    "template": ("framing's question template", ONE),
    "label_set": ("framing's answer-label set name", ONE),
    "labels": ("framing's answer labels a,b (logit_diff is logit(a) − logit(b))", ONE),
    "order": ("framing's label order: fwd (a beside the first option), rev (b beside it), swap", ONE),
    "counterfactual_kind": ("framing's counterfactual: content (options swapped) or label (labels swapped)", ONE),
    "label_prior": ("PriDe label prior log p(a)/p(b): mean logit_diff over pairs and both content orders", LOGIT),
    "debiased_chose_ethical": ("the ethical option wins once the label prior is removed", ONE),
    "n_choices": ("number of prompts (pair sides) with a choice", ONE),
    "share_ethical": ("fraction of prompts where the model chooses the ethical option", ONE),
    "share_ethical_ci_low": ("fraction choosing the ethical option, 95% CI lower bound", ONE),
    "share_ethical_ci_high": ("fraction choosing the ethical option, 95% CI upper bound", ONE),
    "share_ethical_debiased": ("fraction of prompts choosing the ethical option with the label prior removed", ONE),
    "share_ethical_debiased_ci_low": ("fraction ethical with the label prior removed, 95% CI lower bound", ONE),
    "share_ethical_debiased_ci_high": ("fraction ethical with the label prior removed, 95% CI upper bound", ONE),
    "slot_bias": ("preference for the first listed option's label: (position_bias fwd − rev) / 2", LOGIT),
    "token_prior": ("preference for label a whatever its slot: (position_bias fwd + rev) / 2", LOGIT),
    "n_slot_pairs": ("number of pairs both orders of the framing's couple have", ONE),
    "mean_slot_bias": ("mean slot bias over pairs", LOGIT),
    "slot_bias_ci_low": ("slot bias, 95% CI lower bound", LOGIT),
    "slot_bias_ci_high": ("slot bias, 95% CI upper bound", LOGIT),
    "mean_token_prior": ("mean label-token prior over pairs", LOGIT),
    "token_prior_ci_low": ("label-token prior, 95% CI lower bound", LOGIT),
    "token_prior_ci_high": ("label-token prior, 95% CI upper bound", LOGIT),
    "n_content_framings": ("number of framings whose counterfactual swaps the content", ONE),
    "n_couples": ("number of template and label set couples asked in both orders", ONE),
    "n_pooled": ("number of pairs present in every content framing", ONE),
    "pooled_ethical_preference": ("ethical preference averaged over the content framings", LOGIT),
    "mean_pooled_ethical_preference": ("mean pooled ethical preference over pairs", LOGIT),
    "pooled_ethical_preference_ci_low": ("pooled ethical preference, 95% CI lower bound", LOGIT),
    "pooled_ethical_preference_ci_high": ("pooled ethical preference, 95% CI upper bound", LOGIT),
    "n_pooled_slot": ("number of pairs present in both orders of every couple", ONE),
    "pooled_slot_bias": ("slot bias averaged over the couples", LOGIT),
    "mean_pooled_slot_bias": ("mean pooled slot bias over pairs", LOGIT),
    "pooled_slot_bias_ci_low": ("pooled slot bias, 95% CI lower bound", LOGIT),
    "pooled_slot_bias_ci_high": ("pooled slot bias, 95% CI upper bound", LOGIT),
    "pooled_token_prior": ("label-token prior averaged over the couples", LOGIT),
    "mean_pooled_token_prior": ("mean pooled label-token prior over pairs", LOGIT),
    "pooled_token_prior_ci_low": ("pooled label-token prior, 95% CI lower bound", LOGIT),
    "pooled_token_prior_ci_high": ("pooled label-token prior, 95% CI upper bound", LOGIT),
    "n_agreement": ("number of pairs the agreement across framings is computed on", ONE),
    "sign_agreement": ("fraction of pairs whose ethical preference has the same sign in every content framing", ONE),
    "sign_agreement_ci_low": ("fraction with the same sign in every framing, 95% CI lower bound", ONE),
    "sign_agreement_ci_high": ("fraction with the same sign in every framing, 95% CI upper bound", ONE),
    "krippendorff_alpha": ("Krippendorff's alpha (nominal) of the preference's sign across content framings", ONE),
    "framing_test_statistic": ("test statistic of 'the preference differs between content framings' (Friedman "
                               "chi-square; Wilcoxon W with 2 framings)", ONE),
    "framing_test_p": ("p-value of 'the preference differs between content framings' (attr test: which test)", ONE),
    "n_framing_test": ("number of pairs in every content framing, behind the framing test", ONE),
    "n_cloze_mc": ("number of pairs with both a cloze margin and a pooled ethical preference", ONE),
    "cloze_length_gap": ("tokens of the ethical option's text minus the other's, as scored by the cloze", ONE),
    "mean_cloze_length_gap": ("mean over the scored pairs of cloze_length_gap", ONE),
    "mean_cloze_mean_margin": ("mean over the scored pairs of the per-token cloze margin", NATS),
    "cloze_mean_margin_ci_low": ("mean per-token cloze margin, 95% CI lower bound", NATS),
    "cloze_mean_margin_ci_high": ("mean per-token cloze margin, 95% CI upper bound", NATS),
    "share_cloze_mean_ethical": ("fraction of scored pairs with a per-token cloze margin > 0", ONE),
    "cloze_mean_ethical_ci_low": ("fraction with a per-token cloze margin > 0, 95% CI lower bound", ONE),
    "cloze_mean_ethical_ci_high": ("fraction with a per-token cloze margin > 0, 95% CI upper bound", ONE),
    "cloze_mc_agreement": ("fraction of pairs where the cloze margin and the pooled preference have one sign", ONE),
    "cloze_mc_agreement_ci_low": ("fraction where cloze and multiple choice agree, 95% CI lower bound", ONE),
    "cloze_mc_agreement_ci_high": ("fraction where cloze and multiple choice agree, 95% CI upper bound", ONE),
    # binding (binding.nc: content versus binding, nnethics.binding)
    "kind": ("counterfactual kind: content (options exchange places) or label (labels exchange places)", ONE),
    "patch_crossing_layer": ("first layer whose mean patching effect reaches the threshold (−1: never)", ONE),
    "patch_crossing_ci_first": ("first layer whose mean effect's 95% CI upper bound reaches the threshold: the "
                                "earliest crossing the CI allows (−1: never)", ONE),
    "patch_crossing_ci_last": ("first layer whose mean effect's 95% CI lower bound reaches the threshold: the "
                               "latest crossing the CI allows (−1: never)", ONE),
    "n_defined": ("number of pairs whose patching effect is defined (and that were not skipped)", ONE),
    "n_skipped": ("number of pairs not patched (grid: base and counterfactual of different token lengths)", ONE),
    "n_consistent": ("number of pairs behind the means whose base and counterfactual choose the same option", ONE),
    "min_gap": ("smallest |counterfactual − base| logit difference for which the effect is defined", LOGIT),
    "early_effect": ("mean patching effect at the first stored layer, per position", ONE),
    "top_position": ("position (from the end) with the largest mean effect at the first stored layer", ONE),
}

# Patching quantities whose unit follows the file's effect_kind: 1 when normalised, logit when raw.
EFFECT_VARIABLES = ("effect", "mean_effect", "effect_ci_low", "effect_ci_high", "atp_effect", "mean_atp_effect")


def declare(variables: Mapping[str, tuple[str, str]], owner: str) -> None:
    """Add an analysis' ``name -> (long_name, units)`` to :data:`VARIABLES` (``register`` calls it: an analysis
    owns the variables it writes). A name declared again must mean the same, else ValueError names both."""
    for name, meaning in variables.items():
        if VARIABLES.get(name, meaning) != meaning:
            raise ValueError(f"{owner}: variable {name!r} is declared already as {VARIABLES[name]}, not {meaning}")
        if meaning[1] not in (LOGIT, NATS, ONE):
            raise ValueError(f"{owner}: variable {name!r} has units {meaning[1]!r}; the unit rule allows "
                             f"{LOGIT!r}, {NATS!r}, {ONE!r}")
    VARIABLES.update(variables)


def _units(ds: xr.Dataset, name: str, units: str) -> str:
    if name in EFFECT_VARIABLES and "effect" in ds.variables:
        kind = ds[name].attrs.get(EFFECT_KIND, ds["effect"].attrs.get(EFFECT_KIND))
        return LOGIT if kind == RAW else ONE
    return units


def undocumented(ds: xr.Dataset) -> list[str]:
    """The variables and coordinates of ``ds`` that :data:`VARIABLES` does not declare."""
    return sorted(str(n) for n in ds.variables if n not in VARIABLES)


def describe(ds: xr.Dataset) -> xr.Dataset:
    """A shallow copy of ``ds`` whose declared variables and coordinates carry ``long_name`` and ``units``
    (existing attrs, e.g. ``description``, kept; values never touched), with ``Conventions`` set."""
    ds = ds.copy(deep=False)
    if "framing" in ds.attrs and "framing" not in ds.variables:  # a framed run's file: select or concat by it
        ds = ds.assign_coords(framing=str(ds.attrs["framing"]))
    for name, var in ds.variables.items():
        if name in VARIABLES:
            long_name, units = VARIABLES[str(name)]
            var.attrs = {**var.attrs, "long_name": long_name, "units": _units(ds, str(name), units)}
    ds.attrs = {**ds.attrs, "Conventions": CONVENTIONS}
    return ds

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

import xarray as xr

from .schema import EFFECT_KIND, RAW

CONVENTIONS = "CF-1.12"
LOGIT, NATS, ONE = "logit", "nats", "1"
LD = "logit(label 1) − logit(label 2)"

VARIABLES: dict[str, tuple[str, str]] = {
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
    "lens": ("lens (logit: final norm + unembedding; tuned: trained per-layer translator)", ONE),
    "k": ("rank among the lens' top tokens (0 = top)", ONE),
    "group": ("prompt group the statistics cover (all, or one category)", ONE),
    "n_model_layers": ("number of layers of the model", ONE),
    # decisions
    "prompt_text": ("prompt text as given to the model", ONE),
    "category": ("prompt category", ONE),
    "input_ids": ("token ids of the prompt (−1: padding)", ONE),
    "token_text": ("decoded text of each prompt token (tokenizer.decode([id]); '' for padding)", ONE),
    "n_tokens": ("number of prompt tokens", ONE),
    "logit_diff": (f"logit difference {LD} at the last prompt token", LOGIT),
    "label_logit": ("logit of each answer label", LOGIT),
    "label_prob": ("probability of each answer label", ONE),
    "label_is_top": ("an answer label is the model's top token", ONE),
    "top_token_id": ("token id of the model's (or lens') top token", ONE),
    "chosen": ("answer label the model chooses", ONE),
    "chose_ethical": ("the model chooses the ethical option", ONE),
    "ethical_option": ("answer label of the ethical option", ONE),
    "ethical_margin": ("logit of the ethical label minus the other", LOGIT),
    "ethical_preference": ("ethical margin averaged over the two sides (position-debiased)", LOGIT),
    "position_bias": (f"{LD} averaged over the two sides (> 0 favours label 1)", LOGIT),
    "p_ethical": ("two-label probability of the ethical option, averaged over sides", ONE),
    "consistent": ("the model chooses the same option on both sides", ONE),
    "swaps_ethical_label": ("the ethical option is a different label on the two sides", ONE),
    "content_gap": ("logit_diff(counterfactual) − logit_diff(base)", LOGIT),
    "content_sensitive": ("|content_gap| ≥ min_gap", ONE),
    "n_pairs": ("number of prompt pairs", ONE),
    "n_debiased": ("number of pairs whose counterfactual swaps the ethical label", ONE),
    "mean_ethical_preference": ("mean ethical preference over pairs", LOGIT),
    "ethical_preference_ci_low": ("ethical preference, 95% CI lower bound", LOGIT),
    "ethical_preference_ci_high": ("ethical preference, 95% CI upper bound", LOGIT),
    "mean_position_bias": ("mean position bias over pairs", LOGIT),
    "position_bias_ci_low": ("position bias, 95% CI lower bound", LOGIT),
    "position_bias_ci_high": ("position bias, 95% CI upper bound", LOGIT),
    "mean_p_ethical": ("mean p_ethical over pairs", ONE),
    "p_ethical_ci_low": ("p_ethical, 95% CI lower bound", ONE),
    "p_ethical_ci_high": ("p_ethical, 95% CI upper bound", ONE),
    "share_leaning_ethical": ("fraction of pairs with ethical preference > 0", ONE),
    "leaning_ethical_ci_low": ("fraction leaning ethical, 95% CI lower bound", ONE),
    "leaning_ethical_ci_high": ("fraction leaning ethical, 95% CI upper bound", ONE),
    "share_content_sensitive": ("fraction of content-sensitive pairs", ONE),
    "content_sensitive_ci_low": ("fraction content-sensitive, 95% CI lower bound", ONE),
    "content_sensitive_ci_high": ("fraction content-sensitive, 95% CI upper bound", ONE),
    "sign_test_k": ("number of pairs with ethical preference > 0", ONE),
    "sign_test_n": ("number of pairs with a nonzero ethical preference", ONE),
    "sign_test_p": ("one-sided binomial sign-test p-value", ONE),
    # patching (and its grid / noise variants)
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
    # attribution
    "diff_contribution": (f"direct contribution to {LD}", LOGIT),
    "logit_contribution": ("direct contribution to each answer label's logit", LOGIT),
    "head_contribution": (f"attention head's direct contribution to {LD}", LOGIT),
    "head_logit_contribution": ("attention head's direct contribution to each label's logit", LOGIT),
    "expert_contribution": (f"MoE expert's direct contribution to {LD}", LOGIT),
    "expert_logit_contribution": ("MoE expert's direct contribution to each label's logit", LOGIT),
    "embed_contribution": (f"embeddings' direct contribution to {LD}", LOGIT),
    "embed_logit_contribution": ("embeddings' direct contribution to each label's logit", LOGIT),
    "bias_contribution": (f"final-norm and lm_head biases' contribution to {LD}", LOGIT),
    "bias_logit_contribution": ("final-norm and lm_head biases' contribution to each label's logit", LOGIT),
    "attn_bias_contribution": (f"attention output bias' contribution to {LD}", LOGIT),
    "attn_bias_logit_contribution": ("attention output bias' contribution to each label's logit", LOGIT),
    "softcap_contribution": ("true minus pre-soft-cap logit difference", LOGIT),
    "softcap_logit_contribution": ("true minus pre-soft-cap logit of each label", LOGIT),
    "other_layers_contribution": (f"summed direct contribution of the layers not stored to {LD}", LOGIT),
    "other_layers_logit_contribution": ("summed direct contribution of the layers not stored to each label's logit",
                                        LOGIT),
    "attn_mlp_ratio": ("|attention| / (|attention| + |MLP|) direct contribution", ONE),
    "final_norm_scale": ("scale the final norm applies to the last residual state", ONE),
    "ethical_sign": ("+1 where the ethical option is label 1, else −1", ONE),
    "ethical_contribution": ("direct contribution toward the ethical option, averaged over sides", LOGIT),
    "ethical_head_contribution": ("attention head's direct contribution toward the ethical option", LOGIT),
    "ethical_other_contribution": ("ethical part of embeddings + biases + soft-cap + other layers", LOGIT),
    "position_contribution": ("direct contribution toward label 1, averaged over sides", LOGIT),
    "position_head_contribution": ("attention head's direct contribution toward label 1", LOGIT),
    "position_other_contribution": ("position part of embeddings + biases + soft-cap + other layers", LOGIT),
    # heads
    "head_dla": (f"attention head's direct contribution to {LD} (as head_contribution)", LOGIT),
    "mean_head_dla": (f"mean over prompts and sides of the head's direct contribution to {LD}", LOGIT),
    "attention": ("attention weight of a top head from the decision position to each prompt token", ONE),
    "rank": ("rank of a head by mean |patching effect| (0 = largest)", ONE),
    "top_layer": ("layer of the head at this rank", ONE),
    "top_head": ("head index (query head) of the head at this rank", ONE),
    "candidate_attention": ("attention weight of a chunk's candidate head from the decision position to each "
                            "prompt token (chunk parts only)", ONE),
    "candidate_layer": ("layer of a chunk's candidate head (chunk parts only)", ONE),
    "candidate_head": ("head index (query head) of a chunk's candidate head (chunk parts only)", ONE),
    # lens, lens_eval
    "kl_to_final": ("KL(final ‖ lens) of the next-token distributions", NATS),
    "top_logit": ("lens logit of its top tokens", LOGIT),
    "top_prob": ("lens probability of its top tokens", ONE),
    "top_token": ("lens' top token (raw tokenizer string, e.g. BPE 'Ġ' for a space)", ONE),
    "top_token_text": ("lens' top token decoded as text", ONE),
    "crossing_layer": ("first layer from which the finally chosen label stays ahead (−1: none)", ONE),
    "final_choice": ("answer label with the highest logit at the last layer", ONE),
    "kl": ("held-out mean KL(final ‖ lens)", NATS),
    "top1_agreement": ("fraction of held-out positions where the lens' top token is the model's", ONE),
    # cloze
    "choice": ("which option of the dilemma: the ethical one or the other", ONE),
    "cloze_logprob": ("log-probability of the option's text after the cloze stem (summed over its tokens)", NATS),
    "cloze_mean_logprob": ("log-probability of the option's text after the cloze stem, per token", NATS),
    "cloze_n_tokens": ("number of tokens of the option's text as scored", ONE),
    "cloze_token_ids": ("token ids of the option's text as scored (−1: padding)", ONE),
    "cloze_token_logprob": ("log-probability of each token of the option's text (NaN: padding)", NATS),
    "cloze_option_text": ("continuation text scored (the option's text; ' ' + it without chat)", ONE),
    "cloze_stem_text": ("cloze stem as given to the model (scenario + stem, chat-formatted where chat applies)", ONE),
    "cloze_stem_n_tokens": ("number of tokens of the cloze stem", ONE),
    "cloze_margin": ("cloze log-probability of the ethical option minus the other's", NATS),
    "cloze_mean_margin": ("per-token cloze log-probability of the ethical option minus the other's", NATS),
    "n_cloze": ("number of pairs scored by the cloze readout (with a dilemma)", ONE),
    "n_cloze_ethical": ("number of scored pairs with cloze_margin > 0", ONE),
    "mean_cloze_margin": ("mean cloze margin over the scored pairs", NATS),
    "cloze_margin_ci_low": ("mean cloze margin, 95% CI lower bound", NATS),
    "cloze_margin_ci_high": ("mean cloze margin, 95% CI upper bound", NATS),
    "share_cloze_ethical": ("fraction of scored pairs with cloze_margin > 0", ONE),
    "cloze_ethical_ci_low": ("fraction with cloze_margin > 0, 95% CI lower bound", ONE),
    "cloze_ethical_ci_high": ("fraction with cloze_margin > 0, 95% CI upper bound", ONE),
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

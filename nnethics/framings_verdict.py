"""The verdict across framings: one dilemma set asked in several framings, summarised in one Dataset and one paragraph.

Torch-free (NumPy, SciPy, xarray and the ``krippendorff`` package), so the report, ``compare`` and the tests use it
on stored files. :func:`summarize_framings` takes every framing's decisions Dataset (the schema of
``decisions.nc``; a framing is ``template × label set × order``, see :mod:`nnethics.framings`) and, optionally, the
cloze scores, and returns the Dataset stored as ``store/<model>/framings.nc`` (dims ``framing``, ``prompt``,
``side``), whose ``framings_verdict`` attr is the paragraph (:func:`framings_verdict`, worded by the fixed rules of
:class:`FramingRules`). :func:`summary_lines` gives the terminal lines.

In every framing the labels are ``(a, b)`` and ``LD = logit(a) − logit(b)``; ``e_s = +1`` when the ethical option
is label ``a`` on side ``s`` (base, cf), else −1. Framings may cover different prompts: everything is aligned on the
union of the prompts (NaN where a framing lacks one), and every mean and share says over how many pairs it is.

Per framing (the per-pair quantities recomputed from ``logit_diff`` and ``ethical_option`` in float64, as
:func:`nnethics.verdict.pair_quantities` does):

* ``ethical_preference = mean_s e_s LD_s`` and ``position_bias = mean_s LD_s`` (the preference for token ``a``
  whatever the content; NaN where the counterfactual does not swap the ethical label). Their means over the pairs
  that swap the ethical label (``n_debiased``) carry BCa bootstrap 95% CIs (:func:`metrics.mean_ci`).
* ``label_prior``: the PriDe prior (Zheng et al., "Large Language Models Are Not Robust Multiple Choice
  Selectors", ICLR 2024) in logits, ``log p(a)/p(b)``, estimated as the mean over pairs and both content orders of
  ``LD`` (= the mean ``position_bias``). Derivation: PriDe writes the observed probability of the option id ``d``
  under a permutation ``I`` of the option contents as ``P_obs(d | x^I) = P_prior(d | x) P_deb(o_I(d) | x) / Z``.
  With two ids the log ratio is ``LD_I = log P_obs(a)/P_obs(b) = log P_prior(a)/P_prior(b) + log
  P_deb(o_I(a))/P_deb(o_I(b))`` (the softmax normaliser cancels, so this is the logit difference). The two cyclic
  permutations of two options are the pair's two content orders (base and cf), and the content term changes sign
  between them, so ``mean_s LD_s = log P_prior(a | x)/P_prior(b | x)``: PriDe's per-sample prior
  ``softmax_d(mean_I log P_obs(d | x^I))`` is exactly ``sigmoid(position_bias)`` of the pair. Across pairs this
  module averages the log-odds (the normalised geometric mean of the per-pair priors); PriDe averages the per-pair
  priors in probability, which differs by Jensen's gap when the per-pair biases vary. PriDe also estimates the
  prior on a fraction of the samples and debiases the rest; here it is estimated on all pairs of the framing.
  Removing it (``P_deb ∝ P_obs / P_prior``) gives ``LD − label_prior``, so
  ``debiased_chose_ethical (prompt, side) = e_s (LD_s − label_prior) > 0``.
* ``share_ethical`` (``chose_ethical`` over prompts × sides, ``n_choices``) and ``share_ethical_debiased`` (the
  same with the prior removed), with Wilson score 95% intervals (:func:`metrics.proportion_ci`).
* Where the same template and label set is asked in both orders (a *couple* ``fwd``/``rev``): in ``fwd`` label
  ``a`` stands beside the first listed option, in ``rev`` label ``b`` does, so per pair ``position_bias_fwd =
  token + slot`` and ``position_bias_rev = token − slot``, where ``slot`` is the preference for the first listed
  option's label and ``token`` the preference for token ``a`` whatever its slot. Hence per pair ``slot_bias =
  (position_bias_fwd − position_bias_rev) / 2`` and ``token_prior = (position_bias_fwd + position_bias_rev) / 2``,
  stored on both framings of the couple (NaN where the other order is missing), with means over the pairs the
  couple shares and BCa CIs.

Pooled over the content framings (``counterfactual_kind = content``; a label-swap framing's preference includes
the slot preference, so it is summarised per framing only), on the pairs present in every one of them
(``n_pooled``): ``pooled_ethical_preference (prompt)`` = the mean over the framings of ``ethical_preference``,
its mean and BCa CI; ``pooled_slot_bias``/``pooled_token_prior (prompt)`` = the mean over the couples, on the pairs
present in every couple (``n_pooled_slot``), their means and BCa CIs. Agreement, on the same ``n_pooled`` pairs:
``sign_agreement`` = the share of pairs whose preference has the same sign (−, 0, +) in every content framing
(Wilson), and ``krippendorff_alpha`` = Krippendorff's alpha (nominal; the sign as category, framings as coders,
pairs as units; NaN with fewer than 2 framings, or when every value is the same sign: 0/0).

Cloze (optional; dims ``prompt``, ``choice``; ``cloze_margin (prompt)`` = log p(ethical option's text) − log
p(the other's) in nats, ``skipped (prompt)``): ``cloze_margin`` on the union of prompts (NaN where skipped or
absent), ``mean_cloze_margin`` with a BCa CI (``n_cloze``), ``share_cloze_ethical`` (margin > 0, Wilson) and
``cloze_mc_agreement`` = the share of pairs where ``sign(cloze_margin) == sign(pooled_ethical_preference)``
(Wilson, ``n_cloze_mc``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import xarray as xr

from .framings_cloze import cloze_summary as _cloze
from .framings_cloze import mean_ci_finite as _mean_ci
from .framings_cloze import share_ci as _share
from .framings_verdict_text import MEAN_CI, SHARE_CI, FramingRules, describe, framings_verdict, summary_lines

SIDES = ("base", "cf")


# --------------------------------------------------------------------------------------------- numbers


def _meta(fid: str, ds: xr.Dataset) -> dict[str, str]:
    """template, label_set, labels ("a,b"), order and counterfactual_kind of one framing (attrs first, then the id)."""
    parts = str(fid).split(".")
    labels = [str(o) for o in ds["option"].values]
    order = str(ds.attrs.get("framing_order", parts[2] if len(parts) == 3 else "fwd"))
    return {
        "template": str(ds.attrs.get("framing_template", parts[0] if len(parts) == 3 else fid)),
        "label_set": parts[1] if len(parts) == 3 else "".join(labels),
        "labels": str(ds.attrs.get("framing_labels", ",".join(labels))),
        "order": order,
        "counterfactual_kind": str(ds.attrs.get("counterfactual_kind", "label" if order == "swap" else "content")),
    }


def _union(decisions: Mapping[str, xr.Dataset], cloze: xr.Dataset | None) -> list[str]:
    seen: dict[str, None] = {}
    for ds in decisions.values():
        seen.update(dict.fromkeys(str(p) for p in ds["prompt"].values))
    if cloze is not None:
        seen.update(dict.fromkeys(str(p) for p in cloze["prompt"].values))
    return list(seen)


def _per_side(ds: xr.Dataset, name: str, prompts: list[str], fill) -> np.ndarray:
    """``ds[name] (prompt, side)`` on ``prompts`` x (base, cf), ``fill`` where the framing lacks a prompt."""
    v = ds[name].transpose("prompt", "side").sel(side=list(SIDES))
    v = v.assign_coords(prompt=[str(p) for p in v["prompt"].values]).reset_coords(drop=True)
    return v.reindex(prompt=prompts, fill_value=fill).values


def framing_arrays(ds: xr.Dataset, prompts: list[str]) -> dict[str, np.ndarray]:
    """One framing's per-pair numbers on ``prompts``: ``ld``, ``e`` (+1/−1, NaN where absent), ``margin``,
    ``preference``, ``bias`` (NaN where the ethical label is not swapped), ``swapped``, ``chose`` (1/0/NaN)."""
    labels = [str(o) for o in ds["option"].values]
    ld = _per_side(ds, "logit_diff", prompts, np.nan).astype(np.float64)
    eth = _per_side(ds, "ethical_option", prompts, "").astype(str)
    e = np.where(eth == labels[0], 1.0, np.where(eth == labels[1], -1.0, np.nan))
    e = np.where(np.isfinite(ld), e, np.nan)
    margin = e * ld
    swapped = np.isfinite(e).all(1) & (e[:, 0] != e[:, 1])
    if "chose_ethical" in ds:
        chose = _per_side(ds, "chose_ethical", prompts, np.nan).astype(np.float64)
    else:  # decisions' chosen is the argmax of the two label logits: label a on a tie
        chose = np.where(ld >= 0, 1.0, -1.0) == e
        chose = chose.astype(np.float64)
    chose = np.where(np.isfinite(ld), chose, np.nan)
    return {"ld": ld, "e": e, "margin": margin, "preference": margin.mean(1),
            "bias": np.where(swapped, ld.mean(1), np.nan), "swapped": swapped, "chose": chose}


def label_prior(ld: np.ndarray, swapped: np.ndarray) -> float:
    """The PriDe prior ``log p(a)/p(b)`` in logits: the mean of ``LD`` over the pairs that swap the ethical label
    and both content orders (see the module docstring for the derivation); NaN with no such pair."""
    v = np.asarray(ld, dtype=np.float64)[np.asarray(swapped, dtype=bool)]
    v = v[np.isfinite(v).all(1)] if v.size else v
    return float(v.mean()) if v.size else np.nan


def debiased_choice(ld: np.ndarray, e: np.ndarray, prior: float) -> np.ndarray:
    """``e_s (LD_s − prior) > 0`` as 1/0, NaN where ``LD``, ``e`` or the prior is missing."""
    m = np.asarray(e, dtype=np.float64) * (np.asarray(ld, dtype=np.float64) - prior)
    return np.where(np.isfinite(m), (m > 0).astype(np.float64), np.nan)


def slot_token(bias_fwd: np.ndarray, bias_rev: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pair ``(slot_bias, token_prior) = ((fwd − rev) / 2, (fwd + rev) / 2)`` from the position biases of the two
    orders: in ``fwd`` label a is beside the first listed option, in ``rev`` label b is."""
    f = np.asarray(bias_fwd, dtype=np.float64)
    r = np.asarray(bias_rev, dtype=np.float64)
    return (f - r) / 2, (f + r) / 2


def sign_agreement(pref: np.ndarray) -> tuple[int, int]:
    """``pref (framings, pairs)`` -> ``(k, n)``: of the ``n`` pairs finite in every framing, ``k`` have the same
    sign (−, 0, +) in all of them."""
    p = np.asarray(pref, dtype=np.float64)
    ok = np.isfinite(p).all(0)
    s = np.sign(p[:, ok])
    return int((s == s[:1]).all(0).sum()), int(ok.sum())


def krippendorff_alpha(pref: np.ndarray) -> float:
    """Krippendorff's alpha, nominal, of the sign of ``pref (framings, pairs)``: framings as coders, pairs as units,
    over the pairs finite in every framing. NaN with fewer than 2 framings, and with a single sign throughout (no
    variation: alpha is 0/0), no pair included."""
    import krippendorff

    p = np.asarray(pref, dtype=np.float64)
    p = p[:, np.isfinite(p).all(0)] if p.ndim == 2 else p
    if p.ndim != 2 or p.shape[0] < 2:
        return np.nan
    s = np.sign(p)
    if np.unique(s).size < 2:
        return np.nan
    return float(krippendorff.alpha(reliability_data=s, level_of_measurement="nominal"))


def framing_test(pref: np.ndarray) -> tuple[float, float, int, str]:
    """Does the preference differ between framings? ``pref (framings, pairs)`` -> ``(statistic, p, n pairs,
    method)`` over the pairs finite in every framing: Friedman's test (pairs as blocks, framings as treatments; ranks
    within each pair, so a pair's own level cancels) with 3 or more framings, Wilcoxon's signed-rank test with 2; NaN
    with fewer than 2 framings or pairs, or no variation. One test over all framings, not one CI per framing: with 24
    framings about 1.2 of 24 per-framing 95% CIs exclude 0 by chance alone."""
    from scipy import stats

    p = np.asarray(pref, dtype=np.float64)
    p = p[:, np.all(np.isfinite(p), axis=0)] if p.ndim == 2 else p
    k, n = (p.shape if p.ndim == 2 else (0, 0))
    if k < 2 or n < 2 or np.ptp(p) == 0:
        return np.nan, np.nan, int(n), ""
    if k == 2:
        if np.all(p[0] == p[1]):
            return np.nan, np.nan, int(n), ""
        res = stats.wilcoxon(p[0], p[1])
        return float(res.statistic), float(res.pvalue), int(n), "Wilcoxon signed-rank"
    res = stats.friedmanchisquare(*p)
    return float(res.statistic), float(res.pvalue), int(n), "Friedman"


def _all_finite_mean(x: np.ndarray) -> np.ndarray:
    """Mean over axis 0 where every entry is finite, else NaN (``x (k, pairs)``; NaN for k = 0)."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape[0] == 0:
        return np.full(x.shape[1], np.nan)
    ok = np.isfinite(x).all(0)
    return np.where(ok, np.where(ok, x, 0.0).mean(0), np.nan)


# --------------------------------------------------------------------------------------------- the Dataset


def summarize_framings(decisions: Mapping[str, xr.Dataset], cloze: xr.Dataset | None = None, *, seed: int = 0,
                       rules: FramingRules = FramingRules()) -> xr.Dataset:
    """The cross-framing summary (``framings.nc``): dims ``framing``, ``prompt``, ``side``; see the module docstring.

    ``decisions``: framing id -> that framing's decisions Dataset; ``cloze``: the cloze scores or None. The
    ``framings_verdict`` attr is :func:`framings_verdict` of the result (worded by ``rules``).
    """
    if not decisions:
        raise ValueError("summarize_framings: no framing given; pass framing id -> decisions Dataset")
    fids = [str(f) for f in decisions]
    prompts = _union(decisions, cloze)
    meta = {f: _meta(f, decisions[f]) for f in fids}
    arrays = {f: framing_arrays(decisions[f], prompts) for f in fids}
    stack = {k: np.stack([arrays[f][k] for f in fids]) for k in ("ld", "e", "margin", "chose", "preference", "bias",
                                                                  "swapped")}
    # the preference the means use: pairs that swap the ethical label
    stack["used"] = np.where(stack["swapped"], stack["preference"], np.nan)
    fd, fpd, fpsd = ("framing",), ("framing", "prompt"), ("framing", "prompt", "side")
    per, debiased = _per_framing(stack, seed)
    couples, slot, token = _couples(fids, meta, stack["bias"])
    per.update(_couple_means(slot, token, seed))
    data = {name: (fd, np.asarray(v, dtype=np.int32 if name.startswith("n_") else np.float64))
            for name, v in per.items()}
    data.update(
        logit_diff=(fpsd, stack["ld"]), ethical_margin=(fpsd, stack["margin"]), chose_ethical=(fpsd, stack["chose"]),
        debiased_chose_ethical=(fpsd, debiased), ethical_preference=(fpd, stack["preference"]),
        position_bias=(fpd, stack["bias"]), slot_bias=(fpd, slot), token_prior=(fpd, token),
    )
    content = [i for i, f in enumerate(fids) if meta[f]["counterfactual_kind"] == "content"]
    pooled, scalars = _pooled(stack["used"][content], [(slot[i], token[i]) for i, _ in couples], seed, data)
    scalars.update(_agreement(stack["used"][content]))
    if cloze is not None:
        scalars.update(_cloze(cloze, prompts, pooled, seed, data))
    method = scalars.pop("_framing_test_method")
    for name, v in scalars.items():
        data[name] = ((), np.asarray(v, dtype=np.int32 if name.startswith("n_") else np.float64))
    coords = {"framing": fids, "prompt": prompts, "side": list(SIDES)}
    for key in ("template", "label_set", "labels", "order", "counterfactual_kind"):
        coords[key] = ("framing", [meta[f][key] for f in fids])
    ds = xr.Dataset(data, coords=coords)
    describe(ds, seed)
    first = decisions[fids[0]].attrs
    if first.get("model_id") or first.get("model"):
        ds.attrs["model_id"] = str(first.get("model_id") or first.get("model"))
    ds.attrs["ci_methods"] = f"means: {MEAN_CI}; shares: {SHARE_CI}"
    ds["framing_test_p"].attrs["test"] = method or "none (fewer than 2 framings or pairs, or no variation)"
    ds.attrs["framings_verdict"] = framings_verdict(ds, rules)
    return ds


def _per_framing(stack: dict[str, np.ndarray], seed: int) -> tuple[dict[str, list], np.ndarray]:
    """Per framing: counts, mean preference and position bias with BCa CIs, the label prior, the raw and debiased
    shares of ethical choices with Wilson intervals; and ``debiased_chose_ethical (framing, prompt, side)``."""
    ld, used, bias, chose = stack["ld"], stack["used"], stack["bias"], stack["chose"]
    per: dict[str, list] = {}

    def put(name: str, value) -> None:
        per.setdefault(name, []).append(value)

    debiased = np.full(ld.shape, np.nan)
    for i in range(ld.shape[0]):
        put("n_pairs", int(np.isfinite(ld[i]).all(1).sum()))
        put("n_debiased", int(np.isfinite(used[i]).sum()))
        for stem, x in (("ethical_preference", used[i]), ("position_bias", bias[i])):
            mean, lo, hi, _ = _mean_ci(x, seed)
            put(f"mean_{stem}", mean)
            put(f"{stem}_ci_low", lo)
            put(f"{stem}_ci_high", hi)
        prior = label_prior(ld[i], stack["swapped"][i])
        put("label_prior", prior)
        debiased[i] = debiased_choice(ld[i], stack["e"][i], prior)
        put("n_choices", int(np.isfinite(chose[i]).sum()))
        for stem, x in (("share_ethical", chose[i]), ("share_ethical_debiased", debiased[i])):
            share, lo, hi = _share(int((x[np.isfinite(x)] > 0).sum()), int(np.isfinite(x).sum()))
            put(stem, share)
            put(f"{stem}_ci_low", lo)
            put(f"{stem}_ci_high", hi)
    return per, debiased


def _couples(fids: list[str], meta: dict[str, dict[str, str]], bias: np.ndarray
             ) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray]:
    """The (fwd, rev) index couples of the content framings with the same template and label set, and per
    ``(framing, prompt)`` the couple's slot bias and token prior (NaN outside a couple)."""
    slot, token = np.full(bias.shape, np.nan), np.full(bias.shape, np.nan)
    index = {(meta[f]["template"], meta[f]["label_set"], meta[f]["order"]): i for i, f in enumerate(fids)
             if meta[f]["counterfactual_kind"] == "content"}
    couples = []
    for (t, ls, order), i in index.items():
        j = index.get((t, ls, "rev"))
        if order == "fwd" and j is not None:
            s, k = slot_token(bias[i], bias[j])
            slot[i] = slot[j] = s
            token[i] = token[j] = k
            couples.append((i, j))
    return couples, slot, token


def _couple_means(slot: np.ndarray, token: np.ndarray, seed: int) -> dict[str, list]:
    per: dict[str, list] = {}
    for i in range(slot.shape[0]):
        for stem, x in (("slot_bias", slot[i]), ("token_prior", token[i])):
            mean, lo, hi, _ = _mean_ci(x, seed)
            for name, v in ((f"mean_{stem}", mean), (f"{stem}_ci_low", lo), (f"{stem}_ci_high", hi)):
                per.setdefault(name, []).append(v)
        per.setdefault("n_slot_pairs", []).append(int(np.isfinite(slot[i]).sum()))
    return per


def _pooled(used: np.ndarray, couples: list[tuple[np.ndarray, np.ndarray]], seed: int, data: dict
            ) -> tuple[np.ndarray, dict]:
    """Pooled preference over the content framings (``used (framings, prompts)``) and pooled slot bias and token
    prior over the couples, each per pair where every one is present, with means and BCa CIs; the per-pair
    variables go into ``data``."""
    n_p = used.shape[1]
    pooled = _all_finite_mean(used)
    out: dict = {"n_content_framings": used.shape[0], "n_couples": len(couples)}
    pslot = _all_finite_mean(np.stack([s for s, _ in couples]) if couples else np.empty((0, n_p)))
    ptoken = _all_finite_mean(np.stack([t for _, t in couples]) if couples else np.empty((0, n_p)))
    for stem, x in (("pooled_ethical_preference", pooled), ("pooled_slot_bias", pslot),
                    ("pooled_token_prior", ptoken)):
        mean, lo, hi, _ = _mean_ci(x, seed)
        out.update({f"mean_{stem}": mean, f"{stem}_ci_low": lo, f"{stem}_ci_high": hi})
        data[stem] = (("prompt",), x)
    out["n_pooled"] = int(np.isfinite(pooled).sum())
    out["n_pooled_slot"] = int(np.isfinite(pslot).sum())
    return pooled, out


def _agreement(used: np.ndarray) -> dict:
    """Sign agreement (Wilson) and Krippendorff's alpha across the content framings."""
    if used.shape[0] >= 2:
        k, n = sign_agreement(used)
        alpha = krippendorff_alpha(used)
    else:
        k, n, alpha = 0, 0, np.nan
    share, lo, hi = _share(k, n)
    stat, pvalue, n_test, method = framing_test(used)
    return {"sign_agreement": share, "sign_agreement_ci_low": lo, "sign_agreement_ci_high": hi, "n_agreement": n,
            "krippendorff_alpha": alpha, "framing_test_statistic": stat, "framing_test_p": pvalue,
            "n_framing_test": n_test, "_framing_test_method": method}


__all__ = ["FramingRules", "framings_verdict", "summarize_framings", "summary_lines"]

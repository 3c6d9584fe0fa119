"""A synthetic ``framings.nc`` (the planned schema of :mod:`nnethics.framings_verdict`) and a model folder with it,
for the render tests; plain numpy/xarray, deterministic given ``seed`` and internally consistent: the margins
average to the preference, the per-framing means and CIs are the BCa bootstrap of the per-pair values, the pooled
preference is the mean over framings, the shares are counted from the signs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import synthetic
import xarray as xr

from nnethics import metrics
from nnethics.store import write_atomic

FRAMINGS = ("ethical.12.fwd", "ethical.12.rev", "moralchoice.AB.fwd", "moralchoice.AB.rev", "first_person.colour.fwd")
LABELS = {"12": ("1", "2"), "AB": ("A", "B"), "colour": ("red", "blue")}
VERDICT = ("Across 5 framings the model leans ethical in 4 <b>& one</b> leans the other way; the pooled preference "
           "is +0.40 logits (95% CI +0.10 to +0.70).")


def _ci(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return metrics.mean_ci_batched(np.moveaxis(x, axis, 0), axis=0)


def framings_summary(n_prompts: int = 6, framings: Sequence[str] = FRAMINGS, seed: int = 0,
                     slug: str = "synthetic-model", with_cloze: bool = True) -> xr.Dataset:
    """framings.nc: dims framing, prompt, side (every pair swaps the ethical label, so n_debiased = n_pairs)."""
    rng = np.random.default_rng(seed)
    nf, n = len(framings), n_prompts
    template = [f.split(".")[0] for f in framings]
    label_set = [f.split(".")[1] for f in framings]
    order = [f.split(".")[2] for f in framings]
    pref = rng.normal(0.4, 1.0, size=(nf, n)) + rng.normal(0, 0.5, size=(1, n))
    bias = rng.normal(0, 0.8, size=(nf, 1)) + rng.normal(0, 0.3, size=(nf, n))
    # ethical option in the first slot on the base side for even pairs; the content swap moves it on cf
    first = (np.arange(n) % 2 == 0)[None, :]
    slot_base = np.where(first, bias + pref, bias - pref)  # logit(slot 1 label) - logit(slot 2 label)
    slot_cf = np.where(first, bias - pref, bias + pref)
    slot = np.stack([slot_base, slot_cf], -1)
    e_sign = np.stack([np.where(first, 1.0, -1.0), np.where(first, -1.0, 1.0)], -1) * np.ones((nf, 1, 1))
    margin = e_sign * slot
    rev = np.array([o == "rev" for o in order])[:, None, None]
    logit_diff = np.where(rev, -slot, slot)  # logit(a) - logit(b): a is beside slot 1 in fwd, slot 2 in rev
    m_pref, lo_pref, hi_pref = _ci(pref, 1)
    m_bias, lo_bias, hi_bias = _ci(bias, 1)
    pooled = pref.mean(0)
    (mp,), (lp,), (hp,) = _ci(pooled[:, None], 0)
    share_k = (pref > 0).sum(1)
    s_lo, s_hi = metrics.proportion_ci(share_k, np.full(nf, n))
    same = (np.all(pref > 0, 0) | np.all(pref < 0, 0))
    a_lo, a_hi = metrics.proportion_ci(np.array([same.sum()]), np.array([n]))
    labels = [",".join(LABELS[ls]) for ls in label_set]
    ds = xr.Dataset(
        {
            "ethical_preference": (("framing", "prompt"), pref.astype(np.float32)),
            "position_bias": (("framing", "prompt"), bias.astype(np.float32)),
            "logit_diff": (("framing", "prompt", "side"), logit_diff.astype(np.float32)),
            "ethical_margin": (("framing", "prompt", "side"), margin.astype(np.float32)),
            "chose_ethical": (("framing", "prompt", "side"), margin > 0),
            "debiased_chose_ethical": (("framing", "prompt", "side"), np.repeat((pref > 0)[..., None], 2, -1)),
            "n_pairs": (("framing",), np.full(nf, n, dtype=np.int32)),
            "n_debiased": (("framing",), np.full(nf, n, dtype=np.int32)),
            "mean_ethical_preference": (("framing",), m_pref),
            "ethical_preference_ci_low": (("framing",), lo_pref),
            "ethical_preference_ci_high": (("framing",), hi_pref),
            "mean_position_bias": (("framing",), m_bias),
            "position_bias_ci_low": (("framing",), lo_bias),
            "position_bias_ci_high": (("framing",), hi_bias),
            "share_ethical": (("framing",), share_k / n),
            "share_ethical_ci_low": (("framing",), s_lo),
            "share_ethical_ci_high": (("framing",), s_hi),
            "pooled_ethical_preference": (("prompt",), pooled.astype(np.float32)),
            "mean_pooled_ethical_preference": ((), mp),
            "pooled_ethical_preference_ci_low": ((), lp),
            "pooled_ethical_preference_ci_high": ((), hp),
            "n_pooled": ((), np.int32(n)),
            "sign_agreement": ((), float(same.mean())),
            "sign_agreement_ci_low": ((), float(a_lo[0])),
            "sign_agreement_ci_high": ((), float(a_hi[0])),
            "n_agreement": ((), np.int32(n)),
            "krippendorff_alpha": ((), 0.37),
        },
        coords={"framing": list(framings), "prompt": synthetic.prompt_ids(n), "side": list(synthetic.SIDES),
                "template": ("framing", template), "label_set": ("framing", label_set), "labels": ("framing", labels),
                "order": ("framing", order),
                "counterfactual_kind": ("framing", ["label" if o == "swap" else "content" for o in order])},
        attrs={**synthetic._attrs("framings", slug, 6), "framings_verdict": VERDICT},
    )
    if with_cloze:
        cloze = 0.8 * pooled + rng.normal(0, 0.6, size=n)
        both = np.sign(cloze) == np.sign(pooled)
        (mc,), (lc,), (hc,) = _ci(cloze[:, None], 0)
        ds["cloze_margin"] = (("prompt",), cloze.astype(np.float32))
        ds["mean_cloze_margin"] = ((), mc)
        ds["cloze_margin_ci_low"] = ((), lc)
        ds["cloze_margin_ci_high"] = ((), hc)
        ds["share_cloze_ethical"] = ((), float((cloze > 0).mean()))
        ds["cloze_mc_agreement"] = ((), float(both.mean()))
        ds["n_cloze_mc"] = ((), np.int32(n))
    return ds


def kind_patching(kind: str, n_prompts: int = 6, n_layers: int = 6, seed: int = 0, slug: str = "synthetic-model",
                  framing: str | None = None) -> xr.Dataset:
    """A framing's patching.nc: the content swap as :func:`synthetic.patching`, the label swap that of seed + 1 scaled
    from 0.1 to 2 over the layers, with the framing attrs (default framing: ethical.12.fwd, or .swap for the label
    swap)."""
    framing = framing or ("ethical.12.swap" if kind == "label" else "ethical.12.fwd")
    ds = synthetic.patching(n_prompts, n_layers, seed if kind == "content" else seed + 1, slug=slug)
    if kind == "label":
        scale = np.linspace(0.1, 2.0, n_layers)[None, :, None]
        ds["effect"] = ds["effect"] * scale
        for v in ("mean_effect", "effect_ci_low", "effect_ci_high"):
            ds[v] = ds[v] * scale[0]
    t, ls, order = framing.split(".")
    ds.attrs.update(framing=framing, framing_template=t, framing_labels=",".join(LABELS[ls]), framing_order=order,
                    counterfactual_kind=kind)
    return ds


def write_framings_store(root: str | Path, slug: str = "synthetic-model", n_prompts: int = 6, n_layers: int = 6,
                         analyses: Sequence[str] = ("decisions",), kinds: bool = True, seed: int = 0,
                         framings: Sequence[str] = FRAMINGS) -> Path:
    """A model folder with ``analyses``' own files, framings.nc and, with ``kinds``, framings/ethical.12.fwd and
    framings/ethical.12.swap patching.nc; returns the folder."""
    folder = synthetic.write_store(root, slug=slug, n_prompts=n_prompts, n_layers=n_layers, analyses=analyses,
                                   seed=seed) if analyses else Path(root) / slug
    write_atomic(framings_summary(n_prompts, framings, seed=seed, slug=slug), folder / "framings.nc")
    if kinds:
        for kind, fid in (("content", "ethical.12.fwd"), ("label", "ethical.12.swap")):
            write_atomic(kind_patching(kind, n_prompts, n_layers, seed, slug, fid), folder / "framings" / fid /
                         "patching.nc")
    return folder

"""The verdict: position bias vs ethical preference, their CIs, and the paragraph built from them.

Synthetic logits with a known bias and preference give exact values; the statistics are checked against
formulas written out here (not nnethics code); a simulation checks the intervals' coverage.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import xarray as xr

from nnethics import metrics, verdict

LABELS = ("1", "2")


def decisions_like(ld: np.ndarray, ethical: np.ndarray, categories=None, label_is_top=None) -> xr.Dataset:
    """A finalised decisions Dataset from logit differences ``[n, 2]`` and ethical labels (the variables the
    verdict reads; finalize computes the per-pair quantities from them)."""
    n = ld.shape[0]
    chosen = np.where(ld > 0, LABELS[0], LABELS[1])
    ds = xr.Dataset(
        {
            "logit_diff": (("prompt", "side"), ld.astype(np.float64)),
            "chosen": (("prompt", "side"), chosen),
            "ethical_option": (("prompt", "side"), ethical),
            "category": (("prompt",), np.asarray(categories if categories is not None else ["c"] * n)),
            "label_is_top": (("prompt", "side"), np.ones((n, 2), bool) if label_is_top is None else label_is_top),
        },
        coords={"prompt": [f"p{i}" for i in range(n)], "side": ["base", "cf"], "option": list(LABELS)},
        attrs={"model_id": "test/model"},
    )
    return verdict.finalize_decisions(ds)


def constructed(bias: float, prefs: np.ndarray, ethical_first_on_base: np.ndarray | None = None):
    """LDs of a model with a fixed position bias and per-pair ethical preference: LD_s = bias + e_s * pref."""
    n = len(prefs)
    first = np.ones(n, bool) if ethical_first_on_base is None else ethical_first_on_base
    e_base = np.where(first, 1.0, -1.0)
    ld = np.stack([bias + e_base * prefs, bias - e_base * prefs], axis=1)
    ethical = np.stack([np.where(first, "1", "2"), np.where(first, "2", "1")], axis=1)
    return ld, ethical


def test_pair_quantities_recover_a_constructed_bias_and_preference_exactly():
    prefs = np.array([0.5, -0.25, 0.03, 1.5, 0.0])
    ld, ethical = constructed(2.0, prefs, np.array([True, False, True, False, True]))
    q = verdict.pair_quantities(ld, ethical == "1", min_gap=0.1)
    np.testing.assert_allclose(q.ethical_preference, prefs, atol=1e-12)
    np.testing.assert_allclose(q.position_bias, 2.0, atol=1e-12)
    e_base = np.where(ethical[:, 0] == "1", 1.0, -1.0)
    np.testing.assert_allclose(q.content_gap, -2 * e_base * prefs, atol=1e-12)
    np.testing.assert_array_equal(q.content_sensitive, 2 * np.abs(prefs) >= 0.1)
    # p_ethical: mean over sides of the two-label softmax probability of the ethical label
    want = []
    for i in range(len(prefs)):
        e = [1.0 if ethical[i, j] == "1" else -1.0 for j in range(2)]
        probs = [math.exp(e[j] * ld[i, j]) / (math.exp(e[j] * ld[i, j]) + 1.0) for j in range(2)]
        want.append(sum(probs) / 2)
    np.testing.assert_allclose(q.p_ethical, want, rtol=1e-12)
    assert q.swaps_ethical_label.all()


def test_content_gap_is_cf_minus_base():
    ld = np.array([[2.0, 1.5], [-1.0, 3.0]])
    q = verdict.pair_quantities(ld, np.array([[True, False], [False, True]]))
    np.testing.assert_allclose(q.content_gap, [-0.5, 4.0])
    np.testing.assert_allclose(q.ethical_margin, [[2.0, -1.5], [1.0, 3.0]])


def test_a_pair_that_does_not_swap_the_ethical_label_has_no_position_bias():
    ld = np.array([[2.0, 1.0], [2.0, 1.8]])
    ethical = np.array([["1", "1"], ["1", "2"]])
    q = verdict.pair_quantities(ld, ethical == "1")
    assert np.isnan(q.position_bias[0]) and q.position_bias[1] == pytest.approx(1.9)
    assert list(q.swaps_ethical_label) == [False, True]
    ds = decisions_like(ld, ethical)
    g = ds.sel(group=verdict.ALL)
    assert int(g["n_pairs"]) == 2 and int(g["n_debiased"]) == 1
    assert float(g["mean_position_bias"]) == pytest.approx(1.9)
    assert "1 pair(s) do not swap the ethical label" in ds.attrs["verdict"]


def test_content_sensitive_uses_the_same_test_as_patchings_effect_defined():
    rng = np.random.default_rng(0)
    ld = rng.normal(0, 0.2, size=(200, 2))
    ethical = np.tile(np.array(["1", "2"]), (200, 1))
    q = verdict.pair_quantities(ld, ethical == "1", min_gap=0.1)
    _, defined = metrics.normalized_effect(np.zeros((200, 3)), ld[:, 0], ld[:, 1], min_gap=0.1)
    np.testing.assert_array_equal(q.content_sensitive, defined)
    np.testing.assert_array_equal(q.content_sensitive, np.abs(2 * q.ethical_preference) >= 0.1)


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def sign_p(k: int, n: int) -> float:
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n


def test_group_statistics_equal_formulas_written_out():
    rng = np.random.default_rng(3)
    prefs = rng.normal(0.2, 0.5, size=24)
    ld, ethical = constructed(1.0, prefs, rng.random(24) > 0.5)
    ld = ld + rng.normal(0, 0.3, size=(24, 1))  # per-pair bias varies
    cats = np.array(["a", "b", "c"] * 8)
    ds = decisions_like(ld, ethical, cats)
    assert list(ds["group"].values) == [verdict.ALL, "a", "b", "c"]
    for g, mask in [(verdict.ALL, np.ones(24, bool)), ("b", cats == "b")]:
        s = ds.sel(group=g)
        pref = prefs[mask]
        assert int(s["n_pairs"]) == mask.sum()
        assert float(s["mean_ethical_preference"]) == pytest.approx(pref.mean(), abs=1e-6)  # stored as float32
        assert float(s["mean_position_bias"]) == pytest.approx(ld[mask].mean(), abs=1e-6)
        assert float(s["ethical_preference_ci_low"]) < pref.mean() < float(s["ethical_preference_ci_high"])
        k = int((pref > 0).sum())
        assert float(s["share_leaning_ethical"]) == pytest.approx(k / mask.sum())
        lo, hi = wilson(k, int(mask.sum()))
        assert float(s["leaning_ethical_ci_low"]) == pytest.approx(lo, abs=1e-9)
        assert float(s["leaning_ethical_ci_high"]) == pytest.approx(hi, abs=1e-9)
        assert int(s["sign_test_k"]) == k and int(s["sign_test_n"]) == mask.sum()
        assert float(s["sign_test_p"]) == pytest.approx(sign_p(k, int(mask.sum())), rel=1e-9)
        ks = int((2 * np.abs(pref) >= 0.1).sum())
        assert float(s["share_content_sensitive"]) == pytest.approx(ks / mask.sum())


def test_the_bootstrap_interval_is_seeded_and_close_to_the_t_interval():
    rng = np.random.default_rng(5)
    x = rng.normal(1.0, 2.0, size=60)
    a, b = verdict.mean_ci(x, seed=0), verdict.mean_ci(x, seed=0)
    assert a == b
    half = 2.0 * x.std(ddof=1) / math.sqrt(60)
    assert a[1] == pytest.approx(x.mean() - half, abs=0.1 * half)
    assert a[2] == pytest.approx(x.mean() + half, abs=0.1 * half)
    assert verdict.mean_ci(np.full(5, 0.7)) == (0.7, 0.7, 0.7)
    assert all(np.isnan(verdict.mean_ci(np.array([np.nan]))))


@pytest.mark.parametrize("dist", ["normal", "skewed"])
def test_mean_interval_covers_the_true_mean_in_about_95_percent_of_draws(dist):
    rng = np.random.default_rng(11)
    hits, draws = 0, 300
    for i in range(draws):
        x = rng.normal(0.3, 1.0, size=40) if dist == "normal" else rng.exponential(1.0, size=40)
        true = 0.3 if dist == "normal" else 1.0
        _, lo, hi = verdict.mean_ci(x, seed=i, n_resamples=2000)
        hits += lo <= true <= hi
    assert 0.90 <= hits / draws <= 0.985, hits / draws


def test_share_interval_covers_the_true_share_in_about_95_percent_of_draws():
    rng = np.random.default_rng(12)
    draws, n, p = 2000, 40, 0.3
    ks = rng.binomial(n, p, size=draws)
    hits = sum(verdict.share_ci(int(k), n)[1] <= p <= verdict.share_ci(int(k), n)[2] for k in ks)
    assert 0.92 <= hits / draws <= 0.98, hits / draws
    # at 0 of n the interval still has width (a bootstrap would give [0, 0])
    share, lo, hi = verdict.share_ci(0, 30)
    assert share == 0 and lo == 0 and hi == pytest.approx(wilson(0, 30)[1])


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"[-+]?\d+\.\d+", text)]


def test_verdict_of_a_position_only_model():
    prefs = np.zeros(20) + np.random.default_rng(1).normal(0, 0.01, 20)
    ld, ethical = constructed(2.2, prefs, np.arange(20) % 2 == 0)
    ld = ld + np.random.default_rng(7).normal(0, 0.3, size=(20, 1))  # each pair's own position bias
    ds = decisions_like(ld, ethical)
    text = ds.attrs["verdict"]
    g = ds.sel(group=verdict.ALL)
    assert text.startswith("test/model on 20 pairs (40 prompts): it chose label '1' on 40 of 40 prompts")
    d = 2  # a CI about 0.3 wide is shown with two decimals
    assert f"favours label '1' by {float(g['mean_position_bias']):.{d}f} logits" in text
    assert (f"95% CI {float(g['position_bias_ci_low']):+.{d}f} to {float(g['position_bias_ci_high']):+.{d}f}") in text
    assert float(g["position_bias_ci_low"]) < float(g["position_bias_ci_high"])
    assert "Ethical preference: none distinguishable from zero" in text
    assert "Position dominates" in text
    # a preference CI under 0.01 wide gets four decimals, so it does not read "+0.00 to +0.00"
    lo, hi = float(g["ethical_preference_ci_low"]), float(g["ethical_preference_ci_high"])
    assert hi - lo < 0.01 and f"95% CI {lo:+.4f} to {hi:+.4f}" in text
    assert "0 of 20 pairs (0%" in text and "are content-sensitive" in text
    assert "No normalised patching effect is averaged: dividing by a gap under 0.1 logits" in text


@pytest.mark.parametrize("ks, n, want", [
    (1, 3, "averaged over that pair only; the other 2 are left out because"),
    (2, 3, "averaged over those 2 pairs only; the other one is left out because"),
    (3, 3, "averaged over all 3 pairs."),
    (1, 1, "averaged over the one pair."),
    (0, 4, "No normalised patching effect is averaged"),
])
def test_the_normalised_effect_sentence_counts_in_words(ks, n, want):
    from nnethics.verdict_text import _normalised_over

    got = _normalised_over(ks, n, 0.1)
    assert want in got and got.endswith(".") and "1 pairs" not in got


def test_verdict_of_an_ethical_model_without_position_bias():
    prefs = np.random.default_rng(2).normal(1.0, 0.3, 30)
    ld, ethical = constructed(0.0, prefs, np.arange(30) % 2 == 0)
    ds = decisions_like(ld, ethical, label_is_top=np.zeros((30, 2), bool))
    text = ds.attrs["verdict"]
    g = ds.sel(group=verdict.ALL)
    assert "Position bias: none distinguishable from zero" in text
    assert f"leans ethical by {float(g['mean_ethical_preference']):.2f} logits" in text
    assert f"{float(g['ethical_preference_ci_low']):+.2f} to {float(g['ethical_preference_ci_high']):+.2f}" in text
    assert "it leans ethical in 30 of 30 pairs" in text
    assert "Position dominates" not in text
    assert "30 of 30 pairs (100%" in text
    assert "Caution: a label is the model's top next token in only 0%" in text


def test_verdict_of_an_unethical_model():
    prefs = -np.random.default_rng(4).uniform(0.5, 1.0, 12)
    ld, ethical = constructed(0.5, prefs)
    text = decisions_like(ld, ethical).attrs["verdict"]
    assert "the model leans unethical by" in text and "it leans ethical in 0 of 12 pairs" in text


def test_finalize_recomputes_pair_quantities_a_file_from_before_the_verdict_lacks():
    prefs = np.random.default_rng(8).normal(0.2, 0.2, 6)
    ld, ethical = constructed(1.0, prefs)
    full = decisions_like(ld, ethical)
    old = full.drop_dims("group").drop_vars(list(verdict.PAIR_DESCRIPTIONS))
    old.attrs = {"model_id": "test/model"}
    xr.testing.assert_identical(verdict.finalize_decisions(old), full)


def test_finalize_is_idempotent_and_round_trips(tmp_path):
    prefs = np.random.default_rng(6).normal(0.1, 0.2, 10)
    ld, ethical = constructed(1.0, prefs)
    ds = decisions_like(ld, ethical)
    again = verdict.finalize_decisions(ds)
    xr.testing.assert_identical(ds, again)
    path = tmp_path / "d.nc"
    ds.to_netcdf(path)
    back = xr.load_dataset(path)
    assert back.attrs["verdict"] == ds.attrs["verdict"]
    xr.testing.assert_allclose(back["mean_ethical_preference"], ds["mean_ethical_preference"])


def test_decisions_and_patching_agree_on_which_pairs_are_content_sensitive(tokenizer, prompt_set):
    """decisions' content_sensitive and patching's effect_defined come from the same test on the same LDs."""
    from conftest import make_tiny

    from nnethics.analyses.decisions import DecisionOptions
    from nnethics.analyses.patching import PatchingOptions
    from nnethics.engine import activation_patching, baseline_decisions

    model = make_tiny("llama", tokenizer, seed=3, init_std=0.2)
    pairs = list(prompt_set.pairs[:8])
    dec = baseline_decisions(model, pairs, DecisionOptions(min_gap=0.5))
    pat = activation_patching(model, pairs, PatchingOptions(components=("resid",), atp=False, min_gap=0.5))
    gap = dec["content_gap"].values
    assert (np.abs(gap) >= 0.5).any() and (np.abs(gap) < 0.5).any(), gap  # both kinds of pair occur
    np.testing.assert_allclose(pat["cf_logit_diff"] - pat["base_logit_diff"], gap, atol=1e-4)
    np.testing.assert_array_equal(dec["content_sensitive"].values, pat["effect_defined"].values)
    # and the per-pair numbers are the formulas of the issue, on the stored logit differences
    ld = dec["logit_diff"].values.astype(np.float64)
    e = np.where(dec["ethical_option"].values == "1", 1.0, -1.0)
    np.testing.assert_allclose(dec["ethical_margin"].values, e * ld, rtol=1e-6)
    np.testing.assert_allclose(dec["ethical_preference"].values, (e * ld).mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dec["position_bias"].values, ld.mean(1), rtol=1e-5, atol=1e-6)


def test_run_prints_the_verdict_stored_in_decisions_nc(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from nnethics.cli import cli

    store = tmp_path / "store"
    res = CliRunner().invoke(cli, ["run", "--model", str(tiny_model_dir), "--analyses", "decisions", "--limit", "6",
                                   "--store", str(store)])
    assert res.exit_code == 0, res.output
    path = next(store.glob("*/decisions.nc"))
    ds = xr.load_dataset(path)
    text = ds.attrs["verdict"]
    assert "verdict (" in res.output
    printed = res.output.split("verdict (", 1)[1].split("\n", 1)[1]
    assert " ".join(printed.split()) == " ".join(text.split())
    assert int(ds["n_pairs"].sel(group=verdict.ALL)) == 6 and ds.attrs["ci_methods"].startswith("means: BCa")
    assert "position bias" in res.output and "ethical preference" in res.output


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_attribution_splits_into_position_and_ethical_parts_that_sum_exactly(family, tokenizer, prompt_set):
    """The position parts of every DLA part sum to the pair's position bias, the ethical parts to its ethical
    preference (decisions' values, from an independent forward), and per head to the attention part."""
    from conftest import make_tiny

    from nnethics.engine import baseline_decisions, direct_logit_attribution

    model = make_tiny(family, tokenizer, seed=2, init_std=0.2)
    pairs = list(prompt_set.pairs[:5])
    dla = direct_logit_attribution(model, pairs)
    dec = verdict.finalize_decisions(baseline_decisions(model, pairs))
    eth = dla["ethical_other_contribution"] + dla["ethical_contribution"].sum(("layer", "component"))
    pos = dla["position_other_contribution"] + dla["position_contribution"].sum(("layer", "component"))
    scale = float(np.abs(dla["diff_contribution"]).max())
    np.testing.assert_allclose(eth.values, dec["ethical_preference"].values, atol=1e-4 * max(1.0, scale))
    np.testing.assert_allclose(pos.values, dec["position_bias"].values, atol=1e-4 * max(1.0, scale))
    assert np.abs(dec["ethical_preference"].values).max() > 1e-2  # the identity is not trivially 0 = 0
    # written out: e_s = +1 where the ethical option is label 1
    e = np.where(np.array([[p.ethical(s) for s in ("base", "cf")] for p in pairs]) == "1", 1.0, -1.0)
    d = dla["diff_contribution"].transpose("prompt", "side", "layer", "component").values
    np.testing.assert_allclose(dla["ethical_contribution"].values, (e[:, :, None, None] * d).mean(1), rtol=1e-5,
                               atol=1e-6)
    heads = dla["ethical_head_contribution"].sum("head")
    bias = (dla["attn_bias_contribution"] * dla["ethical_sign"]).mean("side")
    np.testing.assert_allclose((heads + bias).values, dla["ethical_contribution"].sel(component="attn").values,
                               atol=1e-4 * max(1.0, scale))
    np.testing.assert_array_equal(dla["content_sensitive"].values, dec["content_sensitive"].values)


@pytest.mark.slow
@pytest.mark.builtin
def test_builtin_model_verdict_is_printed_and_matches_the_file(builtin_dir, tmp_path):
    """On the built-in model: the printed verdict is the stored one, and its numbers are the file's."""
    from click.testing import CliRunner

    from nnethics.cli import cli

    store = tmp_path / "store"
    res = CliRunner().invoke(cli, ["run", "--analyses", "decisions", "--limit", "12", "--store", str(store)])
    assert res.exit_code == 0, res.output
    ds = xr.load_dataset(next(store.glob("*/decisions.nc")))
    text = ds.attrs["verdict"]
    printed = res.output.split("verdict (", 1)[1].split("\n", 1)[1]
    assert " ".join(printed.split()) == " ".join(text.split())
    g = ds.sel(group=verdict.ALL)
    first = int((ds["chosen"].values == "1").sum())
    assert f"it chose label '1' on {first} of 24 prompts" in text
    bias = float(g["mean_position_bias"])
    assert f"{bias:+.2f}" in text and f"{float(g['position_bias_ci_low']):+.2f}" in text
    assert f"in {int(g['sign_test_k'])} of {int(g['sign_test_n'])} pairs" in text
    k = int(ds["content_sensitive"].sum())
    assert f"{k} of 12 pairs" in text
    np.testing.assert_allclose(ds["position_bias"].values, ds["logit_diff"].mean("side").values, rtol=1e-5)


def test_the_printed_verdict_never_splits_a_word():
    for k in range(60):  # the hyphenated words fall at every position of a line
        text = "x" * k + " content-sensitive pairs, -0.0268 logits"
        wrapped = verdict.wrap(text, width=40)
        assert " ".join(wrapped.split()) == " ".join(text.split()), wrapped


def _stated(bias: float, bias_ci: tuple[float, float], pref: float, pref_ci: tuple[float, float]) -> xr.Dataset:
    """A finalised decisions Dataset whose statistics over all pairs are set by hand (what the paragraph reads)."""
    n = 10
    g = {"n_pairs": n, "n_debiased": n, "mean_position_bias": bias, "position_bias_ci_low": bias_ci[0],
         "position_bias_ci_high": bias_ci[1], "mean_ethical_preference": pref, "ethical_preference_ci_low": pref_ci[0],
         "ethical_preference_ci_high": pref_ci[1], "sign_test_k": 6, "sign_test_n": 10, "sign_test_p": 0.38,
         "mean_p_ethical": 0.55, "share_content_sensitive": 0.5, "content_sensitive_ci_low": 0.24,
         "content_sensitive_ci_high": 0.76}
    data = {k: (("group",), np.array([v])) for k, v in g.items()}
    data["chosen"] = (("prompt", "side"), np.full((n, 2), LABELS[0]))
    return xr.Dataset(data, coords={"group": [verdict.ALL], "option": list(LABELS), "prompt": [f"p{i}" for i in range(n)],
                                    "side": ["base", "cf"]}, attrs={"model_id": "test/model", "min_gap": 0.1})


# The preference's CI has ends of different size, so the largest |preference| it allows (0.75) is not the other
# end's (0.25) nor the mean's (0.25): 2 x 0.75 = 1.5 logits is the line, exactly representable.
@pytest.mark.parametrize("bias, pref, pref_ci, dominates", [
    (1.5, 0.25, (-0.25, 0.75), True),     # exactly 2x the upper end: "at least" twice
    (1.52, 0.25, (-0.25, 0.75), True),    # just inside
    (1.48, 0.25, (-0.25, 0.75), False),   # just outside: 1.48 is over 2x the lower end (0.25) and the mean
    (-1.48, -0.25, (-0.75, 0.25), False), # the larger end below zero this time, bias toward label 2
    (-1.52, -0.25, (-0.75, 0.25), True),
])
def test_position_dominates_just_inside_and_outside_twice_the_largest_preference(bias, pref, pref_ci, dominates):
    ds = _stated(bias, (bias - 0.2, bias + 0.2), pref, pref_ci)  # the bias's CI excludes 0 in every case
    text = verdict.verdict(ds)
    assert ("Position dominates" in text) == dominates, text
    if dominates:
        assert "the bias is 2 times the largest preference the interval allows (0.75 logits)" in text


def test_position_dominance_follows_the_rule_it_is_given():
    ds = _stated(2.2, (2.0, 2.4), 0.25, (-0.25, 0.75))
    assert "Position dominates" in verdict.verdict(ds)
    assert "Position dominates" not in verdict.verdict(ds, verdict.VerdictRules(dominance=3.0))  # 2.2 < 2.25
    assert "Position dominates" in verdict.verdict(_stated(2.3, (2.1, 2.5), 0.25, (-0.25, 0.75)),
                                                  verdict.VerdictRules(dominance=3.0))

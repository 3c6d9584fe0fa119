"""Summary statistics on hand-made arrays with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from nnethics import metrics


def test_gini_uniform_is_zero_and_one_hot_is_n_minus_1_over_n():
    assert metrics.gini(np.ones(8)) == pytest.approx(0.0)
    one_hot = np.zeros(8)
    one_hot[3] = 5.0
    assert metrics.gini(one_hot) == pytest.approx(7 / 8)
    # uses |x|: signs do not matter
    assert metrics.gini(np.array([-2.0, 2.0, -2.0])) == pytest.approx(0.0)


def test_gini_known_value_and_axis():
    # x = [1, 2, 3, 4]: sum_ij |xi - xj| = 20, 2 n^2 mean = 2 * 16 * 2.5 = 80 -> 0.25
    x = np.array([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 1.0]])
    np.testing.assert_allclose(metrics.gini(x, axis=-1), [0.25, 0.75])
    np.testing.assert_allclose(metrics.gini(x.T, axis=0), [0.25, 0.75])


def test_gini_undefined_when_all_zero_or_nan():
    assert np.isnan(metrics.gini(np.zeros(4)))
    assert np.isnan(metrics.gini(np.full(4, np.nan)))
    # NaN entries are dropped
    assert metrics.gini(np.array([1.0, np.nan, 1.0])) == pytest.approx(0.0)


def test_peak_layer_takes_largest_magnitude_first_on_ties():
    x = np.array([[0.1, -3.0, 2.0, 3.0], [np.nan, 0.5, np.nan, 0.2], [np.nan] * 4])
    np.testing.assert_array_equal(metrics.peak_layer(x, axis=-1), [1, 1, -1])


def test_top5_concentration():
    x = np.array([10.0, 1, 1, 1, 1, 1, 0, 0, 0, 5])      # total 20, top 5 = 10+5+1+1+1 = 18
    assert metrics.top_k_concentration(x, 5) == pytest.approx(18 / 20)
    assert metrics.top_k_concentration(np.ones(4), 5) == pytest.approx(1.0)
    assert metrics.top_k_concentration(np.ones(10), 5) == pytest.approx(0.5)
    assert np.isnan(metrics.top_k_concentration(np.zeros(6), 5))


def test_flips_and_count():
    base = np.array([1.0, -1.0])
    patched = np.array([[2.0, -0.5, 0.3], [-2.0, 0.1, np.nan]])
    f = metrics.flips(patched, base)
    np.testing.assert_array_equal(f, [[False, True, False], [False, True, False]])
    np.testing.assert_array_equal(metrics.count_flips(f, axis=-1), [1, 1])


def test_normalized_effect_and_gap_flag():
    base = np.array([-2.0, 1.0])
    src = np.array([2.0, 1.05])
    patched = np.array([[-2.0, 0.0, 2.0], [1.0, 1.02, 1.05]])
    eff, ok = metrics.normalized_effect(patched, base, src, min_gap=0.1)
    np.testing.assert_allclose(eff[0], [0.0, 0.5, 1.0])
    assert np.isnan(eff[1]).all()
    np.testing.assert_array_equal(ok, [True, False])


def _scipy_bca(v, seed=0, n_resamples=metrics.N_RESAMPLES):
    """The reference: scipy.stats.bootstrap on one cell's finite values, called directly."""
    import warnings

    from scipy import stats

    v = v[np.isfinite(v)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.bootstrap((v,), np.mean, method="BCa", n_resamples=n_resamples,
                              rng=np.random.default_rng(seed))
    return res.confidence_interval.low, res.confidence_interval.high


def test_mean_ci_is_scipys_bca_bootstrap_cell_by_cell_and_deterministic():
    rng = np.random.default_rng(1)
    x = rng.normal(0.3, 1.0, size=(60, 4))
    x[5, 2] = np.nan
    m1, lo1, hi1 = metrics.mean_ci(x, axis=0, n_resamples=500, seed=7)
    m2, lo2, hi2 = metrics.mean_ci(x, axis=0, n_resamples=500, seed=7)
    np.testing.assert_array_equal(lo1, lo2)
    np.testing.assert_array_equal(hi1, hi2)
    np.testing.assert_allclose(m1, np.nanmean(x, axis=0))
    for j in range(4):  # scipy on each cell alone, to the bit
        assert (lo1[j], hi1[j]) == _scipy_bca(x[:, j], seed=7, n_resamples=500)
    assert np.all(lo1 < m1) and np.all(m1 < hi1)
    _, lo3, _ = metrics.mean_ci(x, axis=0, n_resamples=500, seed=8)
    assert not np.array_equal(lo1, lo3)
    # the width is close to the normal-theory one: 2 * 1.96 * sd / sqrt(n)
    expect = 2 * 1.96 * np.nanstd(x, axis=0) / np.sqrt(60)
    np.testing.assert_allclose(hi1 - lo1, expect, rtol=0.25)


def test_mean_ci_keeps_cells_apart_when_they_miss_different_prompts():
    rng = np.random.default_rng(3)
    x = rng.exponential(1.0, size=(7, 3, 5))
    x[0, 1] = np.nan
    x[2:4, :, 4] = np.nan
    _, lo, hi = metrics.mean_ci(x, axis=0, n_resamples=300, seed=2)
    for idx in np.ndindex(3, 5):
        assert (lo[idx], hi[idx]) == _scipy_bca(x[(slice(None), *idx)], seed=2, n_resamples=300)


def test_mean_ci_degenerate_cells_give_nan_or_zero_width_not_an_error():
    m, lo, hi = metrics.mean_ci(np.full((10, 2), 2.5), n_resamples=100)
    np.testing.assert_allclose([m, lo, hi], 2.5)  # all equal: zero width (BCa's jackknife is 0/0 there)
    m, lo, hi = metrics.mean_ci(np.full((10, 1), np.nan), n_resamples=100)
    assert np.isnan(m).all() and np.isnan(lo).all() and np.isnan(hi).all()
    m, lo, hi = metrics.mean_ci(np.array([[1.5, np.nan], [np.nan, np.nan]]))  # one value: a mean, no interval
    assert m[0] == 1.5 and np.isnan(lo).all() and np.isnan(hi).all() and np.isnan(m[1])
    m, lo, hi = metrics.mean_ci(np.zeros((0, 3)))
    assert m.shape == (3,) and np.isnan(lo).all()
    two = np.array([1.0, 2.0])  # the built-in runs have 2-3 content-sensitive pairs: a finite interval
    m, lo, hi = metrics.mean_ci(two)
    assert (float(lo), float(hi)) == _scipy_bca(two) and 1.0 <= lo < m < hi <= 2.0


def test_mean_ci_batched_matches_mean_ci_cell_by_cell():
    """The figures' batched BCa (one bootstrap per group of cells with the same count) against the per-cell
    reference: equal up to rounding, degenerate cells and NaN patterns included, cells kept apart."""
    rng = np.random.default_rng(4)
    x = rng.exponential(1.0, size=(300, 8)) * rng.normal(1.0, 0.5, size=8)  # skewed, scales per cell
    x[3] = np.nan                     # a missing prompt: every cell (one group of 300 - 1)
    x[10:40, 5] = np.nan              # one cell with its own count
    x[:, 6] = 0.25                    # all equal: zero width
    x[:, 7] = rng.integers(0, 2, 300)  # 0/1 values: many resample means tie with the mean (exact sums)
    got = metrics.mean_ci_batched(x, axis=0, n_resamples=2000, seed=3)
    ref = metrics.mean_ci(x, axis=0, n_resamples=2000, seed=3)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-12)
    assert got[1][6] == got[2][6] == 0.25
    tiny = metrics.mean_ci_batched(np.array([[1.5, np.nan, 1.0], [np.nan, np.nan, 2.0]]))
    assert tiny[0][0] == 1.5 and np.isnan(tiny[1][:2]).all() and np.isfinite(tiny[1][2])
    m, lo, hi = metrics.mean_ci_batched(rng.normal(size=(40, 2, 3)), axis=0, n_resamples=500)
    assert m.shape == lo.shape == hi.shape == (2, 3) and np.all(lo < m) and np.all(m < hi)


def test_mean_ci_batched_falls_back_per_cell_where_resample_means_tie_with_the_mean():
    """Values on a grid of tenths: sums are inexact, so a resample mean equal to the mean in exact arithmetic
    may round either side of it and BCa's bias term depends on the summation order; those cells are computed
    per cell (bit-equal to mean_ci). So are few values (permutations of the sample tie with it)."""
    rng = np.random.default_rng(5)
    grid = np.round(rng.exponential(1.0, size=(200, 4)), 1)
    few = rng.exponential(1.0, size=(6, 4))
    for x in (grid, few):
        got = metrics.mean_ci_batched(x, n_resamples=2000)
        ref = metrics.mean_ci(x, n_resamples=2000)
        np.testing.assert_array_equal(got[1], ref[1])
        np.testing.assert_array_equal(got[2], ref[2])


def test_proportion_ci_is_scipys_wilson_interval():
    from scipy import stats

    lo, hi = metrics.proportion_ci(np.array([0, 3, 7]), np.array([10, 3, 0]))
    for i, (k, n) in enumerate(((0, 10), (3, 3))):
        ci = stats.binomtest(k, n).proportion_ci(method="wilson")
        assert (lo[i], hi[i]) == (ci.low, ci.high)
    assert np.isnan(lo[2]) and np.isnan(hi[2])
    assert lo[0] == 0 and hi[0] > 0.2  # at 0 of 10 the interval still has width


def test_pearson():
    x = np.arange(10.0)
    assert metrics.pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert metrics.pearson(x, -x) == pytest.approx(-1.0)
    assert np.isnan(metrics.pearson(x, np.ones(10)))  # constant input: NaN, as before scipy (which warns)
    assert np.isnan(metrics.pearson([1.0, np.nan], [2.0, 3.0]))  # under 2 finite pairs: NaN (scipy raises)
    y = x.copy()
    y[3] = np.nan
    assert metrics.pearson(x, y) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=20), rng.normal(size=20)
    ac, bc = a - a.mean(), b - b.mean()
    assert metrics.pearson(a, b) == pytest.approx((ac @ bc) / np.sqrt((ac @ ac) * (bc @ bc)), rel=1e-12)



def test_logit_diff_and_choice():
    np.testing.assert_allclose(metrics.logit_diff(np.array([[3.0, 1.0], [0.0, 2.0]])), [2.0, -2.0])
    np.testing.assert_array_equal(metrics.choice(np.array([2.0, -2.0, np.nan])), [0, 1, -1])


def test_format_ci_says_when_there_is_no_interval_instead_of_printing_nan():
    assert metrics.format_ci(0.1, 0.25) == "95% CI +0.10 to +0.25"
    assert metrics.format_ci(-0.1234, 0.5, "+.3f") == "95% CI -0.123 to +0.500"
    assert metrics.format_ci(float("nan"), float("nan")) == "no CI (fewer than 2 pairs)"
    _, lo, hi = metrics.mean_ci(np.array([[0.4], [np.nan], [np.nan]]))  # one defined pair: what `run` prints
    assert metrics.format_ci(float(lo[0]), float(hi[0])) == "no CI (fewer than 2 pairs)"


def test_patching_summary_of_one_defined_pair_prints_no_nan():
    import xarray as xr

    from nnethics.analyses.patching.results import finalize, summarize

    effect = np.full((3, 4, 1), np.nan, np.float32)
    effect[0, :, 0] = [0.0, 0.2, 0.6, 1.0]
    ds = xr.Dataset({
        "effect": (("prompt", "layer", "component"), effect),
        "effect_defined": (("prompt",), np.array([True, False, False])),
        "flipped": (("prompt", "layer", "component"), np.zeros((3, 4, 1), bool)),
        "patched_logit_diff": (("prompt", "layer", "component"), np.zeros((3, 4, 1), np.float32)),
        "base_logit_diff": (("prompt",), np.zeros(3, np.float32)),
        "cf_logit_diff": (("prompt",), np.ones(3, np.float32)),
    }, coords={"prompt": ["a", "b", "c"], "layer": np.arange(4), "component": ["resid"]})
    text = summarize(finalize(ds, n_resamples=50))
    assert "arrives at layer 2" in text and "no CI (fewer than 2 pairs)" in text and "nan" not in text

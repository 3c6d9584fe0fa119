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


def test_bootstrap_ci_contains_mean_and_is_deterministic():
    rng = np.random.default_rng(1)
    x = rng.normal(0.3, 1.0, size=(60, 4))
    x[5, 2] = np.nan
    m1, lo1, hi1 = metrics.bootstrap_ci(x, axis=0, n_boot=500, seed=7)
    m2, lo2, hi2 = metrics.bootstrap_ci(x, axis=0, n_boot=500, seed=7)
    np.testing.assert_array_equal(lo1, lo2)
    np.testing.assert_array_equal(hi1, hi2)
    np.testing.assert_allclose(m1, np.nanmean(x, axis=0))
    assert np.all(lo1 < m1) and np.all(m1 < hi1)
    # a different seed gives different (but close) bounds
    _, lo3, _ = metrics.bootstrap_ci(x, axis=0, n_boot=500, seed=8)
    assert not np.array_equal(lo1, lo3)
    # the width is close to the normal-theory one: 2 * 1.96 * sd / sqrt(n)
    width = hi1 - lo1
    expect = 2 * 1.96 * np.nanstd(x, axis=0) / np.sqrt(60)
    np.testing.assert_allclose(width, expect, rtol=0.25)


def test_bootstrap_ci_constant_and_empty():
    m, lo, hi = metrics.bootstrap_ci(np.full((10, 2), 2.5), n_boot=100)
    np.testing.assert_allclose([m, lo, hi], 2.5)
    m, lo, hi = metrics.bootstrap_ci(np.full((10, 1), np.nan), n_boot=100)
    assert np.isnan(m).all() and np.isnan(lo).all() and np.isnan(hi).all()


def test_pearson():
    x = np.arange(10.0)
    assert metrics.pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert metrics.pearson(x, -x) == pytest.approx(-1.0)
    assert np.isnan(metrics.pearson(x, np.ones(10)))
    y = x.copy()
    y[3] = np.nan
    assert metrics.pearson(x, y) == pytest.approx(1.0)


def test_logit_diff_and_choice():
    np.testing.assert_allclose(metrics.logit_diff(np.array([[3.0, 1.0], [0.0, 2.0]])), [2.0, -2.0])
    np.testing.assert_array_equal(metrics.choice(np.array([2.0, -2.0, np.nan])), [0, 1, -1])

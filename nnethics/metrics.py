"""Logit differences and summary statistics of per-layer effects (NumPy only, no torch).

Conventions used across nnethics:

* ``LD = logit(label 1) - logit(label 2)`` at the decision position; the model "chooses" label 1
  when ``LD > 0``.
* A per-layer profile ``x`` (e.g. ``|patched LD - base LD|`` per layer) is summarised by
  :func:`peak_layer`, :func:`gini`, :func:`top_k_concentration`; these are scale-invariant, so
  they are the same on raw LD changes and on normalised effects.
* Every function reduces along ``axis`` and keeps the other axes, and treats NaN as missing.
"""

from __future__ import annotations

import numpy as np

DEFAULT_MIN_GAP = 0.1


def logit_diff(label_logits: np.ndarray) -> np.ndarray:
    """``[..., 2]`` label logits -> ``[...]`` logit(label 1) - logit(label 2)."""
    a = np.asarray(label_logits, dtype=np.float64)
    return a[..., 0] - a[..., 1]


def choice(ld: np.ndarray) -> np.ndarray:
    """Index of the chosen label (0 for label 1 when ``LD > 0``, else 1); NaN stays -1."""
    ld = np.asarray(ld, dtype=np.float64)
    return np.where(np.isnan(ld), -1, np.where(ld > 0, 0, 1))


def gap_defined(gap: np.ndarray, min_gap: float = DEFAULT_MIN_GAP) -> np.ndarray:
    """Whether a gap between two logit differences is large enough to normalise by: ``|gap| >= min_gap``.

    The one test behind patching's ``effect_defined`` and the decisions' ``content_sensitive``.
    """
    return np.abs(np.asarray(gap, dtype=np.float64)) >= min_gap


def normalized_effect(patched: np.ndarray, base: np.ndarray, source: np.ndarray,
                      min_gap: float = DEFAULT_MIN_GAP) -> tuple[np.ndarray, np.ndarray]:
    """``(patched - base) / (source - base)``, broadcasting ``base``/``source`` over trailing axes.

    0 means the patch changed nothing; 1 means it moved the LD all the way to the source run's.
    Returns ``(effect, defined)``: ``effect`` is NaN and ``defined`` False where
    ``|source - base| < min_gap`` (the two runs decide too similarly to normalise by).
    """
    patched = np.asarray(patched, dtype=np.float64)
    gap = np.asarray(source, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    defined = gap_defined(gap, min_gap)
    extra = patched.ndim - gap.ndim
    g = gap.reshape(gap.shape + (1,) * extra)
    b = np.asarray(base, dtype=np.float64).reshape(g.shape)
    d = defined.reshape(g.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        eff = np.where(d, (patched - b) / np.where(d, g, 1.0), np.nan)
    return eff, defined


def flips(patched: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Whether the patched run chooses a different label than ``base`` (broadcast over trailing axes)."""
    patched = np.asarray(patched, dtype=np.float64)
    base = np.asarray(base, dtype=np.float64)
    b = base.reshape(base.shape + (1,) * (patched.ndim - base.ndim))
    return (choice(patched) != choice(b)) & ~np.isnan(patched) & ~np.isnan(b)


def peak_layer(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Index of the largest ``|x|`` along ``axis`` (first one on ties); -1 where all values are NaN."""
    a = np.abs(np.asarray(x, dtype=np.float64))
    allnan = np.all(np.isnan(a), axis=axis)
    idx = np.argmax(np.where(np.isnan(a), -np.inf, a), axis=axis)
    return np.where(allnan, -1, idx)


def count_flips(flipped: np.ndarray, axis: int = -1) -> np.ndarray:
    """Number of True entries along ``axis``."""
    return np.asarray(flipped, dtype=bool).sum(axis=axis)


def gini(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Gini coefficient of ``|x|`` along ``axis``: ``sum_ij |x_i - x_j| / (2 n^2 mean|x|)``.

    0 when the mass is spread evenly; ``(n - 1) / n`` when it is all in one entry (its maximum for
    n entries). NaN where every entry is 0 or NaN. NaN entries are dropped.
    """
    a = np.moveaxis(np.abs(np.asarray(x, dtype=np.float64)), axis, -1)
    out = np.full(a.shape[:-1], np.nan)
    for idx in np.ndindex(*a.shape[:-1]):
        v = a[idx]
        v = np.sort(v[~np.isnan(v)])
        n, total = v.size, v.sum()
        if n == 0 or total == 0:
            continue
        # sorted form of the mean absolute difference: sum_i (2i - n - 1) v_i / (n * sum v)
        ranks = np.arange(1, n + 1)
        out[idx] = float(((2 * ranks - n - 1) * v).sum() / (n * total))
    return out


def top_k_concentration(x: np.ndarray, k: int = 5, axis: int = -1) -> np.ndarray:
    """Share of ``sum |x|`` held by the ``k`` largest entries along ``axis`` (1 when n <= k).

    NaN where every entry is 0 or NaN; NaN entries count as 0.
    """
    a = np.moveaxis(np.abs(np.asarray(x, dtype=np.float64)), axis, -1)
    a = np.where(np.isnan(a), 0.0, a)
    total = a.sum(-1)
    top = -np.sort(-a, axis=-1)[..., :k].sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, top / np.where(total > 0, total, 1.0), np.nan)


def bootstrap_ci(x: np.ndarray, axis: int = 0, n_boot: int = 2000, ci: float = 0.95,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean along ``axis`` with a percentile bootstrap confidence interval (resampling that axis).

    Deterministic for a given ``seed``. NaN entries are ignored (each resample takes the mean of its
    non-NaN values); cells with no data give NaN. Returns ``(mean, low, high)`` with ``axis`` removed.
    """
    a = np.moveaxis(np.asarray(x, dtype=np.float64), axis, 0)
    n = a.shape[0]
    with np.errstate(invalid="ignore"), _quiet():
        mean = np.nanmean(a, axis=0) if n else np.full(a.shape[1:], np.nan)
    if n == 0:
        return mean, mean.copy(), mean.copy()
    rng = np.random.default_rng(seed)
    flat = a.reshape(n, -1)
    ok = ~np.isnan(flat)
    vals = np.where(ok, flat, 0.0)
    idx = rng.integers(0, n, size=(n_boot, n))
    # per resample: sum and count of the non-NaN values, via a count matrix (n_boot x n) @ (n x cells)
    counts = np.zeros((n_boot, n))
    np.add.at(counts, (np.repeat(np.arange(n_boot), n), idx.ravel()), 1.0)
    sums = counts @ vals
    nums = counts @ ok.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        boots = np.where(nums > 0, sums / np.where(nums > 0, nums, 1.0), np.nan)
    alpha = (1.0 - ci) / 2.0
    with _quiet():
        low = np.nanquantile(boots, alpha, axis=0)
        high = np.nanquantile(boots, 1.0 - alpha, axis=0)
    shape = a.shape[1:]
    return mean, low.reshape(shape), high.reshape(shape)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation over the entries where both are finite (NaN if fewer than 2 or constant)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2:
        return float("nan")
    x, y = x[ok] - x[ok].mean(), y[ok] - y[ok].mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else float("nan")


class _quiet:
    """Silence NumPy's all-NaN-slice RuntimeWarnings (an all-NaN cell is an expected outcome)."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)

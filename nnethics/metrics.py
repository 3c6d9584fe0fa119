"""Logit differences and summary statistics of per-layer effects (NumPy and SciPy, no torch).

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


CI_LEVEL = 0.95
N_RESAMPLES = 9999  # scipy's default; enough that the seeded interval barely moves with the seed
#: The one method for means and the one for shares; figures and attrs name them with these strings.
MEAN_CI_METHOD = "BCa bootstrap"
SHARE_CI_METHOD = "Wilson score"


def ci_label(over: str = "prompts", n: int | None = None) -> str:
    """The caption every mean's CI carries, e.g. ``95% CI, BCa bootstrap over prompts, n=12``."""
    return f"95% CI, {MEAN_CI_METHOD} over {over}" + ("" if n is None else f", n={n}")


def format_ci(low: float, high: float, fmt: str = "+.2f") -> str:
    """``95% CI +a to +b`` for a line of text; a NaN interval (:func:`mean_ci` gives one for fewer than 2 values)
    reads ``no CI (fewer than 2 pairs)`` rather than ``+nan to +nan``."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return "no CI (fewer than 2 pairs)"
    return f"95% CI {low:{fmt}} to {high:{fmt}}"


def ci_attrs(seed: int = 0, n_resamples: int = N_RESAMPLES) -> dict:
    """What a stored mean CI records about how it was computed (its degenerate cases included)."""
    return {"ci_method": f"{MEAN_CI_METHOD} (scipy.stats.bootstrap, method='BCa')", "ci_level": CI_LEVEL,
            "n_resamples": int(n_resamples), "seed": int(seed),
            "ci_degenerate": "NaN where fewer than 2 values; zero width where all values are equal; "
                             "percentile bootstrap where BCa is undefined"}


def mean_ci(x: np.ndarray, axis: int = 0, seed: int = 0, n_resamples: int = N_RESAMPLES,
            confidence: float = CI_LEVEL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean along ``axis`` (NaN ignored) with a BCa bootstrap CI, ``scipy.stats.bootstrap`` resampling that axis.

    BCa rather than the percentile bootstrap: it corrects the percentile interval for bias and skew
    (second-order accurate), which matters for the few, skewed per-prompt effects a run has, and it is the
    method the verdict already used. Each cell is its own call on its finite values, so each interval is
    exactly ``scipy.stats.bootstrap((v,), np.mean, method="BCa", rng=np.random.default_rng(seed))`` on that
    cell's values ``v`` (a vectorised call over cells differs in the last bits; per cell costs ~2 ms at n = 3).
    Degenerate cells never raise: NaN CI with fewer than 2 values (nothing to resample), a zero-width CI
    when all values are equal (BCa's jackknife is 0/0 there), and the percentile interval where BCa is
    still undefined. Returns ``(mean, low, high)`` with ``axis`` removed.
    """
    a = np.moveaxis(np.asarray(x, dtype=np.float64), axis, 0)
    n, shape = a.shape[0], a.shape[1:]
    flat = a.reshape(n, int(np.prod(shape)))
    with np.errstate(invalid="ignore"), _quiet():
        mean = np.nanmean(flat, axis=0) if n else np.full(flat.shape[1], np.nan)
    low, high = np.full(flat.shape[1], np.nan), np.full(flat.shape[1], np.nan)
    for j in range(flat.shape[1]):
        v = flat[np.isfinite(flat[:, j]), j]
        if v.size >= 2:
            low[j], high[j] = (mean[j], mean[j]) if np.all(v == v[0]) else _bca(v, seed, n_resamples, confidence)
    return mean.reshape(shape), low.reshape(shape), high.reshape(shape)


def _bca(v: np.ndarray, seed: int, n_resamples: int, confidence: float) -> tuple[float, float]:
    """BCa bounds of the mean of ``v`` (>= 2 values, not all equal), percentile where BCa is undefined."""
    import warnings

    from scipy import stats

    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns on near-degenerate BCa; a NaN bound is handled here
            ci = stats.bootstrap((v,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                                 method=method, rng=np.random.default_rng(seed)).confidence_interval
        if np.isfinite(ci.low) and np.isfinite(ci.high):
            break
    return float(ci.low), float(ci.high)


def proportion_ci(k: np.ndarray, n: np.ndarray, confidence: float = CI_LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval for ``k`` of ``n`` (``scipy.stats.binomtest(k, n).proportion_ci``), elementwise.

    Not the bootstrap: a bootstrap of a share collapses to a zero-width interval at 0% and 100% (every
    resample is the same), exactly the case of a model that answers one label on every prompt. NaN where n = 0.
    """
    from scipy import stats

    k, n = np.broadcast_arrays(np.asarray(k, dtype=np.int64), np.asarray(n, dtype=np.int64))
    lo, hi = np.full(k.shape, np.nan), np.full(k.shape, np.nan)
    for i in np.ndindex(k.shape):
        if n[i] > 0:
            ci = stats.binomtest(int(k[i]), int(n[i])).proportion_ci(confidence_level=confidence, method="wilson")
            lo[i], hi[i] = ci.low, ci.high
    return lo, hi


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation (``scipy.stats.pearsonr``) over the entries where both are finite.

    NaN, not an error, with fewer than 2 such entries or a constant input (the correlation is undefined;
    scipy raises or warns there).
    """
    import warnings

    from scipy import stats

    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # near-constant input: scipy warns, the value is still right
        return float(stats.pearsonr(x, y).statistic)


class _quiet:
    """Silence NumPy's all-NaN-slice RuntimeWarnings (an all-NaN cell is an expected outcome)."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)

"""The steering directions of one layer, from training pairs only (issue 27, work in progress): numpy, no torch.

For pair ``i`` and side ``s`` (base, counterfactual): ``h[i, s]``, the residual stream after the layer at the
decision position; ``ethical[i, s]``, the index (0: label 1, 1: label 2) of the ethical option's label on that side;
``chosen[i, s]``, the index of the label the model chose. Every direction points toward label 1:

* ``content``: the mean over training pairs of ``sign_i * (h[i, cf] - h[i, base])``, ``sign_i = +1`` where the
  counterfactual's ethical option is label 1, ``-1`` where it is label 2; a pair whose counterfactual keeps the
  ethical label carries no sign and is left out;
* ``caa`` (contrastive activation addition, Rimsky et al. 2024): the mean state where the ethical option is label
  1 minus the mean state where it is label 2, over both sides;
* ``position``: the mean state where the model chose label 1 minus where it chose label 2 (content-free: a push
  toward a label);
* ``random``: seeded Gaussian directions, the null.

Each comes with unit norm beside its raw norm; the analysis adds ``alpha * scale * unit``, ``scale`` being the mean
norm of the layer's training states (alpha in units of the mean residual norm there). Folds are by pair
(:func:`folds`): the directions a pair is steered with never saw it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

KINDS = ("content", "caa", "position")


class FoldError(ValueError):
    """A fold would train its directions on fewer than 2 pairs."""


def folds(prompt_ids: Sequence[str], k: int) -> np.ndarray:
    """The fold (0..k-1) of each pair: pairs ordered by the sha256 of their id and dealt round-robin, so the folds
    do not depend on the order of the prompt file and differ in size by at most one."""
    n = len(prompt_ids)
    if k < 2:
        raise FoldError(f"k = {k}: at least 2 folds are needed to hold pairs out")
    if n - (-(-n // k)) < 2:  # the largest fold leaves fewer than 2 pairs to train on
        raise FoldError(f"{n} pairs in {k} folds leave fewer than 2 training pairs per fold; use more pairs or "
                        "fewer folds")
    order = sorted(range(n), key=lambda i: hashlib.sha256(str(prompt_ids[i]).encode()).hexdigest())
    out = np.empty(n, dtype=np.int64)
    for rank, i in enumerate(order):
        out[i] = rank % k
    return out


def _unit(v: np.ndarray) -> tuple[np.ndarray, float]:
    norm = float(np.linalg.norm(v))
    return (v / norm if norm > 0 else np.zeros_like(v)), norm


def directions(h: np.ndarray, ethical: np.ndarray, chosen: np.ndarray, train: np.ndarray
               ) -> dict[str, tuple[np.ndarray, float]]:
    """``{kind: (unit direction [d], raw norm)}`` from the training pairs ``train`` (a boolean mask over pairs) of
    ``h [pair, side, d]`` (side 0: base, 1: counterfactual), ``ethical`` and ``chosen [pair, side]`` (label index).
    A kind without both of its groups among the training pairs gets a zero direction and norm 0."""
    h = np.asarray(h, dtype=np.float64)[train]
    ethical, chosen = np.asarray(ethical)[train], np.asarray(chosen)[train]
    swaps = ethical[:, 0] != ethical[:, 1]
    sign = np.where(ethical[:, 1] == 0, 1.0, -1.0)[swaps]
    content = (sign[:, None] * (h[swaps, 1] - h[swaps, 0])).mean(0) if swaps.any() else np.zeros(h.shape[-1])
    states = h.reshape(-1, h.shape[-1])

    def contrast(labels: np.ndarray) -> np.ndarray:
        labels = labels.reshape(-1)
        if not (labels == 0).any() or not (labels == 1).any():
            return np.zeros(h.shape[-1])
        return states[labels == 0].mean(0) - states[labels == 1].mean(0)

    return {"content": _unit(content), "caa": _unit(contrast(ethical)), "position": _unit(contrast(chosen))}


def random_directions(d: int, seeds: Sequence[int]) -> np.ndarray:
    """``[len(seeds), d]`` unit Gaussian directions, one per seed (numpy's PCG64), the null."""
    out = np.stack([np.random.default_rng(s).standard_normal(d) for s in seeds])
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def scale(h: np.ndarray, train: np.ndarray) -> float:
    """The mean norm of the training states of the layer (both sides): one unit of alpha."""
    return float(np.linalg.norm(np.asarray(h, dtype=np.float64)[train], axis=-1).mean())

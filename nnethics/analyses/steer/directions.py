"""The steering directions of one layer, from training pairs only: numpy, no torch.

For pair ``i`` and side ``s`` (base, counterfactual): ``h[i, s]``, the residual stream after the layer at the
decision position; ``answers[i, s, a]``, the same after the prompt followed by label ``a``'s token (at that token);
``ethical[i, s]``, the index (0: label 1, 1: label 2) of the ethical option's label on that side.

* ``content``: the mean over training pairs of ``sign_i * (h[i, cf] - h[i, base])``, ``sign_i = +1`` where the
  counterfactual's ethical option is label 1, ``-1`` where it is label 2 (it points toward "the ethical option is
  label 1"); a pair whose counterfactual keeps the ethical label carries no sign and is left out;
* ``caa`` (contrastive activation addition, Rimsky et al. 2024, at the answer letter's position as there): the mean
  over training prompts (both sides) of ``answers[i, s, ethical] - answers[i, s, other]``: the state after the
  ethical answer minus after the other one. It points toward "answered ethically", whichever label that is, so it
  is applied unsigned (:data:`SIGNED`). The state where the ethical option is label 1 minus where it is label 2 at
  the decision position is not a second direction here: over pairs that swap the ethical label it equals
  ``content`` exactly (each pair puts one state in each group);
* ``position``: the mean over training prompts of ``answers[i, s, 0] - answers[i, s, 1]``: the state after answering
  label 1 minus after answering label 2, whichever is ethical (content-free: a push toward label 1; the same
  numbers as ``caa``, grouped by label instead of by ethics, and defined where the model chose one label on every
  prompt, as the built-in model does);
* ``random``: seeded Gaussian directions, the null.

Each comes with unit norm beside its raw norm; the analysis adds ``alpha * scale * sign * unit``, ``scale`` being
the mean norm of the layer's training states (alpha in units of the mean residual norm there) and ``sign`` the
side's ethical label (+1: label 1) for the kinds that point toward label 1. Folds are by pair (:func:`folds`): the
directions a pair is steered with never saw it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

KINDS = ("content", "caa", "position")
#: Whether a kind points toward label 1 (applied times the side's ethical sign) or toward the ethical answer (caa).
SIGNED = {"content": True, "caa": False, "position": True}


class FoldError(ValueError):
    """A fold would train its directions on fewer than 2 pairs."""


def folds(prompt_ids: Sequence[str], k: int) -> np.ndarray:
    """The fold (0..k-1) of each pair: pairs ordered by the sha256 of their id and dealt round-robin, so the folds
    do not depend on the order of the prompt file and differ in size by at most one. More folds than pairs: one
    pair per fold (leave-one-out), ``n`` folds."""
    n = len(prompt_ids)
    if k < 2:
        raise FoldError(f"k = {k}: at least 2 folds are needed to hold pairs out")
    asked, k = k, (min(k, n) if n else k)
    if n - (-(-n // k)) < 2:  # the largest fold leaves fewer than 2 pairs to train on
        if k < asked:  # one pair per fold already
            raise FoldError(f"{n} pairs: even one pair per fold leaves fewer than 2 training pairs; steering needs "
                            "at least 3 pairs")
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


def directions(h: np.ndarray, ethical: np.ndarray, train: np.ndarray, answers: np.ndarray
               ) -> dict[str, tuple[np.ndarray, float]]:
    """``{kind: (unit direction [d], raw norm)}`` from the training pairs ``train`` (a boolean mask over pairs) of
    ``h [pair, side, d]`` (side 0: base, 1: counterfactual), ``answers [pair, side, 2, d]`` and ``ethical [pair,
    side]`` (label index). ``content`` without a training pair that swaps the ethical label is a zero direction
    with norm 0."""
    h = np.asarray(h, dtype=np.float64)[train]
    answers = np.asarray(answers, dtype=np.float64)[train]
    ethical = np.asarray(ethical)[train]
    d = h.shape[-1]
    swaps = ethical[:, 0] != ethical[:, 1]
    sign = np.where(ethical[:, 1] == 0, 1.0, -1.0)[swaps]
    content = (sign[:, None] * (h[swaps, 1] - h[swaps, 0])).mean(0) if swaps.any() else np.zeros(d)
    good = np.take_along_axis(answers, ethical[:, :, None, None], axis=2)[:, :, 0]
    bad = np.take_along_axis(answers, 1 - ethical[:, :, None, None], axis=2)[:, :, 0]
    caa = (good - bad).reshape(-1, d).mean(0)
    position = (answers[:, :, 0] - answers[:, :, 1]).reshape(-1, d).mean(0)
    return {"content": _unit(content), "caa": _unit(caa), "position": _unit(position)}


def random_directions(d: int, seeds: Sequence[int]) -> np.ndarray:
    """``[len(seeds), d]`` unit Gaussian directions, one per seed (numpy's PCG64), the null."""
    out = np.stack([np.random.default_rng(s).standard_normal(d) for s in seeds])
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def scale(h: np.ndarray, train: np.ndarray) -> float:
    """The mean norm of the training states of the layer (both sides): one unit of alpha."""
    return float(np.linalg.norm(np.asarray(h, dtype=np.float64)[train], axis=-1).mean())

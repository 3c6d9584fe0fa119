"""Steering directions (work in progress, issue 27) against hand-written truths."""

from __future__ import annotations

import numpy as np
import pytest

from nnethics.analyses.steer.directions import FoldError, directions, folds, random_directions, scale


def test_folds_are_balanced_order_free_and_refuse_too_few_training_pairs():
    ids = [f"p{i}" for i in range(10)]
    f = folds(ids, 3)
    assert sorted(np.bincount(f).tolist()) == [3, 3, 4]
    assert dict(zip(ids, f)) == dict(zip(ids[::-1], folds(ids[::-1], 3)))  # the file's order does not matter
    assert len(set(folds(ids, 5))) == 5
    folds(["a", "b", "c", "d"], 2)  # 2 training pairs per fold: enough
    with pytest.raises(FoldError, match="fewer than 2 training pairs"):
        folds(["a", "b", "c"], 2)  # the fold of 2 leaves 1
    with pytest.raises(FoldError, match="at least 2 folds"):
        folds(ids, 1)


def test_directions_by_hand():
    # 3 pairs, d = 2; pair 0: ethical is label 1 on base, label 2 on cf; pair 1 the reverse; pair 2 keeps label 1
    h = np.array([[[1.0, 0.0], [0.0, 2.0]],
                  [[3.0, 1.0], [1.0, 1.0]],
                  [[5.0, 5.0], [7.0, 5.0]]])
    ethical = np.array([[0, 1], [1, 0], [0, 0]])
    chosen = np.array([[0, 0], [0, 1], [1, 1]])
    train = np.array([True, True, True])
    got = directions(h, ethical, chosen, train)
    # content: pair 0: cf ethical is label 2 -> sign -1: -((0,2)-(1,0)) = (1,-2); pair 1: +1: (1,1)-(3,1) = (-2,0);
    # pair 2 left out (no swap); mean (-0.5, -1)
    content = np.array([-0.5, -1.0])
    np.testing.assert_allclose(got["content"][0], content / np.linalg.norm(content))
    assert got["content"][1] == pytest.approx(np.linalg.norm(content))
    # caa: ethical label 1 states: (1,0), (1,1), (5,5), (7,5) -> mean (3.5, 2.75); label 2: (0,2), (3,1) -> (1.5, 1.5)
    caa = np.array([2.0, 1.25])
    np.testing.assert_allclose(got["caa"][0], caa / np.linalg.norm(caa))
    # position: chose label 1: (1,0), (0,2), (3,1) -> (4/3, 1); label 2: (1,1), (5,5), (7,5) -> (13/3, 11/3)
    pos = np.array([4 / 3 - 13 / 3, 1 - 11 / 3])
    np.testing.assert_allclose(got["position"][0], pos / np.linalg.norm(pos))


def test_a_held_out_pair_never_enters_its_directions():
    rng = np.random.default_rng(0)
    h, ethical = rng.normal(size=(6, 2, 4)), np.array([[0, 1], [1, 0]] * 3)
    chosen = rng.integers(0, 2, size=(6, 2))
    train = np.array([True, True, True, True, True, False])
    before = directions(h, ethical, chosen, train)
    h[5] += 1e6  # the held-out pair's states change: its directions do not
    after = directions(h, ethical, chosen, train)
    for kind in before:
        np.testing.assert_array_equal(before[kind][0], after[kind][0])
    assert scale(h, train) == pytest.approx(np.linalg.norm(h[:5], axis=-1).mean())


def test_random_directions_are_unit_and_seeded():
    r = random_directions(8, [0, 1, 2])
    np.testing.assert_allclose(np.linalg.norm(r, axis=1), 1.0)
    np.testing.assert_array_equal(r, random_directions(8, [0, 1, 2]))
    assert not np.allclose(r[0], r[1])

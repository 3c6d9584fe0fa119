"""Steering directions and folds against hand-written truths."""

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
    np.testing.assert_array_equal(np.sort(folds(["a", "b", "c"], 5)), [0, 1, 2])  # more folds than pairs: one each
    with pytest.raises(FoldError, match="2 pairs: even one pair per fold leaves fewer than 2 training pairs"):
        folds(["a", "b"], 5)
    with pytest.raises(FoldError, match="at least 2 folds"):
        folds(ids, 1)


def test_directions_by_hand():
    # 3 pairs, d = 2; pair 0: ethical is label 1 on base, label 2 on cf; pair 1 the reverse; pair 2 keeps label 1
    h = np.array([[[1.0, 0.0], [0.0, 2.0]],
                  [[3.0, 1.0], [1.0, 1.0]],
                  [[5.0, 5.0], [7.0, 5.0]]])
    ethical = np.array([[0, 1], [1, 0], [0, 0]])
    # answers[i, s, a]: the state after answering label a (a = 0: label 1)
    answers = np.array([[[[1.0, 0.0], [0.0, 1.0]], [[2.0, 2.0], [0.0, 0.0]]],
                        [[[0.0, 0.0], [4.0, 0.0]], [[1.0, 3.0], [1.0, 1.0]]],
                        [[[2.0, 0.0], [2.0, 2.0]], [[0.0, 1.0], [0.0, 0.0]]]])
    train = np.array([True, True, True])
    got = directions(h, ethical, train, answers)
    # content: pair 0: cf ethical is label 2 -> sign -1: -((0,2)-(1,0)) = (1,-2); pair 1: +1: (1,1)-(3,1) = (-2,0);
    # pair 2 left out (no swap); mean (-0.5, -1)
    content = np.array([-0.5, -1.0])
    np.testing.assert_allclose(got["content"][0], content / np.linalg.norm(content))
    assert got["content"][1] == pytest.approx(np.linalg.norm(content))
    # caa: ethical answer minus the other, per prompt: p0 base (eth 0): (1,0)-(0,1) = (1,-1); p0 cf (eth 1):
    # (0,0)-(2,2) = (-2,-2); p1 base (eth 1): (4,0)-(0,0) = (4,0); p1 cf (eth 0): (1,3)-(1,1) = (0,2);
    # p2 base (eth 0): (2,0)-(2,2) = (0,-2); p2 cf (eth 0): (0,1)-(0,0) = (0,1); mean (3/6, -2/6)
    caa = np.array([0.5, -1 / 3])
    np.testing.assert_allclose(got["caa"][0], caa / np.linalg.norm(caa))
    assert got["caa"][1] == pytest.approx(np.linalg.norm(caa))
    # position: answer 1 minus answer 2 per prompt: (1,-1), (2,2), (-4,0), (0,2), (0,-2), (0,1) -> mean (-1/6, 2/6)
    pos = np.array([-1 / 6, 2 / 6])
    np.testing.assert_allclose(got["position"][0], pos / np.linalg.norm(pos))
    # without a training pair that swaps, content is the zero direction with norm 0
    none = directions(h, ethical, np.array([False, False, True]), answers)
    assert none["content"][1] == 0 and not none["content"][0].any()


def test_the_decision_position_contrast_equals_content_on_swapped_pairs():
    """Why caa is taken at the answer token: the mean decision-position state where the ethical option is label 1
    minus where it is label 2 is content itself over pairs that swap the ethical label (an identity)."""
    rng = np.random.default_rng(1)
    h = rng.normal(size=(8, 2, 5))
    ethical = np.array([[0, 1], [1, 0]] * 4)
    got = directions(h, ethical, np.ones(8, bool), rng.normal(size=(8, 2, 2, 5)))
    states, labels = h.reshape(-1, 5), ethical.reshape(-1)
    contrast = states[labels == 0].mean(0) - states[labels == 1].mean(0)
    np.testing.assert_allclose(got["content"][0] * got["content"][1], contrast, atol=1e-12)


def test_a_held_out_pair_never_enters_its_directions():
    rng = np.random.default_rng(0)
    h, ethical = rng.normal(size=(6, 2, 4)), np.array([[0, 1], [1, 0]] * 3)
    answers = rng.normal(size=(6, 2, 2, 4))
    train = np.array([True, True, True, True, True, False])
    before = directions(h, ethical, train, answers)
    h[5] += 1e6  # the held-out pair's states change: its directions do not
    answers[5] -= 1e6
    after = directions(h, ethical, train, answers)
    for kind in before:
        np.testing.assert_array_equal(before[kind][0], after[kind][0])
    assert scale(h, train) == pytest.approx(np.linalg.norm(h[:5], axis=-1).mean())


def test_random_directions_are_unit_and_seeded():
    r = random_directions(8, [0, 1, 2])
    np.testing.assert_allclose(np.linalg.norm(r, axis=1), 1.0)
    np.testing.assert_array_equal(r, random_directions(8, [0, 1, 2]))
    assert not np.allclose(r[0], r[1])

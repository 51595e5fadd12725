"""The bootstrap intervals and verdicts (prunerep/results/bootstrap.py) against cases worked out by hand."""
from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest

from prunerep.results import bootstrap as bs


def test_percentile_interval_of_a_mean_matches_the_enumerated_resamples():
    # values 0, 0, 1: the 27 equally likely resamples give the mean k/3 with k ~ Binomial(3, 1/3):
    # P(0) = 8/27, P(1/3) = 12/27, P(2/3) = 6/27, P(1) = 1/27
    x = [0.0, 0.0, 1.0]
    exact = Counter(round(sum(x[i] for i in idx) / 3, 6) for idx in itertools.product(range(3), repeat=3))
    assert exact == {0.0: 8, round(1 / 3, 6): 12, round(2 / 3, 6): 6, 1.0: 1}
    draws = bs.mean(x)(bs.resample_weights(3, 20000, seed=1))
    freq = Counter(np.round(draws, 6))
    for v, k in exact.items():
        assert abs(freq[v] / 20000 - k / 27) < 0.01
    # cumulative: 8/27 = 0.30, 20/27 = 0.74, 26/27 = 0.963, 1
    iv = bs.bootstrap(bs.mean(x), 3, n_resamples=20000, seed=1, level=0.95)  # 2.5% -> 0, 97.5% -> 1
    assert (iv.value, iv.lo, iv.hi, iv.n, iv.n_resamples) == (pytest.approx(1 / 3), 0.0, 1.0, 3, 20000)
    iv = bs.bootstrap(bs.mean(x), 3, n_resamples=20000, seed=1, level=0.90)  # 95% -> 2/3
    assert (iv.lo, iv.hi) == (0.0, pytest.approx(2 / 3))


def test_seeded():
    a = bs.bootstrap(bs.mean([1.0, 2.0, 5.0, 7.0]), 4, seed=3)
    b = bs.bootstrap(bs.mean([1.0, 2.0, 5.0, 7.0]), 4, seed=3)
    assert a == b
    assert (bs.resample_weights(4, 50, seed=3) == bs.resample_weights(4, 50, seed=3)).all()
    assert not (bs.resample_weights(4, 50, seed=3) == bs.resample_weights(4, 50, seed=4)).all()


def test_groups_are_resampled_whole():
    # two sources of two items each: a resample draws sources, so its mean is 0, 1/2 or 1 (never 1/4)
    x, groups = [0.0, 0.0, 1.0, 1.0], ["a", "a", "b", "b"]
    w = bs.resample_weights(4, 4000, seed=0, groups=groups)
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 2] == w[:, 3]).all() and (w.sum(axis=1) == 4).all()
    assert set(np.round(bs.mean(x)(w), 6)) == {0.0, 0.5, 1.0}
    iv = bs.bootstrap(bs.mean(x), 4, groups=groups)
    assert (iv.lo, iv.hi, iv.n) == (0.0, 1.0, 2)  # P(0) = P(1) = 1/4
    # the items as independent units: means in quarters, a narrower interval
    iv = bs.bootstrap(bs.mean(x), 4)
    assert iv.n == 4 and 0.0 <= iv.lo and iv.hi <= 1.0 and set(np.round(bs.mean(x)(bs.resample_weights(4, 500)) * 4)) \
        <= {0.0, 1.0, 2.0, 3.0, 4.0}


def test_auroc_by_hand_with_ties_and_weights():
    scores, labels = [0.9, 0.4, 0.4, 0.1], [True, True, False, False]
    stat = bs.auroc(scores, labels)
    # pairs (pos, neg): 0.9>0.4, 0.9>0.1, 0.4=0.4 (1/2), 0.4>0.1 -> 3.5 / 4
    assert stat(np.ones((1, 4)))[0] == pytest.approx(0.875)
    # weights 2, 1, 1, 0: 2*1*1 + 1*1*0.5 over (2+1)*(1+0)
    assert stat(np.array([[2.0, 1.0, 1.0, 0.0]]))[0] == pytest.approx(2.5 / 3)
    assert math.isnan(stat(np.array([[0.0, 0.0, 1.0, 1.0]]))[0])  # no positive unit drawn
    iv = bs.bootstrap(stat, 4)
    assert iv.value == pytest.approx(0.875) and 0 <= iv.lo <= iv.value <= iv.hi <= 1


def test_ratio_and_difference():
    a, b = [1.0, 3.0], [2.0, 2.0]
    assert bs.ratio_of_means(a, b)(np.array([[1.0, 1.0], [2.0, 0.0]])) == pytest.approx([1.0, 0.5])
    assert bs.mean_difference(a, b)(np.array([[1.0, 1.0], [0.0, 1.0]])) == pytest.approx([0.0, 1.0])


@pytest.mark.parametrize("lo, hi, above, below, expected", [
    (0.1, 0.3, 0.0, None, "holds"),
    (-0.3, -0.1, 0.0, None, "fails"),
    (-0.1, 0.3, 0.0, None, "inconclusive at n = 7"),
    (0.6, 1.8, 0.5, 2.0, "holds"),         # inside a band
    (2.5, 3.0, 0.5, 2.0, "fails"),         # wholly above it
    (0.2, 0.4, 0.5, 2.0, "fails"),         # wholly below it
    (0.4, 1.2, 0.5, 2.0, "inconclusive at n = 7"),
    (0.1, 0.2, None, 0.5, "holds"),
    (float("nan"), 0.2, 0.0, None, "not measured"),
])
def test_verdict(lo, hi, above, below, expected):
    value = 0.2 if lo != lo else (lo + hi) / 2
    assert bs.verdict(bs.Interval(value, lo, hi, 7), above=above, below=below) == expected


def test_verdict_needs_a_bound():
    with pytest.raises(ValueError):
        bs.verdict(bs.Interval(0.0, 0.0, 0.0, 1))


def test_strata_keep_their_size():
    # task A has 3 items, task B 2: each resample draws 3 of A and 2 of B
    w = bs.resample_weights(5, 1000, seed=0, strata=["A", "A", "A", "B", "B"])
    assert (w[:, :3].sum(axis=1) == 3).all() and (w[:, 3:].sum(axis=1) == 2).all()
    # a difference of the two strata's means: A = (0, 0, 0), B = (1, 1) -> always -1
    a = np.array([1.0, 1.0, 1.0, 0.0, 0.0])

    def stat(w):
        x = np.array([0.0, 0.0, 0.0, 1.0, 1.0])
        return (w * x * a).sum(1) / (w * a).sum(1) - (w * x * (1 - a)).sum(1) / (w * (1 - a)).sum(1)
    iv = bs.bootstrap(stat, 5, strata=["A", "A", "A", "B", "B"])
    assert (iv.value, iv.lo, iv.hi) == (-1.0, -1.0, -1.0)

"""Uncertainty of a run's numbers: a seeded percentile bootstrap over independent units, and the
verdict a claim gets from its interval. Pure functions: arrays in, numbers out.

A *unit* is what was drawn independently: a probe prompt, an evaluated item. Where units share a
source (items cut from one document, several rows of one prompt), pass ``groups``: the sources
are resampled and every unit of a drawn source comes with it, so the interval is not narrowed by
units that are not independent.

A statistic is written once for a weight matrix: ``statistic(w)`` with ``w`` of shape
``[k, n_units]`` (how often each unit is in each of k resamples) returns the k values. The point
estimate is the statistic at ``w = 1`` (every unit once), so one function gives both. :func:`mean`,
:func:`ratio_of_means` and :func:`auroc` build the usual ones.

The interval is the percentile interval: the ``(1 - level) / 2`` and ``(1 + level) / 2``
quantiles (numpy's ``inverted_cdf``: values the bootstrap distribution takes) of the statistic
over :data:`N_RESAMPLES` resamples drawn by ``numpy.random.default_rng(seed)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

#: resamples of every interval (stated with it: :attr:`Interval.n_resamples`)
N_RESAMPLES = 2000
#: the interval's coverage
LEVEL = 0.95
SEED = 0
#: the verdicts of :func:`verdict`; an inconclusive one reads ``inconclusive at n = <units>``
HOLDS, FAILS, INCONCLUSIVE, NOT_MEASURED = "holds", "fails", "inconclusive", "not measured"

Statistic = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Interval:
    """A statistic, its percentile interval, the number of independent units it rests on (sources
    where units share one) and how it was drawn."""

    value: float
    lo: float
    hi: float
    n: int
    n_resamples: int = N_RESAMPLES
    level: float = LEVEL
    seed: int = SEED

    def to_json(self) -> dict:
        return {"value": self.value, "lo": self.lo, "hi": self.hi, "n": self.n, "n_resamples": self.n_resamples,
                "level": self.level, "seed": self.seed}


def resample_weights(n_units: int, n_resamples: int = N_RESAMPLES, seed: int = SEED,
                     groups: Optional[Sequence] = None, strata: Optional[Sequence] = None) -> np.ndarray:
    """``[n_resamples, n_units]`` float counts: how often each unit is drawn in each resample. With
    ``groups`` (one label per unit) the distinct labels are drawn with replacement and each unit
    gets its group's count. With ``strata`` (one label per unit; say, the task) each stratum is
    resampled on its own and keeps its number of groups (a group lies in one stratum)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_units).astype(str) if groups is None else np.asarray(groups, dtype=object).astype(str)
    layers = np.zeros(n_units, dtype=int) if strata is None else \
        np.unique(np.asarray(strata, dtype=object).astype(str), return_inverse=True)[1]
    if len(labels) != n_units or len(layers) != n_units:
        raise ValueError(f"group / stratum labels do not match the {n_units} units")
    w = np.zeros((n_resamples, n_units))
    for layer in range(int(layers.max()) + 1 if n_units else 0):
        members = np.flatnonzero(layers == layer)
        _, codes = np.unique(labels[members], return_inverse=True)
        k = int(codes.max()) + 1
        counts = rng.multinomial(k, np.full(k, 1.0 / k), size=n_resamples)
        w[:, members] = counts[:, codes]
    return w


def n_independent(n_units: int, groups: Optional[Sequence] = None) -> int:
    """How many independent units: the distinct groups, else the units."""
    return len(set(map(str, groups))) if groups is not None else n_units


def bootstrap(statistic: Statistic, n_units: int, groups: Optional[Sequence] = None,
              n_resamples: int = N_RESAMPLES, seed: int = SEED, level: float = LEVEL,
              strata: Optional[Sequence] = None) -> Interval:
    """The statistic at every unit once, with its percentile interval over ``n_resamples``
    resamples of the units (of their groups, when given; within each stratum). A resample where the statistic is not
    finite (say, a ratio whose denominator was never drawn) is left out; NaN bounds when none is."""
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1)")
    n = n_independent(n_units, groups)
    if n_units == 0:
        return Interval(math.nan, math.nan, math.nan, 0, n_resamples, level, seed)
    value = float(np.asarray(statistic(np.ones((1, n_units))), dtype=np.float64).reshape(-1)[0])
    draws = np.asarray(statistic(resample_weights(n_units, n_resamples, seed, groups, strata)), dtype=np.float64)
    draws = draws[np.isfinite(draws)]
    if not len(draws):
        return Interval(value, math.nan, math.nan, n, n_resamples, level, seed)
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
    return Interval(value, float(lo), float(hi), n, n_resamples, level, seed)


def _weighted_sum(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return w @ np.asarray(x, dtype=np.float64)


def mean(x: Sequence[float]) -> Statistic:
    """The (weighted) mean of per-unit values ``x``."""
    x = np.asarray(x, dtype=np.float64)
    return lambda w: _weighted_sum(w, x) / w.sum(axis=1)


def mean_difference(a: Sequence[float], b: Sequence[float]) -> Statistic:
    """mean(a) - mean(b) of paired per-unit values (each unit has both)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return mean(d)


def ratio_of_means(a: Sequence[float], b: Sequence[float]) -> Statistic:
    """mean(a) / mean(b) of paired per-unit values."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return lambda w: _weighted_sum(w, a) / _weighted_sum(w, b)


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> Statistic:
    """The area under the ROC curve of ``scores`` for ``labels`` (True = positive): the chance that
    a positive unit scores above a negative one, ties counting one half (the Mann-Whitney U over
    n_pos x n_neg). Weighted: each pair counts the product of its units' weights. NaN in a
    resample without a positive or a negative unit."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    wins = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])

    def stat(w: np.ndarray) -> np.ndarray:
        wp, wn = w[:, pos], w[:, neg]
        den = wp.sum(axis=1) * wn.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.einsum("bi,ij,bj->b", wp, wins, wn) / den
    return stat


def verdict(iv: Interval, above: Optional[float] = None, below: Optional[float] = None) -> str:
    """Whether the claim "the statistic is above ``above`` (and below ``below``)" is borne out:
    ``holds`` when the whole interval is inside, ``fails`` when the whole interval is outside (all
    below ``above`` or all above ``below``), else ``inconclusive at n = <units>``: the interval allows
    both. ``not measured`` when the statistic or its bounds are not finite."""
    if above is None and below is None:
        raise ValueError("a claim needs a bound: above, below or both")
    if not all(math.isfinite(v) for v in (iv.value, iv.lo, iv.hi)):
        return NOT_MEASURED
    inside = (above is None or iv.lo > above) and (below is None or iv.hi < below)
    outside = (above is not None and iv.hi < above) or (below is not None and iv.lo > below)
    if inside:
        return HOLDS
    if outside:
        return FAILS
    return f"{INCONCLUSIVE} at n = {iv.n}"

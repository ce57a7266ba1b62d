"""Paired comparisons: a candidate against a reference on the same cases, and Holm's adjustment.

Binary metrics: Tango's score test and interval for the difference of paired proportions (exact
McNemar beside it as the classic "any change" p); graded metrics: bootstrap-t on the differences,
floored by the score bound when few differ. Every non-inferiority bound a `max_drop` gate tests
comes from here.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from evalkit.stats.intervals import (
    NAN,
    bootstrap_t,
    check_binary,
    check_level,
    one_sided_level,
    score_range,
    scores_array,
    t_bound,
    z_of,
)

# A continuity correction (in units of one case) on Tango's score statistic. Without one, the
# max_drop gate errs up to 1.4x its nominal rate at some (n, discordance, margin); Yates' 0.5 is
# conservative (the 1-lost-of-114 bound rises from 3.84 to 4.51 pts); 0.35 keeps it within its
# level over n = 20..1000, discordance 1-50%, margins 1-20 pts, levels 0.9-0.99, enumerated exactly
# (bench/bench_verdicts.py prints the grid).
CONTINUITY = 0.35
# Below this many nonzero paired differences a graded bound is floored by the score bound.
FEW_NONZERO = 10


# ------------------------------------------------------------ paired proportions (Tango 1998)


def tango_z(lost, gained, n, drop):
    """Tango's score statistic for H0: p(lost) - p(gained) = drop, on n pairs (numpy-broadcast).

    lost = reference right / candidate wrong, gained = the reverse. Closed form with the
    restricted maximum-likelihood estimate of p(gained) (Tango, Stat Med 1998; 17:891-908).
    Decreasing in `drop`. At drop = 0 it is McNemar's z, (|lost-gained| - CONTINUITY)/sqrt(lost+gained)
    with the continuity correction. Counts may be fractional (sums of graded losses and gains)."""
    lost, gained, drop = (np.asarray(a, dtype=float) for a in (lost, gained, drop))
    a = 2.0 * n
    b = -lost - gained + (2.0 * n - lost + gained) * drop
    c = -gained * drop * (1.0 - drop)
    p_gained = (-b + np.sqrt(np.maximum(b * b - 4 * a * c, 0.0))) / (2 * a)
    var = n * (2 * p_gained + drop * (1 - drop))
    num = lost - gained - n * drop
    num = np.sign(num) * np.maximum(np.abs(num) - CONTINUITY, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(var > 1e-300, num / np.sqrt(np.maximum(var, 1e-300)), 0.0)
        degenerate = np.where(np.abs(num) < 1e-12, 0.0, np.sign(num) * np.inf)
    return np.where(var > 1e-12 * max(n, 1), z, degenerate)


def _solve_drop(lost: float, gained: float, n: int, target_z: float, lo: float, hi: float) -> float:
    """The drop in [lo, hi] where the (decreasing) score statistic crosses target_z, by bisection."""
    f = lambda d: float(tango_z(lost, gained, n, d)) - target_z  # noqa: E731
    if f(hi) >= 0:
        return hi
    if f(lo) <= 0:
        return lo
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
    return (lo + hi) / 2


def tango_upper_drop(lost: float, gained: float, n: int, level: float) -> float:
    """One-sided upper bound on the drop p(lost) - p(gained) at `level`: the largest drop the
    score test at that level does not reject. NaN without pairs."""
    check_level(level)
    if n == 0:
        return NAN
    return _solve_drop(lost, gained, n, -z_of(level), (lost - gained) / n, 1.0)


def tango_lower_drop(lost: float, gained: float, n: int, level: float) -> float:
    check_level(level)
    if n == 0:
        return NAN
    return _solve_drop(lost, gained, n, z_of(level), -1.0, (lost - gained) / n)


def tango_p(lost: float, gained: float, n: int) -> float:
    """Two-sided score-test p-value of "no change" (consistent with the Tango interval)."""
    if n == 0 or lost + gained == 0:
        return 1.0
    z = abs(float(tango_z(lost, gained, n, 0.0)))
    return min(1.0, 2 * (1 - NormalDist().cdf(z)))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: P(|X - m/2| >= |b - m/2|) for X ~ Binomial(m = b + c, 1/2).

    b: reference right / candidate wrong, c: reference wrong / candidate right. Computed in
    exact integer arithmetic (no underflow, no scipy); b + c == 0 -> 1.0.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    m, k = b + c, min(b, c)
    if 2 * k == m:  # includes m == 0: no evidence either way
        return 1.0
    term, tail = 1, 1  # C(m, 0), running sum of C(m, i) for i <= k
    for i in range(1, k + 1):
        term = term * (m - i + 1) // i
        tail += term
    return min(1.0, 2 * tail / (1 << m))


# ------------------------------------------------------------------------ paired comparison


@dataclass(frozen=True)
class PairedComparison:
    """Candidate vs reference on the same cases. `delta` = mean(candidate) - mean(reference).

    Binary: b = n_ref_only (lost), c = n_cand_only (gained); Tango score interval and p.
    Graded: bootstrap-t interval and p, floored by the score bound on summed losses/gains when
    fewer than FEW_NONZERO differences are nonzero. `upper_drop(level)` is the one-sided
    non-inferiority bound every `max_drop` gate uses, at the gate's own level.
    """

    delta: float
    low: float  # two-sided interval on delta at `confidence`
    high: float
    p_value: float  # two-sided, from the same method as the interval
    test: str  # "tango" | "bootstrap-t"
    n: int  # pairs used
    n_ref_only: float | None = None  # binary: lost; graded: None
    n_cand_only: float | None = None
    confidence: float = 0.95
    n_invalid: int = 0  # pairs with an invalid side (counted as a loss or dropped: see invalid_as_loss)
    n_invalid_as_loss: int = 0  # of those, candidate-invalid pairs scored as the worst value
    p_exact: float | None = None  # binary: exact McNemar, the classic "any change" p
    n_nonzero: int = 0  # pairs whose scores differ
    # graded: (mean of d, its se, sorted t*, summed losses, summed gains, range of d) for bounds at any level
    _graded: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def method(self) -> str:
        if self._graded is None:
            return "Tango score"
        return "bootstrap-t" + (" + score floor" if self.n_nonzero < FEW_NONZERO else "")

    def upper_drop(self, level: float) -> float:
        """Upper one-sided bound on the drop (reference - candidate) at `level`; NaN without pairs."""
        return self._drop_bound(level, upper=True)

    def lower_drop(self, level: float) -> float:
        return self._drop_bound(level, upper=False)

    def _drop_bound(self, level: float, *, upper: bool) -> float:
        check_level(level)
        if self.n == 0:
            return NAN
        score_bound = tango_upper_drop if upper else tango_lower_drop
        if self._graded is None:
            assert self.n_ref_only is not None and self.n_cand_only is not None  # binary sets both
            return score_bound(self.n_ref_only, self.n_cand_only, self.n, level)
        mean, se, t, losses, gains, span = self._graded
        bound = -t_bound(mean, se, t, level, "lower" if upper else "upper", *span)  # drop = -mean difference
        if self.n_nonzero < FEW_NONZERO:  # the floor: never tighter than the score bound
            floor = score_bound(losses, gains, self.n, level)
            bound = max(bound, floor) if upper else min(bound, floor)
        return bound


def paired_compare(reference: Sequence[float | None], candidate: Sequence[float | None], *, binary: bool,
                   confidence: float = 0.95, invalid_as_loss: bool = False,
                   worst: float = 0.0) -> PairedComparison:
    """Candidate vs reference on the same cases (index i of both is the same case).

    Invalid scores (None/NaN): a pair whose reference is invalid is dropped. A candidate-invalid
    pair is scored with the candidate at `worst` when `invalid_as_loss` (an output the scorer
    could not read is a failure, not a missing value), else dropped. Both are counted.
    """
    check_level(confidence)
    ref, cand = scores_array(reference), scores_array(candidate)
    if len(ref) != len(cand):
        raise ValueError(f"paired scores differ in length: {len(ref)} reference, {len(cand)} candidate")
    ref_ok, cand_ok = ~np.isnan(ref), ~np.isnan(cand)
    as_loss = ref_ok & ~cand_ok if invalid_as_loss else np.zeros_like(ref_ok)
    n_invalid, n_as_loss = int(np.count_nonzero(~(ref_ok & cand_ok))), int(np.count_nonzero(as_loss))
    cand = np.where(as_loss, worst, cand)
    keep = ref_ok & (cand_ok | as_loss)
    ref, cand = ref[keep], cand[keep]
    n, d = len(ref), cand - ref
    n_nonzero = int(np.count_nonzero(d))
    common: dict[str, Any] = dict(confidence=confidence, n_invalid=n_invalid, n_invalid_as_loss=n_as_loss, n_nonzero=n_nonzero)
    level = one_sided_level(confidence)
    if binary:
        check_binary(ref)
        check_binary(cand)
        b, c = int(np.count_nonzero(d < 0)), int(np.count_nonzero(d > 0))
        if n == 0:
            return PairedComparison(NAN, NAN, NAN, 1.0, "tango", 0, b, c, p_exact=1.0, **common)
        return PairedComparison((c - b) / n, -tango_upper_drop(b, c, n, level), -tango_lower_drop(b, c, n, level),
                                tango_p(b, c, n), "tango", n, b, c, p_exact=mcnemar_exact(b, c), **common)
    if n == 0:
        return PairedComparison(NAN, NAN, NAN, 1.0, "bootstrap-t", 0, **common)
    mean, se, t = bootstrap_t(d)
    losses, gains = float(-d[d < 0].sum()), float(d[d > 0].sum())
    cmp = PairedComparison(mean, NAN, NAN, 1.0, "bootstrap-t", n, **common,
                           _graded=(mean, se, t, losses, gains, score_range(d, difference=True)))
    return dataclasses.replace(cmp, low=-cmp.upper_drop(level), high=-cmp.lower_drop(level),
                               p_value=_bootstrap_p(cmp))


def _bootstrap_p(cmp: PairedComparison) -> float:
    """Two-sided bootstrap-t p of "no change" (inverts the same t* as the interval); with few
    nonzero differences, at least the score p of the summed losses and gains (as the floor)."""
    assert cmp._graded is not None  # graded comparisons only
    mean, se, t, losses, gains, _ = cmp._graded
    if mean == 0:
        return 1.0
    t_obs = mean / se if se > 0 else math.copysign(math.inf, mean)
    tail = min(np.count_nonzero(t >= t_obs), np.count_nonzero(t <= t_obs))
    p = min(1.0, 2 * (1 + tail) / (1 + len(t)))
    if cmp.n_nonzero < FEW_NONZERO:
        p = max(p, tango_p(losses, gains, cmp.n))
    return p


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down; controls the family-wise error rate)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [1.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted

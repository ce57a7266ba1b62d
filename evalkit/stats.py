"""Confidence bounds and paired comparisons for per-case scores (pure numpy, deterministic).

Conventions:
- A score of None or NaN is invalid. Intervals use the valid values; `n` counts them.
- Binary (0/1) metrics: exact (Clopper-Pearson) bounds for a proportion; Tango's score test and interval for
  the difference of paired proportions (closed form in n, lost, gained: no resampling). The
  interval, the p-value and every non-inferiority bound come from the same score statistic, so
  they never contradict one another. Exact McNemar is kept beside it as the classic "any change" p.
- Graded metrics: a studentized (bootstrap-t) bootstrap, which holds its level much better than
  the percentile bootstrap when the differences are skewed; when fewer than `FEW_NONZERO`
  differences are nonzero, the bound is floored by the score bound on the summed losses and
  gains, since no bootstrap can learn a tail from a handful of values.
- Resampling is seeded from the content (the sorted values), so a verdict never depends on the
  order of the cases or on anything else outside the data.
- Every bound is one-sided at a stated level: "the drop is below U with 95% confidence" is
  `upper_drop(0.95)`. A two-sided interval at confidence c is the pair of one-sided bounds at
  (1 + c) / 2.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

_NAN = float("nan")
# Resampling matrices are built in blocks of about this many elements (~32 MB of float64), so
# memory stays bounded for large suites while each block is still one vectorized numpy call.
_BLOCK = 1 << 22
N_BOOT = 4000
# A continuity correction (in units of one case) on Tango's score statistic. Without one, the
# max_drop gate errs up to 1.4x its nominal rate at some (n, discordance, margin); Yates' 0.5 is
# conservative (the 1-lost-of-114 bound rises from 3.84 to 4.51 pts); 0.35 keeps it within its
# level over n = 20..1000, discordance 1-50%, margins 1-20 pts, levels 0.9-0.99, enumerated exactly
# (bench/bench_verdicts.py prints the grid).
CONTINUITY = 0.35
# Below this many nonzero paired differences a graded bound is floored by the score bound.
FEW_NONZERO = 10


def z_of(level: float) -> float:
    """Upper quantile of the standard normal at `level` (e.g. 0.975 -> 1.96)."""
    return NormalDist().inv_cdf(level)


def check_level(level: float, name: str = "confidence") -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {level}")


def _one_sided(confidence: float) -> float:
    """Each bound of a two-sided interval at `confidence` is one-sided at this level."""
    return (1.0 + confidence) / 2.0


def _as_array(values: Sequence[float | None]) -> np.ndarray:
    """float array with None as NaN, so one mask handles both kinds of invalid score."""
    return np.array([_NAN if v is None else v for v in values], dtype=float).reshape(-1)


def valid_values(values: Sequence[float | None]) -> np.ndarray:
    x = _as_array(values)
    return x[~np.isnan(x)]


def _check_binary(x: np.ndarray) -> None:
    if not np.isin(x, (0.0, 1.0)).all():
        raise ValueError("binary metric has values other than 0 and 1")


def content_seed(x: np.ndarray) -> int:
    """A seed from the values themselves (sorted: case order does not matter)."""
    return int.from_bytes(hashlib.sha256(np.sort(x).astype("<f8").tobytes()).digest()[:8], "little")


# ---------------------------------------------------------------------------- one proportion


@dataclass(frozen=True)
class Interval:
    value: float  # the mean (the observed proportion for 0/1 values)
    low: float
    high: float
    n: int
    method: str  # "clopper-pearson" | "bootstrap-t"
    confidence: float = 0.95  # two-sided


def clopper_pearson(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """Two-sided exact (Clopper-Pearson) interval for a binomial proportion: each end is the
    one-sided bound at (1 + confidence) / 2 and errs at most at that level for every n and p (a
    score bound errs up to 1.8x its level near p = 0 or 1 on small n)."""
    check_level(confidence)
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes}/{n}")
    if n == 0:
        return Interval(_NAN, _NAN, _NAN, 0, "clopper-pearson", confidence)
    alpha = 1 - _one_sided(confidence)
    # P(X >= k | p) rises with p: the lower end is where it reaches alpha, the upper where P(X <= k) falls to it
    low = 0.0 if successes == 0 else _solve_p(lambda p: _binom_tail(successes, n, p) - alpha)
    high = 1.0 if successes == n else _solve_p(lambda p: alpha - (1 - _binom_tail(successes + 1, n, p)))
    return Interval(successes / n, low, high, n, "clopper-pearson", confidence)


def _log_factorials(n: int) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1)))])


def _binom_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in log space (no scipy; no underflow)."""
    j, lf = np.arange(k, n + 1), _log_factorials(n)
    return float(np.exp(lf[n] - lf[j] - lf[n - j] + j * math.log(p) + (n - j) * math.log1p(-p)).sum())


def _solve_p(f: Callable[[float], float]) -> float:
    """The root in (0, 1) of an increasing f, by bisection to float precision."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


def _bootstrap_t(x: np.ndarray, n_boot: int = N_BOOT) -> tuple[float, float, np.ndarray]:
    """(mean, standard error, sorted t* = (mean* - mean) / se*) of the studentized bootstrap.

    A resample with no spread has se* = 0: its t* is 0 when its mean equals the observed one,
    else +-inf, which the order-statistic quantiles below treat conservatively."""
    n = len(x)
    mean = float(x.mean())
    se = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    rng = np.random.default_rng(content_seed(x))
    xs = np.sort(x)
    chunks = []
    for rows in _blocks(n_boot, n):
        r = xs[rng.integers(0, n, size=(rows, n))]
        m = r.mean(axis=1)
        s = r.std(axis=1, ddof=1) / math.sqrt(n) if n > 1 else np.zeros(rows)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(s > 0, (m - mean) / np.where(s > 0, s, 1.0),
                         np.where(np.isclose(m, mean, rtol=0, atol=1e-12), 0.0, np.sign(m - mean) * np.inf))
        chunks.append(t)
    return mean, se, np.sort(np.concatenate(chunks))


def _blocks(rows: int, n: int) -> Iterator[int]:
    """Row counts of the resampling blocks (see _BLOCK)."""
    step = max(1, _BLOCK // max(n, 1))
    for start in range(0, rows, step):
        yield min(step, rows - start)


def _quantile(sorted_t: np.ndarray, q: float, *, upper: bool) -> float:
    """An order statistic, never interpolated (t* may hold infinities): the conservative side."""
    return float(np.quantile(sorted_t, q, method="higher" if upper else "lower"))


def mean_bound(values: Sequence[float | None], level: float, *, side: str, binary: bool) -> float:
    """One-sided bound on the mean at `level`: "lower" (the mean is at least this) or "upper".

    Binary: the exact (Clopper-Pearson) bound, the end of the two-sided interval at 2 * level - 1.
    Graded: the studentized bootstrap bound. NaN when there is no valid value."""
    check_level(level)
    if side not in ("lower", "upper"):
        raise ValueError(f"side must be 'lower' or 'upper', got {side!r}")
    x = valid_values(values)
    if len(x) == 0:
        return _NAN
    if binary:
        _check_binary(x)
        if level <= 0.5:
            raise ValueError(f"a one-sided bound needs a level above 0.5, got {level}")
        iv = clopper_pearson(int(x.sum()), len(x), 2 * level - 1)
        return iv.low if side == "lower" else iv.high
    return _t_bound(*_bootstrap_t(x), level, side, *_score_range(x))


def _t_bound(mean: float, se: float, t: np.ndarray, level: float, side: str, lo: float, hi: float) -> float:
    """The studentized bootstrap's one-sided bound on a mean, mean - t*_q * se, kept within the range
    the mean can take [lo, hi] (a small sample's t* can be infinite: a resample with no spread)."""
    q = _quantile(t, level, upper=True) if side == "lower" else _quantile(t, 1 - level, upper=False)
    return float(min(hi, max(lo, mean - q * se)))


def _score_range(x: np.ndarray, *, difference: bool = False) -> tuple[float, float]:
    """Where a mean of scores can lie: [0, 1] (a Score's range), or [-1, 1] for paired differences,
    widened to the data when a scorer says otherwise."""
    lo, hi = (-1.0 if difference else 0.0), 1.0
    return min(lo, float(x.min())), max(hi, float(x.max()))


def metric_interval(values: Sequence[float | None], *, binary: bool, confidence: float = 0.95) -> Interval:
    """Two-sided interval on the mean of the valid values: Clopper-Pearson (binary) or bootstrap-t."""
    check_level(confidence)
    x = valid_values(values)
    if binary:
        _check_binary(x)
        return clopper_pearson(int(x.sum()), len(x), confidence)
    if len(x) == 0:
        return Interval(_NAN, _NAN, _NAN, 0, "bootstrap-t", confidence)
    level, boot = _one_sided(confidence), _bootstrap_t(x)
    span = _score_range(x)
    return Interval(boot[0], _t_bound(*boot, level, "lower", *span), _t_bound(*boot, level, "upper", *span), len(x),
                    "bootstrap-t", confidence)


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
        return _NAN
    return _solve_drop(lost, gained, n, -z_of(level), (lost - gained) / n, 1.0)


def tango_lower_drop(lost: float, gained: float, n: int, level: float) -> float:
    check_level(level)
    if n == 0:
        return _NAN
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


# ------------------------------------------------------------------------ two samples


KS_EXACT_MAX = 10_000  # n * m up to which the p-value is exact (the asymptotic one errs high below)


def _ks_exact_p(n: int, m: int, d: float) -> float:
    """P(D >= d) under the null, exactly: 1 - the probability that a uniformly random interleaving
    of the two samples (a lattice path from (0, 0) to (n, m)) stays where |i/n - j/m| < d."""
    limit = round(d * n * m)  # D * n * m is an integer: compare in integers
    inside = np.zeros(m + 1)
    for i in range(n + 1):
        row = np.zeros(m + 1)
        for j in range(m + 1):
            if abs(i * m - j * n) >= limit:
                continue
            if i == 0 and j == 0:
                row[j] = 1.0
                continue
            left = n + m - i - j + 1  # draws left before the step into (i, j)
            row[j] = ((inside[j] * (n - i + 1) / left if i else 0.0)
                      + (row[j - 1] * (m - j + 1) / left if j else 0.0))
        inside = row
    return min(1.0, max(0.0, 1.0 - float(inside[m])))


def ks_two_sample(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(D, p): the two-sample Kolmogorov-Smirnov distance (the largest gap between the empirical
    CDFs) and its p-value: exact for n * m <= KS_EXACT_MAX, else asymptotic with Stephens'
    small-sample correction. With ties (token counts) the test is conservative;
    bench/bench_verdicts.py measures its level."""
    x, y = np.sort(np.asarray(a, dtype=float)), np.sort(np.asarray(b, dtype=float))
    if not len(x) or not len(y):
        return _NAN, _NAN
    at = np.concatenate([x, y])
    d = float(np.max(np.abs(np.searchsorted(x, at, side="right") / len(x)
                            - np.searchsorted(y, at, side="right") / len(y))))
    if len(x) * len(y) <= KS_EXACT_MAX:
        return d, _ks_exact_p(len(x), len(y), d)
    ne = len(x) * len(y) / (len(x) + len(y))
    lam = (math.sqrt(ne) + 0.12 + 0.11 / math.sqrt(ne)) * d
    if lam < 0.2:  # the series converges slowly there, and Q is 1 to 10 digits
        return d, 1.0
    j = np.arange(1, 101)
    q = 2 * float(np.sum((-1.0) ** (j - 1) * np.exp(-2 * (j * lam) ** 2)))
    return d, min(1.0, max(0.0, q))


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
            return _NAN
        score_bound = tango_upper_drop if upper else tango_lower_drop
        if self._graded is None:
            assert self.n_ref_only is not None and self.n_cand_only is not None  # binary sets both
            return score_bound(self.n_ref_only, self.n_cand_only, self.n, level)
        mean, se, t, losses, gains, span = self._graded
        bound = -_t_bound(mean, se, t, level, "lower" if upper else "upper", *span)  # drop = -mean difference
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
    ref, cand = _as_array(reference), _as_array(candidate)
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
    level = _one_sided(confidence)
    if binary:
        _check_binary(ref)
        _check_binary(cand)
        b, c = int(np.count_nonzero(d < 0)), int(np.count_nonzero(d > 0))
        if n == 0:
            return PairedComparison(_NAN, _NAN, _NAN, 1.0, "tango", 0, b, c, p_exact=1.0, **common)
        return PairedComparison((c - b) / n, -tango_upper_drop(b, c, n, level), -tango_lower_drop(b, c, n, level),
                                tango_p(b, c, n), "tango", n, b, c, p_exact=mcnemar_exact(b, c), **common)
    if n == 0:
        return PairedComparison(_NAN, _NAN, _NAN, 1.0, "bootstrap-t", 0, **common)
    mean, se, t = _bootstrap_t(d)
    losses, gains = float(-d[d < 0].sum()), float(d[d > 0].sum())
    cmp = PairedComparison(mean, _NAN, _NAN, 1.0, "bootstrap-t", n, **common,
                           _graded=(mean, se, t, losses, gains, _score_range(d, difference=True)))
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


# --------------------------------------------------------------- power of the gate actually run


def _pair_pmf(n: int, lost_p: float, gained_p: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lost, gained, probability) over every (lost, gained) count with non-negligible mass."""
    def cap(p: float) -> int:
        return min(n, int(n * p + 12 * math.sqrt(n * p * (1 - p) + 1) + 12)) if p > 0 else 0
    grid_b, grid_c = np.meshgrid(np.arange(cap(lost_p) + 1), np.arange(cap(gained_p) + 1), indexing="ij")
    b, c = grid_b.ravel(), grid_c.ravel()
    keep = b + c <= n
    b, c = b[keep], c[keep]
    log_fact = _log_factorials(n)

    def xlogp(k: np.ndarray, p: float) -> np.ndarray:
        return np.where(k == 0, 0.0, k * math.log(p)) if p > 0 else np.where(k == 0, 0.0, -np.inf)
    rest = n - b - c
    log_pmf = (log_fact[n] - log_fact[b] - log_fact[c] - log_fact[rest]
               + xlogp(b, lost_p) + xlogp(c, gained_p) + xlogp(rest, 1 - lost_p - gained_p))
    return b, c, np.exp(log_pmf)


# Exact power enumerates every (lost, gained) count: its cost grows with the square of the expected
# number of discordant pairs (n * discordance). Past this many (thousands of questions) the power of
# a candidate with no true drop comes from a normal approximation of the same score test, within
# about one point of power of the exact value there. Error rates at the margin are always exact.
EXACT_DISCORDANT = 600


def power_is_exact(n: int, discordance: float) -> bool:
    return n * discordance <= EXACT_DISCORDANT


def noninferiority_pass_rate(n: int, margin: float, discordance: float, *, level: float = 0.95,
                             true_drop: float = 0.0) -> float:
    """Probability that the binary `max_drop: margin` gate at `level` passes on n pairs, when a
    fraction `discordance` of answers change and the true drop is `true_drop`, enumerated over every
    (lost, gained) count (see EXACT_DISCORDANT for the one approximation). At true_drop = 0 this is
    the power to clear the gate; at true_drop = margin it is the error rate the gate promises to
    keep below 1 - level."""
    if not 0 <= abs(true_drop) <= discordance <= 1:
        raise ValueError(f"need |true_drop| <= discordance <= 1, got {true_drop}, {discordance}")
    if true_drop == 0 and not power_is_exact(n, discordance):
        return _approx_power(n, margin, discordance, level)
    b, c, p = _pair_pmf(n, (discordance + true_drop) / 2, (discordance - true_drop) / 2)
    passes = tango_z(b, c, n, margin) < -z_of(level)
    return float(p[passes].sum())


def _approx_power(n: int, margin: float, discordance: float, level: float) -> float:
    """Normal approximation of the pass rate at no true drop: lost - gained has mean 0 and variance
    n * discordance, and the score test passes when it falls below n * margin - CONTINUITY - z * sd0,
    sd0 being the score statistic's null sd at the expected counts."""
    half = n * discordance / 2
    z0 = float(tango_z(half, half, n, margin))
    if n * margin <= CONTINUITY or not z0 < 0:
        return 0.0
    sd0 = (CONTINUITY - n * margin) / z0
    return NormalDist().cdf((n * margin - CONTINUITY - z_of(level) * sd0) / math.sqrt(n * discordance))


def noninferiority_sample_size(margin: float, discordance: float, *, level: float = 0.95, power: float = 0.8,
                               n_max: int = 200_000) -> int:
    """Smallest n at which a candidate with no true drop clears `max_drop: margin` at `level` with
    at least `power` (searched by doubling then bisection); ValueError past n_max."""
    check_level(level)
    check_level(power, "power")
    if not 0 < margin < 1 or not 0 < discordance <= 1:
        raise ValueError(f"need 0 < margin < 1 and 0 < discordance <= 1, got {margin}, {discordance}")
    def ok(n: int) -> bool:
        return noninferiority_pass_rate(n, margin, discordance, level=level) >= power
    hi = 8
    while not ok(hi):
        if hi >= n_max:
            raise ValueError(f"more than {n_max} pairs would be needed")
        hi = min(hi * 2, n_max)
    lo = hi // 2
    while hi - lo > 1:  # power rises with n up to small saw-teeth; the answer itself is checked
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def smallest_clearable_margin(n: int, discordance: float, *, level: float = 0.95, power: float = 0.8) -> float:
    """The smallest margin that a candidate with no true drop clears with `power` on n pairs."""
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if noninferiority_pass_rate(n, mid, discordance, level=level) < power else (lo, mid)
    return hi

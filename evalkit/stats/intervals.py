"""One mean: two-sided intervals and one-sided bounds on the mean of per-case scores.

Binary scores get exact (Clopper-Pearson) bounds, graded ones a studentized (bootstrap-t)
bootstrap seeded from the values themselves. The levels, score arrays and bootstrap-t pieces
defined here are shared by the paired comparisons (`evalkit.stats.paired`).
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

NAN = float("nan")
# Resampling matrices are built in blocks of about this many elements (~32 MB of float64), so
# memory stays bounded for large suites while each block is still one vectorized numpy call.
_BLOCK = 1 << 22
N_BOOT = 4000


def z_of(level: float) -> float:
    """Upper quantile of the standard normal at `level` (e.g. 0.975 -> 1.96)."""
    return NormalDist().inv_cdf(level)


def check_level(level: float, name: str = "confidence") -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {level}")


def one_sided_level(confidence: float) -> float:
    """Each bound of a two-sided interval at `confidence` is one-sided at this level."""
    return (1.0 + confidence) / 2.0


def scores_array(values: Sequence[float | None]) -> np.ndarray:
    """float array with None as NaN, so one mask handles both kinds of invalid score."""
    return np.array([NAN if v is None else v for v in values], dtype=float).reshape(-1)


def valid_values(values: Sequence[float | None]) -> np.ndarray:
    x = scores_array(values)
    return x[~np.isnan(x)]


def check_binary(x: np.ndarray) -> None:
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
        return Interval(NAN, NAN, NAN, 0, "clopper-pearson", confidence)
    alpha = 1 - one_sided_level(confidence)
    # P(X >= k | p) rises with p: the lower end is where it reaches alpha, the upper where P(X <= k) falls to it
    low = 0.0 if successes == 0 else _solve_p(lambda p: _binom_tail(successes, n, p) - alpha)
    high = 1.0 if successes == n else _solve_p(lambda p: alpha - (1 - _binom_tail(successes + 1, n, p)))
    return Interval(successes / n, low, high, n, "clopper-pearson", confidence)


def log_factorials(n: int) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1)))])


def _binom_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in log space (no scipy; no underflow)."""
    j, lf = np.arange(k, n + 1), log_factorials(n)
    return float(np.exp(lf[n] - lf[j] - lf[n - j] + j * math.log(p) + (n - j) * math.log1p(-p)).sum())


def _solve_p(f: Callable[[float], float]) -> float:
    """The root in (0, 1) of an increasing f, by bisection to float precision."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


def bootstrap_t(x: np.ndarray, n_boot: int = N_BOOT) -> tuple[float, float, np.ndarray]:
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
        return NAN
    if binary:
        check_binary(x)
        if level <= 0.5:
            raise ValueError(f"a one-sided bound needs a level above 0.5, got {level}")
        iv = clopper_pearson(int(x.sum()), len(x), 2 * level - 1)
        return iv.low if side == "lower" else iv.high
    return t_bound(*bootstrap_t(x), level, side, *score_range(x))


def t_bound(mean: float, se: float, t: np.ndarray, level: float, side: str, lo: float, hi: float) -> float:
    """The studentized bootstrap's one-sided bound on a mean, mean - t*_q * se, kept within the range
    the mean can take [lo, hi] (a small sample's t* can be infinite: a resample with no spread)."""
    q = _quantile(t, level, upper=True) if side == "lower" else _quantile(t, 1 - level, upper=False)
    return float(min(hi, max(lo, mean - q * se)))


def score_range(x: np.ndarray, *, difference: bool = False) -> tuple[float, float]:
    """Where a mean of scores can lie: [0, 1] (a Score's range), or [-1, 1] for paired differences,
    widened to the data when a scorer says otherwise."""
    lo, hi = (-1.0 if difference else 0.0), 1.0
    return min(lo, float(x.min())), max(hi, float(x.max()))


def metric_interval(values: Sequence[float | None], *, binary: bool, confidence: float = 0.95) -> Interval:
    """Two-sided interval on the mean of the valid values: Clopper-Pearson (binary) or bootstrap-t."""
    check_level(confidence)
    x = valid_values(values)
    if binary:
        check_binary(x)
        return clopper_pearson(int(x.sum()), len(x), confidence)
    if len(x) == 0:
        return Interval(NAN, NAN, NAN, 0, "bootstrap-t", confidence)
    level, boot = one_sided_level(confidence), bootstrap_t(x)
    span = score_range(x)
    return Interval(boot[0], t_bound(*boot, level, "lower", *span), t_bound(*boot, level, "upper", *span), len(x),
                    "bootstrap-t", confidence)

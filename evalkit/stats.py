"""Confidence intervals and paired comparisons for per-case scores (pure numpy, deterministic).

Conventions:
- A score of None or NaN is invalid (e.g. an unparseable judge verdict). Intervals ignore invalid
  values; paired statistics ignore every pair where either side is invalid. `n` always counts
  the valid values (pairs) actually used.
- Binary metrics (0/1 values) get Wilson intervals and exact McNemar tests; others get
  percentile bootstrap intervals and a sign-flip permutation test.
- Every resampling uses `numpy.random.default_rng(seed)`: the same data and seed always give
  the same numbers, so reports and CI gates are reproducible.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

_NAN = float("nan")
# Resampling matrices are built in blocks of about this many elements (~32 MB of float64), so
# memory stays bounded for large suites while each block is still one vectorized numpy call.
_BLOCK = 1 << 22
# Up to this many pairs the sign-flip test enumerates all 2^n sign vectors: an exact p-value.
_EXACT_SIGNFLIP_MAX_N = 12


@dataclass(frozen=True)
class Interval:
    value: float  # the mean (for Wilson: the observed proportion)
    low: float
    high: float
    n: int
    method: str  # "wilson" | "bootstrap"


@dataclass(frozen=True)
class PairedComparison:
    delta: float  # mean(candidate) - mean(reference) over valid pairs
    low: float  # two-sided paired-bootstrap percentile interval on delta at `confidence`
    high: float
    p_value: float  # two-sided; exact McNemar (binary) or sign-flip permutation test
    test: str  # "mcnemar" | "permutation"
    n: int  # valid pairs
    n_ref_only: int | None = None  # binary: b, reference right and candidate wrong
    n_cand_only: int | None = None  # binary: c, reference wrong and candidate right
    confidence: float = 0.95


def _z(confidence: float) -> float:
    """Upper quantile of the standard normal at `confidence` (e.g. 0.975 -> 1.96)."""
    return NormalDist().inv_cdf(confidence)


def _check_confidence(confidence: float, name: str = "confidence") -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {confidence}")


def _as_array(values: Sequence[float | None]) -> np.ndarray:
    """float array with None as NaN, so one mask handles both kinds of invalid score."""
    return np.array([_NAN if v is None else v for v in values], dtype=float).reshape(-1)


def _check_binary(x: np.ndarray) -> None:
    if not np.isin(x, (0.0, 1.0)).all():
        raise ValueError("binary metric has values other than 0 and 1")


def _blocks(rows: int, n: int) -> Iterator[int]:
    """Row counts of the resampling blocks (see _BLOCK)."""
    step = max(1, _BLOCK // max(n, 1))
    for start in range(0, rows, step):
        yield min(step, rows - start)


def _bootstrap_means(x: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Means of `n_boot` resamples of x with replacement (an n_boot x n index matrix, blocked).

    On paired differences this IS the paired bootstrap: resampling the index of a difference
    resamples the case on both sides jointly.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng, n = np.random.default_rng(seed), len(x)
    return np.concatenate([x[rng.integers(0, n, size=(rows, n))].mean(axis=1)
                           for rows in _blocks(n_boot, n)])


def _percentile_interval(boot: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def wilson(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval for a binomial proportion: sane at 0/n and n/n, unlike Wald."""
    _check_confidence(confidence)
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes}/{n}")
    if n == 0:
        return Interval(_NAN, _NAN, _NAN, 0, "wilson")
    p, z = successes / n, _z(1 - (1 - confidence) / 2)
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # max/min only absorb rounding at the 0/n and n/n edges.
    return Interval(p, max(0.0, center - half), min(1.0, center + half), n, "wilson")


def bootstrap_mean(values: Sequence[float], confidence: float = 0.95, n_boot: int = 2000,
                   seed: int = 0) -> Interval:
    """Percentile bootstrap interval for the mean of the valid values."""
    _check_confidence(confidence)
    x = _as_array(values)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return Interval(_NAN, _NAN, _NAN, 0, "bootstrap")
    low, high = _percentile_interval(_bootstrap_means(x, n_boot, seed), confidence)
    return Interval(float(x.mean()), low, high, len(x), "bootstrap")


def metric_interval(values: Sequence[float], *, binary: bool, confidence: float = 0.95) -> Interval:
    """Wilson for binary (0/1) metrics, bootstrap otherwise; no valid values -> NaN interval."""
    if not binary:
        return bootstrap_mean(values, confidence)
    x = _as_array(values)
    x = x[~np.isnan(x)]
    _check_binary(x)
    return wilson(int(x.sum()), len(x), confidence)


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


def _signflip_p(d: np.ndarray, n_perm: int, seed: int) -> float:
    """Two-sided paired permutation test of mean(d) == 0 by random sign flips of the differences.

    Small n enumerates all 2^n sign vectors (exact); otherwise n_perm random ones, with the
    observed statistic counted once so p is never 0: (1 + #extreme) / (1 + n_perm).
    """
    n = len(d)
    observed = abs(d.sum())
    tol = 1e-9 * max(1.0, float(np.abs(d).sum()))  # the observed vector must count as extreme
    if n <= _EXACT_SIGNFLIP_MAX_N:
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
        return float(np.mean(np.abs(signs @ d) >= observed - tol))
    rng = np.random.default_rng(seed)
    extreme = sum(int(np.count_nonzero(np.abs((1 - 2 * rng.integers(0, 2, size=(rows, n))) @ d)
                                       >= observed - tol))
                  for rows in _blocks(n_perm, n))
    return (1 + extreme) / (1 + n_perm)


def paired_compare(reference: Sequence[float], candidate: Sequence[float], *, binary: bool,
                   confidence: float = 0.95, n_boot: int = 2000, seed: int = 0) -> PairedComparison:
    """Candidate vs reference on the same cases (index i of both is the same case).

    delta and its interval come from a paired bootstrap (cases resampled jointly, percentile).
    The p-value is exact McNemar for binary metrics, else a sign-flip permutation test with
    `n_boot` random flips. Pairs where either side is None/NaN are dropped; `n` counts the rest.
    The bootstrap deltas are kept on the result (private attribute, not a field, so records made
    with dataclasses.asdict stay small) for `noninferiority_upper_drop`.
    """
    _check_confidence(confidence)
    ref, cand = _as_array(reference), _as_array(candidate)
    if len(ref) != len(cand):
        raise ValueError(f"paired scores differ in length: {len(ref)} reference, {len(cand)} candidate")
    valid = ~(np.isnan(ref) | np.isnan(cand))
    ref, cand = ref[valid], cand[valid]
    n, d = len(ref), cand - ref
    b = c = None
    if binary:
        _check_binary(ref)
        _check_binary(cand)
        b, c = int(np.count_nonzero(d < 0)), int(np.count_nonzero(d > 0))
    if n == 0:
        return PairedComparison(_NAN, _NAN, _NAN, 1.0, "mcnemar" if binary else "permutation", 0,
                                b, c, confidence)
    boot = _bootstrap_means(d, n_boot, seed)
    low, high = _percentile_interval(boot, confidence)
    p = mcnemar_exact(b, c) if binary else _signflip_p(d, n_boot, seed)
    result = PairedComparison(float(d.mean()), low, high, p, "mcnemar" if binary else "permutation",
                              n, b, c, confidence)
    object.__setattr__(result, "_boot", boot)
    return result


def noninferiority_upper_drop(cmp: PairedComparison, *, one_sided_confidence: float) -> float:
    """Upper confidence bound on the drop (reference - candidate), one-sided at the given level.

    It is the `one_sided_confidence` percentile of the paired-bootstrap distribution of the drop,
    so a gate "no drop of D or more" passes only when this bound is < D: at 95%, a candidate
    that truly loses D fails the gate at least ~95% of the time. On a PairedComparison without
    bootstrap deltas (built by hand, or via dataclasses.replace) only the level matching its
    two-sided interval is available: one_sided = (1 + confidence) / 2 gives -low.
    NaN when there were no valid pairs.
    """
    _check_confidence(one_sided_confidence, "one_sided_confidence")
    if cmp.n == 0:
        return _NAN
    boot = getattr(cmp, "_boot", None)
    if boot is not None:
        return float(-np.quantile(boot, 1.0 - one_sided_confidence))
    if math.isclose(one_sided_confidence, (1 + cmp.confidence) / 2):
        return -cmp.low
    raise ValueError(f"this comparison carries no bootstrap sample: one_sided_confidence must be "
                     f"{(1 + cmp.confidence) / 2:g} to match its {cmp.confidence:g} two-sided interval")


def paired_sample_size(drop: float, discordance: float, *, confidence: float = 0.95,
                       power: float = 0.8) -> int:
    """Paired binary items needed to detect a true accuracy drop with a one-sided McNemar test.

    Connor (1987) normal approximation, with psi = discordance (p10 + p01) and delta = drop
    (p10 - p01):  n = (z_conf * sqrt(psi) + z_power * sqrt(psi - delta^2))^2 / delta^2,
    rounded up. A drop must come from discordant items, hence drop < discordance.
    """
    _check_confidence(confidence)
    _check_confidence(power, "power")
    if not 0.0 < drop < discordance <= 1.0:
        raise ValueError(f"need 0 < drop < discordance <= 1, got drop={drop}, discordance={discordance}")
    root = _z(confidence) * math.sqrt(discordance) + _z(power) * math.sqrt(discordance - drop**2)
    return math.ceil(root**2 / drop**2)

"""Planning: the power of the binary `max_drop` gate as it is actually run, and the sample size it needs.

The pass rate is enumerated over every (lost, gained) count under the same score test the gate
uses, so the power printed and the error rate promised are those of the gate itself.
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from evalkit.stats.intervals import check_level, log_factorials, z_of
from evalkit.stats.paired import CONTINUITY, tango_z


def _pair_pmf(n: int, lost_p: float, gained_p: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lost, gained, probability) over every (lost, gained) count with non-negligible mass."""
    def cap(p: float) -> int:
        return min(n, int(n * p + 12 * math.sqrt(n * p * (1 - p) + 1) + 12)) if p > 0 else 0
    grid_b, grid_c = np.meshgrid(np.arange(cap(lost_p) + 1), np.arange(cap(gained_p) + 1), indexing="ij")
    b, c = grid_b.ravel(), grid_c.ravel()
    keep = b + c <= n
    b, c = b[keep], c[keep]
    log_fact = log_factorials(n)

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

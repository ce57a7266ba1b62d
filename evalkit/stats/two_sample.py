"""Two unpaired samples: whether their distributions differ (two-sample Kolmogorov-Smirnov).

The pitfalls check compares token lengths of training and test prompts with it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from evalkit.stats.intervals import NAN

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
        return NAN, NAN
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

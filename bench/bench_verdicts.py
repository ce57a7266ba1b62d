"""Calibration of evalkit's gates: how often each gate kind passes when the true effect sits exactly
on its threshold (a gate "at 95%" must pass at most ~5% of the time there), beside the method it
replaced, and what that costs in power.

- binary `max_drop: D, confidence: c`: exact, by enumeration over every (lost, gained) count of n
  paired 0/1 outcomes (the gate as gates.py runs it: stats.noninferiority_pass_rate). The old
  percentile bootstrap is enumerated over the same outcomes, its resampling simulated (seeded).
- binary `min: p0, confidence: c` (and by symmetry `max:`): exact, over every success count; the
  Clopper-Pearson bound cannot exceed its level, and the table shows by how much it stays under.
- graded `max_drop`: seeded simulation through stats.paired_compare (bounded: --reps per cell).
- graded `max: T, confidence: c` on heavy-tailed, unbounded values (a drift canary's per-passage KL):
  lognormal values whose true mean is T, through stats.mean_bound as gates.py calls it. It does NOT
  hold its level (no bound can, without a bound on the values), which is why the suite refuses
  `confidence:` on such metrics; graded `min:` on bounded values (top-1 agreement: beta values)
  does.
- `length_match` (two-sample Kolmogorov-Smirnov, asymptotic p with Stephens' correction): seeded
  simulation of token lengths (discrete, so with ties) drawn from one distribution for train and
  eval: the false-alarm rate must stay under alpha; and its power when eval prompts are 10% and
  10x longer. `stops_generating` with `confidence:` is the binary max_drop gate above (same code:
  a stop is a 1, a cut a 0), so that table is its calibration.

    python bench/bench_verdicts.py [--reps 1000]
"""
from __future__ import annotations

import argparse
import itertools
import math
import time

import numpy as np

from evalkit.stats.intervals import clopper_pearson, mean_bound, z_of
from evalkit.stats.paired import CONTINUITY, paired_compare
from evalkit.stats.power import _pair_pmf, noninferiority_pass_rate
from evalkit.stats.two_sample import ks_two_sample

NS = (50, 114, 300)
DISCORDANCE = (0.02, 0.05, 0.15, 0.30)
DROPS = (0.02, 0.05, 0.10)
THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.98)


def old_bootstrap_pass_rate(n: int, margin: float, psi: float, true_drop: float, level: float = 0.95,
                            n_boot: int = 2000) -> float:
    """The replaced gate: percentile bootstrap of the paired mean difference. Resampling n pairs
    of a binary table is a multinomial draw of (lost, gained), so each outcome costs one vector."""
    b, c, p = _pair_pmf(n, (psi + true_drop) / 2, (psi - true_drop) / 2)
    keep = p > 1e-9
    rng = np.random.default_rng(0)
    total = 0.0
    for bi, ci, pi in zip(b[keep], c[keep], p[keep]):
        draws = rng.multinomial(n, [bi / n, ci / n, 1 - (bi + ci) / n], size=n_boot)
        bound = np.quantile((draws[:, 0] - draws[:, 1]) / n, level)
        total += pi * (bound < margin)
    return total


def old_wilson_low(k: int, n: int, z: float = 1.959964) -> float:
    """The replaced `min:` bound: the uncorrected two-sided 95% Wilson interval, whatever the level."""
    p = k / n
    center, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (center - half) / (1 + z * z / n))


def binary_max_drop(level: float) -> tuple[list[str], tuple]:
    rows, worst = [], (0.0,)
    for n, psi in itertools.product(NS, DISCORDANCE):
        cells = []
        for d in DROPS:
            if d > psi:
                cells.append(f"{'-':>22}")
                continue
            new = noninferiority_pass_rate(n, d, psi, level=level, true_drop=d)
            old = old_bootstrap_pass_rate(n, d, psi, d, level)
            power = noninferiority_pass_rate(n, d, psi, level=level)
            worst = max(worst, (new, n, psi, d))
            cells.append(f"{100 * new:5.2f} ({100 * old:5.1f}) {100 * power:5.1f}")
        rows.append(f"  n={n:<4} {100 * psi:4.0f}%  " + " ".join(cells))
    return rows, worst


def binary_min(level: float) -> tuple[list[str], tuple]:
    from scipy.stats import binom  # bench only

    rows, worst = [], (0.0,)
    for n in NS:
        ks = np.arange(n + 1)
        new_low = np.array([clopper_pearson(int(k), n, 2 * level - 1).low for k in ks])
        old_low = np.array([old_wilson_low(int(k), n) for k in ks])
        cells = []
        for p0 in THRESHOLDS:
            pmf = binom.pmf(ks, n, p0)
            new, old = pmf[new_low >= p0].sum(), pmf[old_low >= p0].sum()
            worst = max(worst, (new, n, p0))
            cells.append(f"{100 * new:5.2f} ({100 * old:5.2f})")
        rows.append(f"  n={n:<4} " + " ".join(cells))
    return rows, worst


def graded_max_drop(reps: int, level: float = 0.95) -> tuple[list[str], tuple]:
    """Differences are 0 for a share 1 - psi of cases, else +-U(0.5, 1) with the signs' balance
    set so that the true mean drop is exactly D (cells with D > 0.75 psi are impossible)."""
    rows, worst = [], (0.0,)
    z = z_of(level)
    for n, psi in itertools.product(NS, DISCORDANCE):
        cells = []
        for d in DROPS:
            if d > 0.75 * psi:
                cells.append(f"{'-':>14}")
                continue
            p_neg = (1 + d / (0.75 * psi)) / 2  # E[d | nonzero] = -0.75 (2 p_neg - 1) = -d / psi
            rng = np.random.default_rng(hash((n, psi, d)) % 2**32)
            new = old = 0
            for _ in range(reps):
                nz = rng.random(n) < psi
                mag = rng.uniform(0.5, 1.0, n)
                diff = np.where(nz, np.where(rng.random(n) < p_neg, -mag, mag), 0.0)
                ref = np.full(n, 1.0)
                cmp = paired_compare(ref.tolist(), (ref + diff).tolist(), binary=False)
                new += cmp.upper_drop(level) < d
                boot = diff[rng.integers(0, n, size=(2000, n))].mean(axis=1)
                old += -np.quantile(boot, 1 - level) < d
            rate = new / reps
            worst = max(worst, (rate, n, psi, d))
            cells.append(f"{100 * rate:5.1f} ({100 * old / reps:5.1f})")
        rows.append(f"  n={n:<4} {100 * psi:4.0f}%  " + " ".join(cells))
    se = math.sqrt(0.05 * 0.95 / reps) * 100
    rows.append(f"  (simulation: {reps} runs per cell; a true 5% reads 5 +- {2 * se:.1f} in 95% of benches; z={z:.3f})")
    return rows, worst


LOGNORMAL_SIGMAS = (0.5, 1.0, 1.5)  # 1.5: one passage in ~30 reads 10x the median (the demo's qlora drift)
PASSAGES = (16, 32, 64, 128)


def graded_max(reps: int, level: float = 0.95, threshold: float = 0.05) -> tuple[list[str], tuple]:
    """Per-passage values lognormal(mu, sigma) with mu set so that the true mean is exactly the
    threshold: the pass rate of `max: threshold` (upper bound <= threshold) must stay under
    1 - level. Power: the pass rate when the true mean is half the threshold."""
    rows, worst = [], (0.0,)
    for n in PASSAGES:
        cells = []
        for sigma in LOGNORMAL_SIGMAS:
            rng = np.random.default_rng(hash((n, sigma)) % 2**32)
            rates = []
            for mean in (threshold, threshold / 2):
                mu = math.log(mean) - sigma ** 2 / 2
                passed = sum(mean_bound(rng.lognormal(mu, sigma, n).tolist(), level, side="upper",
                                              binary=False) <= threshold for _ in range(reps))
                rates.append(passed / reps)
            worst = max(worst, (rates[0], n, sigma))
            cells.append(f"{100 * rates[0]:5.1f} ({100 * rates[1]:5.1f})")
        rows.append(f"  n={n:<4}   " + " ".join(f"{c:>16}" for c in cells))
    return rows, worst


BETA_CONCENTRATIONS = (10, 40, 200)  # a passage's top-1 agreement over ~40 tokens: about 40


def graded_min_bounded(reps: int, level: float = 0.95, threshold: float = 0.85) -> tuple[list[str], tuple]:
    """Per-passage values in [0, 1], beta with mean exactly the threshold: the pass rate of
    `min: threshold` (lower bound >= threshold) must stay under 1 - level."""
    rows, worst = [], (0.0,)
    for n in PASSAGES:
        cells = []
        for k in BETA_CONCENTRATIONS:
            rng = np.random.default_rng(hash((n, k)) % 2**32)
            a, b = threshold * k, (1 - threshold) * k
            rate = sum(mean_bound(rng.beta(a, b, n).tolist(), level, side="lower", binary=False) >= threshold
                       for _ in range(reps)) / reps
            worst = max(worst, (rate, n, k))
            cells.append(f"{100 * rate:5.1f}")
        rows.append(f"  n={n:<4}   " + " ".join(f"{c:>16}" for c in cells))
    return rows, worst


KS_SIZES = ((20, 10), (40, 20), (380, 50), (2000, 300), (10000, 2000))
KS_SPREADS = (3, 20, 150)  # token-length spread: few distinct values (many ties) to broad


def ks_lengths(rng: np.random.Generator, n: int, spread: int, scale: float = 1.0) -> np.ndarray:
    """Prompt lengths in tokens: a template overhead plus a negative-binomial body (right-skewed)."""
    return np.round((30 + rng.negative_binomial(5, 5 / (5 + spread), size=n)) * scale)


def length_match_rates(reps: int, alpha: float) -> tuple[list[str], tuple]:
    """False-alarm % under the null (same distribution), and power at eval 10% and 10x longer."""
    rows, worst = [], (0.0,)
    rng = np.random.default_rng(0)
    for n, m in KS_SIZES:
        cells = []
        for spread in KS_SPREADS:
            null = sum(ks_two_sample(ks_lengths(rng, n, spread), ks_lengths(rng, m, spread))[1] < alpha
                       for _ in range(reps)) / reps
            shifted = sum(ks_two_sample(ks_lengths(rng, n, spread), ks_lengths(rng, m, spread, 1.1))[1] < alpha
                          for _ in range(reps)) / reps
            tenfold = ks_two_sample(ks_lengths(rng, n, spread), ks_lengths(rng, m, spread, 10))[1] < alpha
            cells.append(f"{100 * null:5.1f} ({100 * shifted:5.1f}, {'yes' if tenfold else ' no'})")
            worst = max(worst, (null, n, m, spread))
        rows.append(f"  {n:>5} {m:>5}  " + " ".join(f"{c:>22}" for c in cells))
    return rows, worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=1000, help="simulated runs per graded cell")
    args = ap.parse_args()
    t0 = time.time()
    print(f"evalkit gate calibration (Tango continuity correction {CONTINUITY}); pass rate % when the truth "
          "sits exactly on the threshold: at most 100 - level is the promise\n")

    print("binary max_drop, confidence 0.95 (exact): pass % at true drop = D  (replaced percentile bootstrap)  "
          "power % at true drop 0")
    print("  n    discord  " + " ".join(f"{f'D={100 * d:g} pts':>22}" for d in DROPS))
    rows, w_drop = binary_max_drop(0.95)
    print("\n".join(rows))

    for level in (0.8, 0.95, 0.99):
        print(f"\nbinary min, confidence {level} (exact): pass % at true rate = threshold  "
              f"(replaced: two-sided 95% Wilson whatever the level)")
        print("  n        " + " ".join(f"{f'min {p0:g}':>15}" for p0 in THRESHOLDS))
        rows, w = binary_min(level)
        print("\n".join(rows))
        if level == 0.95:
            w_min = w

    print("\ngraded max_drop, confidence 0.95 (simulated): pass % at true drop = D  (replaced percentile bootstrap)")
    print("  n    nonzero  " + " ".join(f"{f'D={100 * d:g} pts':>14}" for d in DROPS))
    rows, w_graded = graded_max_drop(args.reps)
    print("\n".join(rows))

    print("\ngraded max, confidence 0.95 (simulated, lognormal per-passage values): pass % at true mean = max  "
          "(power % at true mean = max / 2)")
    print("  passages " + " ".join(f"{f'sigma {sg:g}':>16}" for sg in LOGNORMAL_SIGMAS))
    rows, w_max = graded_max(args.reps)
    print("\n".join(rows))

    print("\ngraded min, confidence 0.95 (simulated, beta per-passage values in [0, 1]): pass % at true mean = "
          "min 0.85")
    print("  passages " + " ".join(f"{f'concentration {k}':>16}" for k in BETA_CONCENTRATIONS))
    rows, w_min_graded = graded_min_bounded(args.reps)
    print("\n".join(rows))

    for alpha in (0.05, 0.01):
        print(f"\nlength_match at alpha {alpha:g} (simulated, discrete lengths): false alarm % when train and eval "
              "lengths share one distribution  (power % at eval 10% longer, caught at 10x)")
        print("  train  eval  " + " ".join(f"{f'spread {sp}':>22}" for sp in KS_SPREADS))
        rows, w = length_match_rates(args.reps, alpha)
        print("\n".join(rows))
        if alpha == 0.05:
            w_ks = w

    print(f"\nworst cell, binary max_drop at 95%: {100 * w_drop[0]:.2f}% (n={w_drop[1]}, discordance "
          f"{100 * w_drop[2]:g}%, D={100 * w_drop[3]:g})")
    print(f"worst cell, binary min at 95%:      {100 * w_min[0]:.2f}% (n={w_min[1]}, threshold {w_min[2]:g})")
    print(f"worst cell, graded max_drop at 95%: {100 * w_graded[0]:.1f}% (n={w_graded[1]}, nonzero "
          f"{100 * w_graded[2]:g}%, D={100 * w_graded[3]:g}; simulated)")
    print(f"worst cell, graded max at 95%, unbounded: {100 * w_max[0]:.1f}% (n={w_max[1]}, lognormal sigma "
          f"{w_max[2]:g}; simulated): NOT held, so the suite refuses `confidence:` there")
    print(f"worst cell, graded min at 95%, bounded:   {100 * w_min_graded[0]:.1f}% (n={w_min_graded[1]}, beta "
          f"concentration {w_min_graded[2]}; simulated)")
    print(f"worst cell, length_match at alpha 0.05: {100 * w_ks[0]:.1f}% (train {w_ks[1]}, eval {w_ks[2]}, "
          f"spread {w_ks[3]}; simulated)")
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()

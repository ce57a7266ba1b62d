"""Statistics against known references (scipy, tests only; published values; the defining equations)
and against brute force: exact enumeration of the gate actually run."""
from __future__ import annotations

import itertools
import math
from statistics import NormalDist

import numpy as np
import pytest
from scipy.stats import binomtest, multinomial

from evalkit.stats import paired
from evalkit.stats.intervals import clopper_pearson, mean_bound, metric_interval
from evalkit.stats.paired import holm, mcnemar_exact, paired_compare, tango_p, tango_upper_drop, tango_z
from evalkit.stats.power import noninferiority_pass_rate, noninferiority_sample_size, smallest_clearable_margin


def z(level):
    return NormalDist().inv_cdf(level)


# --------------------------------------------------------------------------- one proportion

@pytest.mark.parametrize("k, n, conf", [(81, 263, 0.95), (0, 20, 0.95), (20, 20, 0.9), (1, 114, 0.9), (5, 50, 0.99)])
def test_clopper_pearson_matches_scipy(k, n, conf):
    iv = clopper_pearson(k, n, conf)
    ref = binomtest(k, n).proportion_ci(confidence_level=conf, method="exact")
    assert (iv.low, iv.high) == (pytest.approx(ref.low, abs=1e-10), pytest.approx(ref.high, abs=1e-10))


@pytest.mark.parametrize("n", [20, 50, 114])
def test_exact_lower_bound_never_errs_above_its_level(n):
    """Where score bounds fail (thresholds near 0 or 1 on few cases): a `min:` gate at 95% passes at
    most 5% of the time when the true rate sits on its threshold, whatever the threshold."""
    from scipy.stats import binom

    ks = np.arange(n + 1)
    lows = np.array([mean_bound([1] * k + [0] * (n - k), 0.95, side="lower", binary=True) for k in ks])
    for p0 in np.linspace(0.01, 0.99, 99):
        assert binom.pmf(ks, n, p0)[lows >= p0].sum() <= 0.05 + 1e-12


def test_clopper_pearson_edges():
    assert clopper_pearson(0, 20).low == 0.0 and clopper_pearson(20, 20).high == 1.0
    assert math.isnan(clopper_pearson(0, 0).value) and clopper_pearson(0, 0).n == 0
    with pytest.raises(ValueError):
        clopper_pearson(11, 10)


def test_one_sided_bound_is_the_two_sided_end_at_2c_minus_1_and_moves_with_the_level():
    values = [1] * 40 + [0] * 10
    assert mean_bound(values, 0.95, side="lower", binary=True) == clopper_pearson(40, 50, 0.90).low
    bounds = [mean_bound(values, c, side="lower", binary=True) for c in (0.6, 0.8, 0.95, 0.99)]
    assert bounds == sorted(bounds, reverse=True) and len(set(bounds)) == 4
    with pytest.raises(ValueError, match=r"above 0\.5"):
        mean_bound(values, 0.4, side="lower", binary=True)


# ------------------------------------------------------------------------------------ Tango

def test_tango_without_correction_reproduces_the_uncorrected_score_bound(monkeypatch):
    # 1 lost, 0 gained of 114: the uncorrected score bound is 3.84 pts (issue 10's reference)
    monkeypatch.setattr(paired, "CONTINUITY", 0.0)
    assert tango_upper_drop(1, 0, 114, 0.95) * 100 == pytest.approx(3.836, abs=1e-3)
    # at drop 0 the statistic is McNemar's z
    assert float(tango_z(7, 2, 60, 0.0)) == pytest.approx(5 / 3)


def test_one_lost_of_114_bound_and_zero_discordant():
    assert 3.5 < tango_upper_drop(1, 0, 114, 0.95) * 100 < 4.5
    assert tango_upper_drop(0, 0, 50, 0.95) * 100 > 2  # no discordant pair proves no drop of 2 pts
    # the bound solves the score equation at the level
    u = tango_upper_drop(5, 2, 80, 0.9)
    assert float(tango_z(5, 2, 80, u)) == pytest.approx(-z(0.9), abs=1e-9)


@pytest.mark.parametrize("n", [30, 114])
def test_interval_and_p_never_contradict(n):
    for b, c in itertools.product(range(12), repeat=2):
        cmp = paired_compare([1] * b + [0] * c + [1] * (n - b - c), [0] * b + [1] * c + [1] * (n - b - c),
                             binary=True)
        excludes_zero = cmp.low > 0 or cmp.high < 0
        assert excludes_zero == (cmp.p_value < 0.05), (b, c, cmp)
        assert cmp.p_value == tango_p(b, c, n) and cmp.p_exact == mcnemar_exact(b, c)


@pytest.mark.parametrize("b, c", [(3, 3), (1, 6), (0, 10), (7, 2), (30, 45), (130, 100)])
def test_mcnemar_exact_matches_scipy(b, c):
    assert mcnemar_exact(b, c) == pytest.approx(binomtest(min(b, c), b + c, 0.5).pvalue, rel=1e-12)
    assert mcnemar_exact(0, 0) == 1.0


def test_pass_rate_is_the_gate_enumerated_by_brute_force():
    """noninferiority_pass_rate == sum over every outcome of P(outcome) * [gate passes], where the
    gate is paired_compare + upper_drop exactly as gates.py runs it."""
    n, margin, psi, true_drop = 9, 0.2, 0.4, 0.1
    p_lost, p_gained = (psi + true_drop) / 2, (psi - true_drop) / 2
    total = 0.0
    for b in range(n + 1):
        for c in range(n + 1 - b):
            cmp = paired_compare([1] * b + [0] * c + [1] * (n - b - c), [0] * b + [1] * c + [1] * (n - b - c),
                                 binary=True)
            if cmp.upper_drop(0.95) < margin:
                total += multinomial.pmf([b, c, n - b - c], n, [p_lost, p_gained, 1 - psi])
    assert noninferiority_pass_rate(n, margin, psi, true_drop=true_drop) == pytest.approx(total, rel=1e-9)


@pytest.mark.parametrize("n", [50, 114, 300])
def test_binary_max_drop_holds_its_level_at_the_threshold(n):
    for psi, drop in [(0.02, 0.02), (0.05, 0.02), (0.15, 0.05), (0.30, 0.10)]:
        assert noninferiority_pass_rate(n, drop, psi, level=0.95, true_drop=drop) <= 0.05


def test_sample_size_is_the_smallest_with_the_power():
    n = noninferiority_sample_size(0.05, 0.15, level=0.95, power=0.8)
    assert noninferiority_pass_rate(n, 0.05, 0.15) >= 0.8 > noninferiority_pass_rate(n - 1, 0.05, 0.15)
    m = smallest_clearable_margin(114, 0.15)
    assert noninferiority_pass_rate(114, m, 0.15) >= 0.8 > noninferiority_pass_rate(114, m * 0.98, 0.15)


# --------------------------------------------------------------------------- paired compare

def test_paired_binary_counts_and_invalid_candidates_are_losses():
    ref = [1, 1, 1, 0, 0, 1, None, 1]
    cand = [1, 0, None, 0, 1, float("nan"), 1, 1]
    cmp = paired_compare(ref, cand, binary=True, invalid_as_loss=True)
    # pair 7 dropped (reference invalid); pairs 3 and 6 (candidate invalid) are losses
    assert (cmp.n, cmp.n_ref_only, cmp.n_cand_only, cmp.n_invalid, cmp.n_invalid_as_loss) == (7, 3, 1, 3, 2)
    dropped = paired_compare(ref, cand, binary=True)
    assert (dropped.n, dropped.n_ref_only, dropped.n_invalid, dropped.n_invalid_as_loss) == (5, 1, 3, 0)
    with pytest.raises(ValueError):
        paired_compare([1, 0], [1], binary=True)


def test_graded_is_deterministic_and_independent_of_case_order():
    rng = np.random.default_rng(1)
    ref = rng.uniform(size=80)
    cand = np.clip(ref + rng.normal(-0.05, 0.1, size=80), 0, 1)
    a = paired_compare(ref.tolist(), cand.tolist(), binary=False)
    order = rng.permutation(80)
    b = paired_compare(ref[order].tolist(), cand[order].tolist(), binary=False)
    assert (a.low, a.high, a.p_value, a.upper_drop(0.9)) == (b.low, b.high, b.p_value, b.upper_drop(0.9))
    assert a.low < a.delta < a.high and a.method == "bootstrap-t"


def test_graded_with_few_nonzero_differences_is_floored_by_the_score_bound():
    same = paired_compare([0.5] * 50, [0.5] * 50, binary=False)
    assert same.upper_drop(0.95) == tango_upper_drop(0, 0, 50, 0.95) > 0.02
    few = paired_compare([0.5] * 50, [0.5] * 47 + [0.2, 0.4, 0.6], binary=False)
    assert few.method == "bootstrap-t + score floor"
    assert few.upper_drop(0.95) >= tango_upper_drop(0.4, 0.1, 50, 0.95)


def test_graded_interval_covers_the_true_delta():
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(40):
        ref = rng.uniform(size=60)
        cand = np.clip(ref + rng.normal(0.1, 0.2, size=60), 0, 1)
        true = float(np.mean(np.clip(ref + rng.normal(0.1, 0.2, size=(2000, 60)), 0, 1) - ref))
        cmp = paired_compare(ref.tolist(), cand.tolist(), binary=False)
        covered += cmp.low <= true <= cmp.high
    assert covered >= 34  # 95% nominal; ~38 expected


def test_metric_interval_methods():
    assert metric_interval([1, 0, 1, 1, 1, 1, 1, 1, None, 1, 0], binary=True) == clopper_pearson(8, 10)
    assert metric_interval([0.1, 0.5, 0.9], binary=False).method == "bootstrap-t"
    assert math.isnan(metric_interval([], binary=True).value)
    with pytest.raises(ValueError):
        metric_interval([0.5, 1.0], binary=True)


def test_holm_hand_computed():
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([]) == []

"""Statistics against known references: scipy (tests only), hand-computed values, constructed data."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy.stats import binomtest

from evalkit.stats import (Interval, PairedComparison, bootstrap_mean, mcnemar_exact, metric_interval,
                           noninferiority_upper_drop, paired_compare, paired_sample_size, wilson)


def test_wilson_hand_computed():
    iv = wilson(8, 10)
    assert (iv.value, iv.n, iv.method) == (0.8, 10, "wilson")
    assert (iv.low, iv.high) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    assert wilson(0, 20).low == 0.0 and wilson(20, 20).high == 1.0
    assert math.isnan(wilson(0, 0).value) and wilson(0, 0).n == 0
    with pytest.raises(ValueError):
        wilson(11, 10)


def test_bootstrap_mean_is_deterministic_and_ignores_invalid():
    values = [0.2, 0.9, None, 0.5, float("nan"), 0.7, 0.4, 0.6]
    iv = bootstrap_mean(values, seed=3)
    assert iv == bootstrap_mean(values, seed=3)
    assert iv.n == 6 and iv.value == pytest.approx(3.3 / 6) and iv.method == "bootstrap"
    assert 0.2 <= iv.low < iv.value < iv.high <= 0.9
    assert bootstrap_mean([0.5]) == Interval(0.5, 0.5, 0.5, 1, "bootstrap")
    assert bootstrap_mean([None]).n == 0 and math.isnan(bootstrap_mean([]).low)


def test_metric_interval_picks_method():
    assert metric_interval([1, 0, 1, 1, 1, 1, 1, 1, None, 1, 0], binary=True) == wilson(8, 10)
    assert metric_interval([0.1, 0.5, 0.9], binary=False).method == "bootstrap"
    assert math.isnan(metric_interval([], binary=True).value)
    with pytest.raises(ValueError, match="other than 0 and 1"):
        metric_interval([0.5, 1.0], binary=True)


@pytest.mark.parametrize("b, c", [(3, 3), (1, 6), (0, 10), (7, 2), (30, 45), (130, 100)])
def test_mcnemar_exact_matches_scipy(b, c):
    assert mcnemar_exact(b, c) == pytest.approx(binomtest(min(b, c), b + c, 0.5).pvalue, rel=1e-12)


def test_mcnemar_exact_hand_computed():
    assert mcnemar_exact(1, 6) == 0.125  # 2 * (1 + 7) / 2**7
    assert mcnemar_exact(0, 0) == 1.0  # no discordant pairs: no evidence (scipy rejects n=0)


def test_paired_compare_binary_constructed():
    # 100 cases: 45 both right, 5 reference only (b), 15 candidate only (c), 35 both wrong,
    # plus two pairs with an invalid score that must be dropped.
    ref = [1] * 50 + [0] * 50 + [1, None]
    cand = [1] * 45 + [0] * 5 + [1] * 15 + [0] * 35 + [float("nan"), 1]
    cmp = paired_compare(ref, cand, binary=True)
    assert (cmp.n, cmp.n_ref_only, cmp.n_cand_only, cmp.test) == (100, 5, 15, "mcnemar")
    assert cmp.delta == pytest.approx(0.10)
    assert cmp.p_value == mcnemar_exact(5, 15)
    assert cmp.low < 0.10 < cmp.high
    assert cmp == paired_compare(ref, cand, binary=True)  # fixed seed: deterministic


def test_paired_bootstrap_interval_covers_true_delta():
    rng = np.random.default_rng(7)
    ref = rng.uniform(0, 1, 400)
    cand = np.clip(ref + 0.05 + rng.normal(0, 0.1, 400), -1, 2)  # true mean shift ~0.05
    cmp = paired_compare(ref.tolist(), cand.tolist(), binary=False)
    true_delta = float(np.mean(cand - ref))
    assert cmp.test == "permutation" and cmp.n == 400
    assert cmp.low < true_delta < cmp.high and cmp.low > 0.03 and cmp.high < 0.07
    assert cmp.p_value == pytest.approx(1 / 2001)  # no random sign flip beats a clear shift
    # pairing matters: the unpaired spread of each side is far wider than the paired interval
    assert cmp.high - cmp.low < (bootstrap_mean(ref).high - bootstrap_mean(ref).low) / 2


def test_permutation_test_exact_for_small_n_and_null_for_no_change():
    # 5 pairs all +1: only the all-plus and all-minus of 32 sign vectors are as extreme
    assert paired_compare([0.0] * 5, [1.0] * 5, binary=False).p_value == 2 / 32
    same = paired_compare([0.3, 0.6, 0.9] * 10, [0.3, 0.6, 0.9] * 10, binary=False)
    assert (same.delta, same.low, same.high, same.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_paired_compare_edges():
    empty = paired_compare([None, 1], [0, None], binary=True)
    assert empty.n == 0 and math.isnan(empty.delta) and empty.p_value == 1.0
    assert math.isnan(noninferiority_upper_drop(empty, one_sided_confidence=0.95))
    with pytest.raises(ValueError, match="length"):
        paired_compare([1, 0], [1], binary=True)


def test_noninferiority_upper_drop():
    ref = [1] * 50 + [0] * 50
    cand = [1] * 42 + [0] * 8 + [1] * 6 + [0] * 44  # candidate 2 points worse
    cmp = paired_compare(ref, cand, binary=True, confidence=0.90)
    # one-sided 95% is the matching tail of the two-sided 90% interval
    assert noninferiority_upper_drop(cmp, one_sided_confidence=0.95) == pytest.approx(-cmp.low)
    at_90 = noninferiority_upper_drop(cmp, one_sided_confidence=0.90)
    at_99 = noninferiority_upper_drop(cmp, one_sided_confidence=0.99)
    assert -cmp.delta < at_90 < at_99  # the bound sits above the observed drop and grows with confidence
    # a comparison without bootstrap deltas supports only its own interval's level
    bare = dataclasses.replace(cmp)
    assert noninferiority_upper_drop(bare, one_sided_confidence=0.95) == -cmp.low
    with pytest.raises(ValueError, match="no bootstrap sample"):
        noninferiority_upper_drop(bare, one_sided_confidence=0.99)
    hand = PairedComparison(-0.02, -0.05, 0.01, 0.3, "mcnemar", 100, 8, 6, 0.95)
    assert noninferiority_upper_drop(hand, one_sided_confidence=0.975) == 0.05


def test_paired_sample_size_connor():
    # Connor (1987): z_.95 = 1.644854, z_.80 = 0.841621, psi = 0.15, delta = 0.02
    # (1.644854 * sqrt(0.15) + 0.841621 * sqrt(0.15 - 0.0004))^2 / 0.0004 = 2316.37 -> 2317
    assert paired_sample_size(0.02, 0.15) == 2317
    assert paired_sample_size(0.05, 0.15) < paired_sample_size(0.02, 0.15)
    assert paired_sample_size(0.02, 0.15, power=0.9) > 2317
    for bad in [dict(drop=0.15, discordance=0.15), dict(drop=0.0, discordance=0.1),
                dict(drop=0.02, discordance=1.5), dict(drop=0.02, discordance=0.15, power=1.0)]:
        with pytest.raises(ValueError):
            paired_sample_size(**bad)

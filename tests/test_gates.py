"""Every gate kind at its boundaries: equality, NaN and invalid scores, no pairs, both sides with
`confidence:`, exact thresholds; gates are pure functions of the scores, so no model is needed."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
from helpers import suite_of

from evalkit.config.gate import Gate
from evalkit.config.suite import Suite
from evalkit.config.task import JudgeTask
from evalkit.gates import Scores, evaluate_gate, evaluate_gates
from evalkit.record.types import CheckRecord
from evalkit.stats.intervals import clopper_pearson
from evalkit.stats.paired import holm, paired_compare, tango_upper_drop


def scores(values, binary=True, key=("t", "m", "lora")):
    return {key: Scores(tuple(values), binary)}


def gate(**kw) -> Gate:
    return Gate(name=kw.pop("id", None), metric=kw.pop("metric", "t.m"), **kw)


def drop_gate(cmp, **kw):
    g = gate(vs="base", **kw)
    return evaluate_gate(g, "lora", {}, {("t", "m", "lora", "base"): cmp}, [])


def pairs(lost, gained, same_right, same_wrong=0, invalid_losses=0):
    """Reference / candidate 0-1 lists with the given paired counts; `invalid_losses` cases the
    reference got right and the candidate has no valid score for."""
    ref = [1] * lost + [0] * gained + [1] * same_right + [0] * same_wrong + [1] * invalid_losses
    cand = [0] * lost + [1] * gained + [1] * same_right + [0] * same_wrong + [None] * invalid_losses
    return ref, cand


# ------------------------------------------------------------------------------- min / max

def test_min_point_estimate_is_exact_at_equality():
    g = gate(min=0.14)
    assert evaluate_gate(g, "lora", scores([1] * 7 + [0] * 43), {}, []).passed  # 7/50 == 0.14
    assert not evaluate_gate(g, "lora", scores([1] * 6 + [0] * 44), {}, []).passed


def test_max_point_estimate_and_both_sides():
    assert evaluate_gate(gate(max=0.2), "lora", scores([1] * 10 + [0] * 40), {}, []).passed  # 0.2 <= 0.2
    r = evaluate_gate(gate(max=0.1), "lora", scores([1] * 10 + [0] * 40), {}, [])
    assert not r.passed and r.kind == "max" and "> max 0.1" in r.message
    both = evaluate_gate(gate(min=0.1, max=0.15), "lora", scores([1] * 10 + [0] * 40), {}, [])
    assert not both.passed and both.kind == "max" and both.threshold == 0.15


@pytest.mark.parametrize("side", ["min", "max"])
def test_confidence_sets_the_level_of_the_one_sided_bound(side):
    values = [1] * 40 + [0] * 10
    results = {c: evaluate_gate(gate(**{side: 0.5}, confidence=c), "lora", scores(values), {}, [])
               for c in (0.8, 0.95, 0.99)}
    for c, r in results.items():
        two_sided = clopper_pearson(40, 50, 2 * c - 1)
        assert r.bound == (two_sided.low if side == "min" else two_sided.high)
        assert r.side == ("lower" if side == "min" else "upper") and r.method == "Clopper-Pearson"
        assert f"{c:.0%} one-sided bound (Clopper-Pearson)" in r.message
    assert len({r.bound for r in results.values()}) == 3


def test_min_with_confidence_gates_on_the_bound_not_the_point():
    values = [1] * 42 + [0] * 8  # 84%
    assert evaluate_gate(gate(min=0.8), "lora", scores(values), {}, []).passed
    r = evaluate_gate(gate(min=0.8, confidence=0.95), "lora", scores(values), {}, [])
    assert not r.passed and r.bound < 0.8 < r.value
    hi = evaluate_gate(gate(max=0.9, confidence=0.95), "lora", scores(values), {}, [])
    assert not hi.passed and hi.bound > 0.9


def test_graded_min_uses_the_bootstrap_bound():
    values = [0.7, 0.8, 0.9, 0.75, 0.85] * 10
    r = evaluate_gate(gate(min=0.7, confidence=0.95), "lora", scores(values, binary=False), {}, [])
    assert r.passed and 0.7 < r.bound < r.value and r.method == "bootstrap-t"


def test_invalid_and_nan_scores_are_counted_and_no_valid_score_fails():
    r = evaluate_gate(gate(min=0.5), "lora", scores([1, 1, None, 0]), {}, [])
    assert r.n_invalid == 1 and "1 invalid" in r.message and r.n == 3
    none = evaluate_gate(gate(min=0.0), "lora", scores([None, None]), {}, [])
    assert not none.passed and "no valid results" in none.message and "2 invalid" in none.message
    missing = evaluate_gate(gate(min=0.0), "lora", {}, {}, [])
    assert not missing.passed


# -------------------------------------------------------------------------------- max_drop

def test_zero_discordant_pairs_do_not_prove_a_small_drop():
    cmp = paired_compare(*pairs(0, 0, 40, 10), binary=True)
    r = drop_gate(cmp, max_drop=2, confidence=0.95)
    assert not r.passed and r.bound > 2 and "0 lost / 0 gained" in r.message
    assert drop_gate(cmp, max_drop=0.01).passed  # without confidence: the point estimate, 0 <= 0.01


def test_one_lost_of_114():
    r = drop_gate(paired_compare(*pairs(1, 0, 22, 91), binary=True), max_drop=10, confidence=0.95)
    assert r.passed and 3.5 < r.bound < 4.5
    assert "upper 95% one-sided bound of the drop (Tango score)" in r.message
    assert r.method == "Tango score" and r.side == "upper" and r.n == 114 and r.n_invalid == 0


def test_max_drop_point_estimate_is_exact():
    cmp = paired_compare(*pairs(7, 0, 43), binary=True)  # a drop of exactly 14 points
    r = drop_gate(cmp, max_drop=14)
    assert r.passed and "14.00 pts <= 14" in r.message
    assert not drop_gate(paired_compare(*pairs(8, 0, 42), binary=True), max_drop=14).passed


def test_max_drop_bound_is_strict_and_moves_with_the_level():
    cmp = paired_compare(*pairs(3, 1, 100), binary=True)
    bounds = {c: drop_gate(cmp, max_drop=50, confidence=c).bound for c in (0.8, 0.95, 0.99)}
    assert bounds[0.8] < bounds[0.95] < bounds[0.99]
    u = tango_upper_drop(3, 1, 104, 0.95) * 100
    assert not drop_gate(cmp, max_drop=u, confidence=0.95).passed  # bound == margin: not below it
    assert drop_gate(cmp, max_drop=u + 1e-6, confidence=0.95).passed


def test_a_candidate_whose_regressions_are_all_invalid_fails():
    ref, cand = pairs(0, 0, 30, 50, invalid_losses=20)  # every would-be loss is an unreadable output
    dropped = paired_compare(ref, cand, binary=True)  # the old behaviour: delta +0.00, PASS
    assert dropped.delta == 0 and drop_gate(dropped, max_drop=10, confidence=0.95).passed
    counted = paired_compare(ref, cand, binary=True, invalid_as_loss=True)
    r = drop_gate(counted, max_drop=10, confidence=0.95)
    assert not r.passed and counted.n_ref_only == 20 and r.n_invalid == 20
    assert "20 invalid (20 scored as losses)" in r.message


def test_no_pairs_fails():
    r = drop_gate(paired_compare([None, 1], [1, None], binary=True), max_drop=5, confidence=0.95)
    assert not r.passed and "no paired results" in r.message and "2 pairs had an invalid score" in r.message
    assert not drop_gate(None, max_drop=5).passed


def test_graded_max_drop():
    ref = [0.6, 0.7, 0.8, 0.9] * 25
    cand = [v - 0.02 for v in ref]  # every case 2 points lower
    cmp = paired_compare(ref, cand, binary=False)
    assert drop_gate(cmp, max_drop=5, confidence=0.95).passed
    assert not drop_gate(cmp, max_drop=1.5, confidence=0.95).passed
    assert drop_gate(cmp, max_drop=2).passed  # 2.00 <= 2 within the documented tolerance


# ------------------------------------------------------------------ max_invalid, all invalid, checks

def test_max_invalid_point_and_bound():
    s = scores([1] * 45 + [None] * 5)
    assert evaluate_gate(gate(max_invalid=0.1), "lora", s, {}, []).passed  # 5/50 == 0.1
    assert not evaluate_gate(gate(max_invalid=0.09), "lora", s, {}, []).passed
    r = evaluate_gate(gate(max_invalid=0.15, confidence=0.95), "lora", s, {}, [])
    assert not r.passed and r.bound == clopper_pearson(5, 50, 0.9).high and r.n_invalid == 5


def _suite(invalid: str, gates=()) -> Suite:
    task = JudgeTask.model_construct(name="t", kind="judge", invalid=invalid)
    task._line = 7
    return suite_of(Path("s.yml"), tasks=(task,), gates=gates)


def test_a_metric_with_every_score_invalid_fails_unless_the_task_drops_invalid():
    sc = {("t", "m", "base"): Scores((0.5, 1.0), False), ("t", "m", "lora"): Scores((None, None), False)}
    results = evaluate_gates(_suite("loss"), sc, {}, [])
    assert [(r.id, r.passed, r.kind) for r in results] == [("t.m.valid[lora]", False, "all_invalid")]
    assert "all 2 scores" in results[0].message and results[0].line == 7
    assert evaluate_gates(_suite("drop"), sc, {}, []) == []


def test_check_gates():
    checks = [CheckRecord(name="adapter_active", variant="lora", passed=True, message="ok")]
    g = Gate(check="adapter_active")
    assert evaluate_gates(_suite("loss", [g]), {}, {}, checks)[0].passed
    missing = evaluate_gates(_suite("loss", [Gate(check="merge_equivalence", variant="lora")]), {}, {}, checks)
    assert [r.passed for r in missing] == [False] and "did not run" in missing[0].message


# ------------------------------------------------------------- what a run rules out (record + console)

def test_the_record_states_the_drop_each_comparison_rules_out_at_its_gates_level():
    from evalkit.assemble import comparison_records
    from evalkit.report.data import excludes_line

    gates = [Gate(metric="t.m", vs="base", max_drop=10, confidence=0.99)]
    suite = _suite("loss", gates)
    one_lost = paired_compare(*pairs(1, 0, 22, 91), binary=True)
    records = comparison_records(suite, {("t", "m", "lora", "base"): one_lost,
                                          ("t", "other", "lora", "base"): one_lost,
                                          ("t", "gain", "lora", "base"): paired_compare(*pairs(0, 20, 10), binary=True),
                                          ("t", "all", "lora", "base"): paired_compare([1] * 5, [0] * 5, binary=True)})
    gated, other, gain, lost_all = records
    assert gated.excludes_level == 0.99 and other.excludes_level == 0.95  # the gate's level, else 95%
    assert gated.excludes_drop == one_lost.upper_drop(0.99)
    assert excludes_line(other) == (
        f"t.other lora vs base: with 114 cases and 1 discordant pair, this run excludes a drop of "
        f"{math.ceil(one_lost.upper_drop(0.95) * 1e4) / 100:.2f} pts or more at 95% (Tango score, one-sided)")
    assert "rules out any drop at 95%: lora is at least" in excludes_line(gain)
    assert "rules out no drop at 95%" in excludes_line(lost_all)
    # Holm: the markers account for every comparison of the run
    assert [r.p_holm for r in records] == pytest.approx(holm([r.p_value for r in records]))


def test_both_sides_with_confidence_record_the_failing_sides_bound():
    r = evaluate_gate(gate(min=0.5, max=0.7, confidence=0.95), "lora", scores([1] * 40 + [0] * 10), {}, [])
    assert not r.passed and r.kind == "max" and r.side == "upper"
    assert r.bound == clopper_pearson(40, 50, 0.9).high

"""Gate evaluation: pure functions of the per-case scores, the paired comparisons and the checks.

Every gate with `confidence: c` is a one-sided test at level c on the bound the gate names: `min:`
needs the lower c-bound of the metric at or above the threshold, `max:` the upper one at or below,
`max_drop:` the upper c-bound of the drop strictly below the margin (non-inferiority), and
`max_invalid:` the upper c-bound of the invalid rate at or below it. Without `confidence:` the
point estimate is compared, exactly for 0/1 metrics (as fractions of counts, never through
rounded floats) and within GRADED_TOLERANCE otherwise.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from evalkit.config.gate import Gate
from evalkit.config.suite import Suite, gate_targets
from evalkit.config.task import Task
from evalkit.formatting import fmt_number
from evalkit.record.types import CheckRecord, GateRecord
from evalkit.stats.intervals import clopper_pearson, mean_bound, metric_interval
from evalkit.stats.paired import PairedComparison

# Graded point estimates are means of floats: equal to a threshold up to summation rounding.
GRADED_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Scores:
    """One metric of one variant: each case's value (None = invalid) and whether it is 0/1."""

    values: tuple[float | None, ...]
    binary: bool

    @property
    def valid(self) -> list[float]:
        return [v for v in self.values if v is not None]

    @property
    def n_invalid(self) -> int:
        return len(self.values) - len(self.valid)


def exact(x: float) -> Fraction:
    """The number as written in the suite (0.8 is 4/5, not the binary float nearest to it)."""
    return Fraction(repr(float(x)))


_fmt = functools.partial(fmt_number, spec=".4g")
_pct = functools.partial(fmt_number, spec=".2f", scale=100)


def evaluate_gates(suite: Suite, scores: Mapping[tuple[str, str, str], Scores],
                   comparisons: Mapping[tuple[str, str, str, str], PairedComparison],
                   checks: list[CheckRecord]) -> list[GateRecord]:
    """The suite's gates, one result per (gate, target variant), then one failing result per metric
    whose every score is invalid (unless its task says `invalid: drop`)."""
    results = []
    for gate in suite.gates:
        for variant in gate_targets(gate, suite):  # never empty: the suite refuses such a gate
            result = evaluate_gate(gate, variant, scores, comparisons, checks)
            if not (gate.is_implicit and result.skipped):  # a default gate gates what its check could check
                results.append(result)
    tasks = {t.name: t for t in suite.tasks}
    for (task, metric, variant), s in scores.items():
        if s.values and not s.valid and tasks[task].invalid == "loss":
            results.append(_all_invalid(tasks[task], metric, variant, len(s.values)))
    return results


def evaluate_gate(gate: Gate, variant: str, scores: Mapping[tuple[str, str, str], Scores],
                  comparisons: Mapping[tuple[str, str, str, str], PairedComparison],
                  checks: list[CheckRecord]) -> GateRecord:
    """The record of `gate` on one variant; the helpers below give its outcome fields."""
    def record(**outcome: Any) -> GateRecord:
        return GateRecord(id=f"{gate.id}[{variant}]", metric=gate.metric, check=gate.check, variant=variant,
                          vs=gate.vs, confidence=gate.confidence, line=gate.line, **outcome)

    if gate.check:
        found = [c for c in checks if c.name == gate.check and c.variant == variant]
        if not found:
            return record(kind="check", passed=False,
                          message=f"check '{gate.check}' did not run for variant '{variant}'")
        return record(kind="check", passed=found[0].passed, message=found[0].message, skipped=found[0].skipped)
    assert gate.metric is not None  # metric xor check
    task, _, metric = gate.metric.partition(".")
    if gate.max_drop is not None:
        cmp = comparisons.get((task, metric, variant, gate.vs)) if gate.vs is not None else None
        return record(**_max_drop(gate, variant, cmp))
    s = scores.get((task, metric, variant))
    if gate.max_invalid is not None:
        return record(**_max_invalid(gate, variant, s))
    return record(**_min_max(gate, variant, s))


def _max_drop(gate: Gate, variant: str, cmp: PairedComparison | None) -> dict[str, Any]:
    assert gate.max_drop is not None  # a max_drop gate
    out: dict[str, Any] = {"kind": "max_drop", "threshold": gate.max_drop}
    if cmp is None or cmp.n == 0:
        why = f"; {cmp.n_invalid} pairs had an invalid score" if cmp is not None and cmp.n_invalid else ""
        return out | {"passed": False,
                      "message": f"no paired results for {variant} vs {gate.vs} on {gate.metric}{why}"}
    drop = -cmp.delta
    counts = (f"{cmp.n_ref_only:g} lost / {cmp.n_cand_only:g} gained" if cmp.test == "tango"
              else f"{cmp.n_nonzero} differ")
    invalid = f", {cmp.n_invalid} invalid" + (f" ({cmp.n_invalid_as_loss} scored as losses)"
                                              if cmp.n_invalid_as_loss else "")
    out |= {"value": cmp.delta, "low": cmp.low, "high": cmp.high, "p_value": cmp.p_value, "n": cmp.n,
            "n_invalid": cmp.n_invalid, "method": cmp.method,
            "interval_confidence": cmp.confidence}
    head = (f"{gate.metric} {variant} vs {gate.vs}: delta {cmp.delta * 100:+.2f} pts "
            f"[{cmp.low * 100:+.2f}, {cmp.high * 100:+.2f}] ({cmp.method}, {cmp.confidence:.0%}), "
            f"p={cmp.p_value:.3g}, n={cmp.n} ({counts}{invalid})")
    if gate.confidence is not None:
        bound = cmp.upper_drop(gate.confidence) * 100
        passed = bound < gate.max_drop
        how = (f"upper {gate.confidence:.0%} one-sided bound of the drop ({cmp.method}) {bound:.2f} pts "
               f"{'<' if passed else '>='} {gate.max_drop:g}")
        return out | {"bound": bound, "side": "upper", "passed": bool(passed), "message": f"{head}; {how}"}
    if cmp.test == "tango":  # exactly, as counts: (lost - gained) / n * 100 <= max_drop
        assert cmp.n_ref_only is not None and cmp.n_cand_only is not None  # tango sets both
        passed = Fraction(int(cmp.n_ref_only - cmp.n_cand_only) * 100, cmp.n) <= exact(gate.max_drop)
    else:
        passed = drop * 100 <= gate.max_drop + GRADED_TOLERANCE
    how = f"drop {_pct(drop)} pts {'<=' if passed else '>'} {gate.max_drop:g} (point estimate, no confidence)"
    return out | {"passed": bool(passed), "message": f"{head}; {how}"}


def _min_max(gate: Gate, variant: str, s: Scores | None) -> dict[str, Any]:
    kind = "min" if gate.min is not None else "max"
    if s is None or not s.valid:
        n_inv = f" ({s.n_invalid} invalid)" if s is not None and s.n_invalid else ""
        return {"kind": kind, "passed": False, "n_invalid": s.n_invalid if s else None,
                "message": f"no valid results for {gate.metric} on variant '{variant}'{n_inv}"}
    valid = s.valid
    iv = metric_interval(valid, binary=s.binary)
    method = "Clopper-Pearson" if s.binary else "bootstrap-t"
    parts, verdicts = [], []  # verdicts: (kind, threshold, passed, bound or None)
    for side, limit in (("lower", gate.min), ("upper", gate.max)):
        if limit is None:
            continue
        at_least = side == "lower"
        if gate.confidence is not None:
            v = bound = mean_bound(valid, gate.confidence, side=side, binary=s.binary)
            ok = v >= limit if at_least else v <= limit
            what = f"{side} {gate.confidence:.0%} one-sided bound ({method}) {_fmt(v)}"
        elif s.binary:  # k / n against the threshold as written, in exact fractions
            bound = None
            ok = (Fraction(int(sum(valid)), len(valid)) >= exact(limit) if at_least
                  else Fraction(int(sum(valid)), len(valid)) <= exact(limit))
            what = f"{_fmt(iv.value)}"
        else:
            bound = None
            ok = iv.value >= limit - GRADED_TOLERANCE if at_least else iv.value <= limit + GRADED_TOLERANCE
            what = f"{_fmt(iv.value)}"
        op = (">=" if ok else "<") if at_least else ("<=" if ok else ">")
        parts.append(f"{what} {op} {'min' if at_least else 'max'} {limit:g}")
        verdicts.append(("min" if at_least else "max", limit, ok, bound))
    failed = [v for v in verdicts if not v[2]]
    kind, threshold, _, bound = (failed or verdicts)[0]  # the record shows the failing side, if any
    msg = (f"{gate.metric} {variant} = {_fmt(iv.value)} [{_fmt(iv.low)}, {_fmt(iv.high)}] "
           f"(n={iv.n}, {s.n_invalid} invalid); " + "; ".join(parts))
    return {"kind": kind, "threshold": threshold, "value": iv.value, "low": iv.low, "high": iv.high,
            "interval_confidence": iv.confidence, "bound": bound, "method": method if gate.confidence else None,
            "side": ("lower" if kind == "min" else "upper") if gate.confidence else None,
            "n": iv.n, "n_invalid": s.n_invalid, "passed": not failed, "message": msg}


def _max_invalid(gate: Gate, variant: str, s: Scores | None) -> dict[str, Any]:
    assert gate.max_invalid is not None  # a max_invalid gate
    out: dict[str, Any] = {"kind": "max_invalid", "threshold": gate.max_invalid}
    if s is None or not s.values:
        return out | {"passed": False, "message": f"no results for {gate.metric} on variant '{variant}'"}
    k, n = s.n_invalid, len(s.values)
    out |= {"value": k / n, "n": n, "n_invalid": k}
    if gate.confidence is not None:
        bound = clopper_pearson(k, n, 2 * gate.confidence - 1).high
        passed = bound <= gate.max_invalid
        how = f"upper {gate.confidence:.0%} one-sided bound (Clopper-Pearson) {_fmt(bound)}"
        out |= {"bound": bound, "side": "upper", "method": "Clopper-Pearson"}
    else:
        passed, how = Fraction(k, n) <= exact(gate.max_invalid), f"{_fmt(k / n)}"
    msg = (f"{gate.metric} {variant}: {k} of {n} scores invalid; invalid rate {how} "
           f"{'<=' if passed else '>'} max_invalid {gate.max_invalid:g}")
    return out | {"passed": bool(passed), "message": msg}


def _all_invalid(task: Task, metric: str, variant: str, n: int) -> GateRecord:
    """A metric with no valid score says nothing; silence would read as a pass (`nan`, exit 0)."""
    return GateRecord(id=f"{task.name}.{metric}.valid[{variant}]", metric=f"{task.name}.{metric}", variant=variant,
                      line=task.line, kind="all_invalid", n=0, n_invalid=n, passed=False,
                      message=(f"all {n} scores of {task.name}.{metric} for '{variant}' are invalid: the task "
                               f"measured nothing (set `invalid: drop` on the task to report this without failing)"))


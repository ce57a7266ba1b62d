"""Gate evaluation: pure functions of the aggregated metrics, comparisons and checks."""
from __future__ import annotations

from typing import Any

from evalkit.config.suite import Gate, Suite
from evalkit.stats import PairedComparison, noninferiority_upper_drop


def gate_targets(gate: Gate, suite: Suite) -> list[str]:
    """`variant:` when given, else every non-base variant (never the one compared against)."""
    if gate.variant:
        return [gate.variant]
    return [v.name for v in suite.variants if not v.is_base and v.name != gate.vs]


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None or x != x:
        return "n/a"
    return f"{x * 100:.1f}%" if pct else f"{x:.4g}"


def evaluate_gates(suite: Suite, metrics: dict[tuple[str, str, str], dict[str, Any]],
                   comparisons: dict[tuple[str, str, str, str], PairedComparison],
                   checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    results = []
    for gate in suite.gates:
        targets = gate_targets(gate, suite)
        if gate.check and not gate.variant:
            # a check gate covers the variants its check applies to (merge_equivalence: merged
            # ones), not every variant; one that ran for none is a misconfigured gate: fail
            targets = list(dict.fromkeys(c["variant"] for c in checks if c["name"] == gate.check)) or ["*"]
        for variant in targets:
            results.append(_one(gate, variant, metrics, comparisons, checks))
    return results


def _one(gate: Gate, variant: str, metrics, comparisons, checks) -> dict[str, Any]:
    base = {"id": f"{gate.id}[{variant}]", "metric": gate.metric, "check": gate.check, "variant": variant,
            "vs": gate.vs, "confidence": gate.confidence, "line": gate.line, "threshold": None, "value": None,
            "low": None, "high": None, "p_value": None}
    if gate.check:
        found = [c for c in checks if c["name"] == gate.check and c["variant"] == variant]
        if not found:
            return base | {"kind": "check", "passed": False,
                           "message": f"check '{gate.check}' did not run for variant '{variant}'"}
        c = found[0]
        return base | {"kind": "check", "passed": bool(c["passed"]), "message": c.get("message", "")}
    task, _, metric = gate.metric.partition(".")
    if gate.max_drop is not None:
        cmp = comparisons.get((task, metric, variant, gate.vs))
        if cmp is None or cmp.n == 0:
            return base | {"kind": "max_drop", "threshold": gate.max_drop, "passed": False,
                           "message": f"no paired results for {variant} vs {gate.vs} on {gate.metric}"}
        drop_pts = -cmp.delta * 100
        if gate.confidence is not None:
            bound = noninferiority_upper_drop(cmp, one_sided_confidence=gate.confidence) * 100
            passed = bound < gate.max_drop
            how = f"upper {gate.confidence:.0%} bound of the drop {bound:.2f} pts {'<' if passed else '>='} {gate.max_drop:g}"
        else:
            bound, passed = drop_pts, drop_pts <= gate.max_drop
            how = f"drop {drop_pts:.2f} pts {'<=' if passed else '>'} {gate.max_drop:g}"
        msg = (f"{gate.metric} {variant} vs {gate.vs}: delta {cmp.delta * 100:+.2f} pts "
               f"[{cmp.low * 100:+.2f}, {cmp.high * 100:+.2f}], p={cmp.p_value:.3g} ({cmp.test}, n={cmp.n}); {how}")
        return base | {"kind": "max_drop", "threshold": gate.max_drop, "value": -drop_pts / 100,
                       "low": cmp.low, "high": cmp.high, "p_value": cmp.p_value, "passed": bool(passed),
                       "message": msg}
    m = metrics.get((task, metric, variant))
    if m is None or not m["n"]:
        return base | {"kind": "min" if gate.min is not None else "max", "passed": False,
                       "message": f"no valid results for {gate.metric} on variant '{variant}'"}
    # with `confidence`, the whole interval must clear the threshold, not just the point estimate
    checks_ = []
    if gate.min is not None:
        v = m["low"] if gate.confidence is not None else m["value"]
        checks_.append(("min", gate.min, v >= gate.min, f"{'lower bound ' if gate.confidence else ''}{_fmt(v)} {'>=' if v >= gate.min else '<'} min {gate.min:g}"))
    if gate.max is not None:
        v = m["high"] if gate.confidence is not None else m["value"]
        checks_.append(("max", gate.max, v <= gate.max, f"{'upper bound ' if gate.confidence else ''}{_fmt(v)} {'<=' if v <= gate.max else '>'} max {gate.max:g}"))
    passed = all(c[2] for c in checks_)
    kind, threshold = (checks_[0][0], checks_[0][1]) if passed or checks_[0][2] is False else (checks_[-1][0], checks_[-1][1])
    msg = (f"{gate.metric} {variant} = {_fmt(m['value'])} [{_fmt(m['low'])}, {_fmt(m['high'])}] (n={m['n']}); "
           + "; ".join(c[3] for c in checks_))
    return base | {"kind": kind, "threshold": threshold, "value": m["value"], "low": m["low"], "high": m["high"],
                   "passed": bool(passed), "message": msg}

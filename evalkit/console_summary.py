"""The console summary of a run: what `evalkit run` prints once the record is written.

Metrics per task and variant with their intervals and paired deltas against the reference, the
canaries' breakdowns where a variant differs, the judge's noise, the comparison with a promoted
baseline, failed checks, the gate table and the verdict line (report.html holds everything).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evalkit.formatting import fmt_number, listed

if TYPE_CHECKING:
    from evalkit.record import RunRecord


def _num(x: Any, pct: bool = True) -> str:
    """A share as a percent (else a plain number), by formatting's one rule for missing values."""
    return fmt_number(x, "5.1f", scale=100) if pct else fmt_number(x, ".3g")


def print_summary(record: RunRecord, run_dir: Path) -> None:
    """Metrics per task and variant with intervals and paired deltas, then the gate table."""
    from evalkit.report.data import excludes_line, ruled_out

    ref = record.reference
    cmp = {(c.task, c.metric, c.variant): c for c in record.comparisons if c.vs == ref}
    width = max([14] + [len(v.name) for v in record.variants])
    print(f"\n{record.suite.name}: {len(record.variants)} variant(s) on base {record.base.ref}")
    for task in record.tasks:
        if task.kind == "drift":
            print(f"\n  task {task.name} (drift, {task.n_cases} passages)   mean per passage [95% CI]")
            _print_drift(record, task.name, task.extras.get("vs"), width)
        else:
            print(f"\n  task {task.name} ({task.kind}, {task.n_cases} cases)   value % [95% CI]   "
                  f"delta vs {ref} (pts) [95% CI] p")
        for m in [m for m in record.metrics if m.task == task.name and task.kind != "drift"]:
            c = cmp.get((m.task, m.metric, m.variant))
            delta = ""
            if c and c.delta is not None:
                assert c.low is not None and c.high is not None  # set with delta
                mark = " *" if c.significant else ""
                counts = f" ({c.n_ref_only} lost / {c.n_cand_only} gained)" if c.n_ref_only is not None else ""
                delta = (f"{c.delta * 100:+6.1f} [{c.low * 100:+.1f}, {c.high * 100:+.1f}] "
                         f"p={c.p_value:.3g}{mark}{counts}")
            inv = f" ({m.n_invalid} invalid)" if m.n_invalid else ""
            print(f"    {m.metric:<16} {m.variant:<{width}} {_num(m.value)} "
                  f"[{_num(m.low)}, {_num(m.high)}]   {delta}{inv}")
        for c in ruled_out(record):
            if c.task == task.name:
                print(f"    {excludes_line(c)}")
        for what, table in (("subject", task.extras.get("per_subject")), ("lm-eval task", task.extras.get("per_task"))):
            if isinstance(table, dict) and table:
                _print_changed(what, table, ref)
        judge = task.extras.get("judge")  # the judge task's extras
        if judge:
            print("    " + _judge_noise(judge))
    if record.baseline is not None:
        _print_vs_baseline(record)
    for check in record.checks:
        if not check.passed:  # gated or not: a failed check is worth a look
            print(f"\n  check {check.name}[{check.variant}] FAILED: {check.message}")
    if record.gates:
        print("\n  gates:")
        _print_gates(record)
    if any(c.significant for c in record.comparisons):
        print(f"\n  * significant at 5% after Holm's adjustment over the run's "
              f"{len(record.comparisons)} comparisons")
    print(f"\n{verdict_line(record)}   (run folder: {run_dir})")


def verdict_line(record: RunRecord) -> str:
    """PASS only when some gate was checked, with the gates each variant got: a gate that applied
    to nothing cannot read as a pass."""
    n_fail = sum(not g.passed for g in record.gates)
    n_skip = sum(bool(g.skipped) for g in record.gates)
    n_pass = len(record.gates) - n_fail - n_skip
    if not record.gates:
        return "NO GATES: nothing was checked (the suite has no gates; scores are in the report)"
    per_variant = Counter(g.variant for g in record.gates if not g.skipped)
    skipped = f", {n_skip} skipped" if n_skip else ""
    if not per_variant:
        return f"NOTHING CHECKED: all {n_skip} gates were skipped"
    verdict = "PASS" if record.verdict == "pass" else "FAIL"
    counts = set(per_variant.values())
    each = (f"{counts.pop()} on each of {len(per_variant)} variants" if len(per_variant) > 4 and len(counts) == 1
            else ", ".join(f"{v} {n}" for v, n in per_variant.items()))
    return f"{verdict}: {n_pass} passed, {n_fail} failed{skipped} ({each})"


def _print_vs_baseline(record: RunRecord) -> None:
    """Each candidate against the promoted variant, paired per case, one line per metric."""
    b = record.baseline
    assert b is not None  # called for runs with a baseline
    p = b.promotion
    print(f"\n  vs {b.name}: '{p.variant}' of run {p.run_id} (bundle {p.bundle}, promoted {p.promoted_at[:16]} "
          f"by {p.by}); {b.cases} cases paired, {b.dropped} dropped")
    for d in b.differences:
        print(f"    differs: {d}")
    drift = {t.name for t in record.tasks if t.kind == "drift"}  # KL, ratios: not shares, not in points
    for c in (c for c in record.comparisons if c.vs == b.name):
        name = f"{c.task}.{c.metric}"
        if c.delta is None:
            print(f"    {name:<28} {c.variant:<12} no paired cases")
            continue
        assert c.low is not None and c.high is not None  # set with delta
        counts = f" ({c.n_ref_only} lost / {c.n_cand_only} gained)" if c.n_ref_only is not None else ""
        delta = (f"{c.delta:+.3g} [{c.low:+.3g}, {c.high:+.3g}]" if c.task in drift else
                 f"{c.delta * 100:+6.1f} [{c.low * 100:+.1f}, {c.high * 100:+.1f}] pts")
        print(f"    {name:<28} {c.variant:<12} {delta} p={c.p_value:.3g} n={c.n}{counts}")


def _print_drift(record: RunRecord, task: str, vs: Any, width: int) -> None:
    """One line per variant: mean KL from its reference (with its interval), top-1 agreement and
    the perplexity ratio; a reference itself (0, 100%, x1 by definition) is left out."""
    values = {(m.metric, m.variant): m for m in record.metrics if m.task == task}
    labels = vs if isinstance(vs, dict) else {}
    for v in dict.fromkeys(m.variant for m in record.metrics if m.task == task):
        kl, agree, ratio = (values.get((k, v)) for k in ("kl", "top1_agreement", "ppl_ratio"))
        label = labels.get(v, "its base, when promoted" if record.baseline and v == record.baseline.name else "?")
        if label in ("itself", v) or kl is None:
            continue
        print(f"    {v:<{width}} KL {_num(kl.value, False)} [{_num(kl.low, False)}, {_num(kl.high, False)}] "
              f"nats/token vs {label}   top-1 agreement {_num(agree.value if agree else None).strip()}%   "
              f"perplexity x{fmt_number(ratio.value if ratio else None, '.3f')}")


def _print_changed(what: str, table: dict[str, Any], ref: str) -> None:
    """A canary's breakdown (per subject, per lm-eval task), only the rows where some variant's value
    differs from the reference's: the whole table is in report.html."""
    def value(cell: Any) -> Any:
        return cell.get("value", cell.get("accuracy")) if isinstance(cell, dict) else None

    names = [n for n in table if isinstance(table[n], dict)]
    rows = sorted({r for n in names for r in table[n]})
    changed = [r for r in rows if any(value(table[n].get(r)) != value(table.get(ref, {}).get(r)) for n in names)]
    print(f"    {what}s where a variant differs from {ref}: {len(changed)} of {len(rows)} (all in report.html)")
    if changed:
        print("      " + f"{what:<36}" + "".join(f"{n[:12]:>13}" for n in names))
    for r in changed:
        print("      " + f"{r[:36]:<36}" + "".join(f"{_num(value(table[n].get(r))):>13}" for n in names))


def _print_gates(record: RunRecord) -> None:
    """A failing gate with its whole message; the passing results of a gate on one line, with the
    variants they cover (each message is in report.html, summary.md and junit.xml)."""
    passed: dict[str, list[str]] = {}
    for g in record.gates:
        if g.passed and not g.skipped:
            passed.setdefault(g.id.removesuffix(f"[{g.variant}]"), []).append(g.variant)
    for gate, variants in passed.items():
        print(f"    PASS  {gate:<40} {listed(variants)}")
    for g in record.gates:
        if g.skipped:
            print(f"    SKIP  {g.id:<40} {g.skipped}")
    for g in record.gates:
        if not g.passed:
            print(f"    FAIL  {g.id:<40} {g.message}")


def _judge_noise(j: dict[str, Any]) -> str:
    """How far to trust a judge: its calls, invalid verdicts, flip rate over k samples, position
    bias in pairwise mode, and agreement with the human-labelled anchors."""
    def rates(by_variant: dict[str, float | None]) -> str:
        return ", ".join(f"{v} {_num(r).strip()}%" for v, r in by_variant.items() if r is not None)

    parts = [f"judge {j['model']}: {j['calls']} calls ({j['cached']} cached), {j['invalid']} invalid"]
    if flips := rates(j.get("flip_rate") or {}):
        parts.append(f"flip rate over {j['samples']} samples: {flips}")
    if bias := rates(j.get("position_bias_rate") or {}):
        parts.append(f"position bias (orders disagree): {bias}")
    anchors = j.get("anchors")
    if anchors:
        parts.append(f"anchors: accuracy {_num(anchors['accuracy']).strip()}%, kappa {_num(anchors['kappa'], False)} "
                     f"(n={anchors['n']})")
    endpoint = j.get("endpoint")
    if endpoint:
        parts.append(f"weights {endpoint['fingerprint'][:12]}" if j.get("endpoint_verified") else
                     f"{endpoint['base_url']} lists no content fingerprint for '{endpoint['id']}': weights "
                     "unverified (cached verdicts keyed on URL + name only)")
    probe = (j.get("seeds") or {}).get("probe")
    if probe == "ignored":
        parts.append(f"the endpoint ignores seeds: verdicts at temperature {j['temperature']} are not reproducible")
    elif probe and probe not in ("honoured", "not needed at temperature 0"):
        parts.append(f"seed support unknown ({probe})")
    return "; ".join(parts)

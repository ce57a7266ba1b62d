"""What an adapter's training recorded (its provenance), against this evaluation: eval cases in
its training data (`no_leakage`), an unhealthy training run (`training_health`), and training
prompts unlike the eval's (`length_match`); the statistics are `evalkit.pitfalls`'."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from evalkit.checks.common import Log, gate_for, provenance, skipped, tolerance
from evalkit.config.gate import HEALTH_MAX_EVAL_RISE, HEALTH_MAX_GAP, HEALTH_MIN_LOSS_DROP, LENGTH_MAX_SHIFT
from evalkit.config.task import CasesTask
from evalkit.record.types import CheckRecord
from evalkit.types import Case

if TYPE_CHECKING:
    from evalkit.context import RunContext
    from evalkit.pitfalls import LengthMatch


def leakage(ctx: RunContext, log: Log) -> list[CheckRecord]:
    """Eval cases that also appear in an adapter's training data, through `leakage.adapter_overlap`
    on the index its trainer stored in its provenance, counted as cases (a case may match several
    training rows). An adapter whose training data is unknown (no provenance, or an index made with
    another normalization) gets a skipped record with the reason."""
    from evalkit.leakage import NORMALIZATION, adapter_overlap
    from evalkit.tasks.generation import task_cases

    cases: dict[str, list[Case]] = {task.name: task_cases(task) for task in ctx.suite.tasks
                                    if isinstance(task, CasesTask)}
    records = []
    for lv in ctx.variants:
        if lv.info is None:
            continue
        prov, why = provenance(lv)
        if prov and adapter_overlap((), prov) is None:
            why = (f"the provenance of '{lv.name}' has no training-data index made with normalization "
                       f"{NORMALIZATION} (retrain it: `evalkit train RECIPE --force`)")
        if why:
            records.append(skipped("no_leakage", lv.name, why))
            continue
        leaked: dict[str, dict[str, list[str]]] = {}  # task -> eval case -> the training rows it matches
        for task, rows in cases.items():
            for case_id, train_id in adapter_overlap(rows, prov) or ():
                leaked.setdefault(task, {}).setdefault(case_id, []).append(train_id)
        msg = "; ".join(_leak_text(task, found, len(cases[task]), lv.name) for task, found in leaked.items()) \
            or f"none of {sum(map(len, cases.values()))} eval cases appears in the training data"
        if leaked:
            log(f"FAIL: no_leakage [{lv.name}]: {msg}")
        records.append(CheckRecord(name="no_leakage", variant=lv.name, passed=not leaked, message=msg, details={
            "leaked_cases": {task: len(found) for task, found in leaked.items()},
            "overlaps": [{"task": task, "case_id": case_id, "train_id": train_id}
                         for task, found in leaked.items() for case_id, ids in found.items() for train_id in ids]}))
    return records


def _leak_text(task: str, found: dict[str, list[str]], n: int, variant: str) -> str:
    shown = ", ".join(f"{case_id} (train {', '.join(ids[:3])}{' ...' if len(ids) > 3 else ''})"
                      for case_id, ids in list(found.items())[:5])
    rows = sum(map(len, found.values()))
    return (f"{task}: {len(found)} of {n} eval cases also in the training data of '{variant}'"
            + (f" ({rows} training rows match)" if rows != len(found) else "")
            + f": {shown}{' ...' if len(found) > 5 else ''}")


def training_health(ctx: RunContext, log: Log) -> list[CheckRecord]:
    """An adapter's training, read from its provenance's per-step log: eval loss that turned up
    while train loss fell (overfitting, with the step it turned), a train/eval gap, NaN/inf
    losses, a train loss that barely fell, a learning rate that never left warmup. With early
    stopping the saved adapter is the best checkpoint, so the log is read up to that step."""
    records = []
    for lv in ctx.variants:
        if lv.info is None:
            continue
        prov, why = provenance(lv)
        if why:
            records.append(skipped("training_health", lv.name, why))
            continue
        record = health_record(
            lv.name, prov or {},
            max_eval_rise=tolerance(ctx, "training_health", lv.name, "max_eval_rise", HEALTH_MAX_EVAL_RISE),
            max_gap=tolerance(ctx, "training_health", lv.name, "max_gap", HEALTH_MAX_GAP),
            min_loss_drop=tolerance(ctx, "training_health", lv.name, "min_loss_drop", HEALTH_MIN_LOSS_DROP))
        if not record.passed:
            log(f"FAIL: training_health [{lv.name}]: {record.message}")
        records.append(record)
    return records


def health_record(variant: str, prov: dict[str, Any], *, max_eval_rise: float, max_gap: float,
                  min_loss_drop: float | None, min_points: int | None = None) -> CheckRecord:
    """training_health on one adapter's provenance (bench/bench_checks.py calls it directly:
    `min_points=2, min_loss_drop=None` is the rule before issue 30)."""
    from evalkit.pitfalls import MIN_TREND_POINTS, health_summary
    from evalkit.pitfalls import training_health as health

    steps = prov.get("log")
    if not (isinstance(steps, list) and all(isinstance(e, dict) and "step" in e for e in steps)):
        return skipped("training_health", variant, f"the provenance of '{variant}' has no per-step loss log")
    kept = (prov.get("early_stopping") or {}).get("best_step")
    if isinstance(kept, int):
        steps = [e for e in steps if e["step"] <= kept]
    peak = ((prov.get("recipe") or {}).get("training") or {}).get("learning_rate")
    passed, findings, details = health(
        steps, peak_lr=peak if isinstance(peak, int | float) else None, max_eval_rise=max_eval_rise, max_gap=max_gap,
        min_loss_drop=min_loss_drop, min_points=MIN_TREND_POINTS if min_points is None else min_points)
    msg = "; ".join(findings + details["notes"]) if findings else health_summary(details)
    if isinstance(kept, int):
        msg += f" (early stopping kept the checkpoint of step {kept} of {prov.get('steps')})"
        details["early_stopping_step"] = kept
    return CheckRecord(name="training_health", variant=variant, passed=passed, message=msg, details=details)


def length_match(ctx: RunContext, log: Log) -> list[CheckRecord]:
    """Each adapter's training prompt lengths (tokens, recorded in its provenance) against each
    generating task's prompts as rendered here: the two-sample Kolmogorov-Smirnov test (level
    1 - the gate's `confidence:`, default 95%) for whether they differ, the relative shift of
    their quantiles for how much (`max_shift:`, default 25%), and the quantiles side by side. A
    model tuned on short prompts and evaluated (or deployed) on long ones is outside what it
    learned; one tuned on 58-token prompts and evaluated on 55-token ones is not."""
    from evalkit.tasks.generation import task_cases

    tasks = [task for task in ctx.suite.tasks if isinstance(task, CasesTask)]
    lengths: dict[str, list[int]] = {}  # rendered on first need: most runs have no adapter to compare
    records = []
    for lv in ctx.variants:
        if lv.info is None or not tasks:
            continue
        prov, why = provenance(lv)
        train = ((prov or {}).get("data") or {}).get("prompt_tokens")
        if prov and not (isinstance(train, list) and train and all(isinstance(n, int) for n in train)):
            why = (f"the provenance of '{lv.name}' records no training prompt lengths (trained before they "
                       f"were recorded: `evalkit train RECIPE --force`)")
        if why:
            records.append(skipped("length_match", lv.name, why))
            continue
        assert isinstance(train, list)  # not skipped
        lengths = lengths or {task.name: [len(ctx.render(c).ids) for c in task_cases(task)]
                              for task in tasks}
        gate = gate_for(ctx, "length_match", lv.name)
        record = length_record(lv.name, train, lengths, level=(gate.confidence if gate else None) or 0.95,
                               max_distance=tolerance(ctx, "length_match", lv.name, "max_distance", 0.0),
                               max_shift=tolerance(ctx, "length_match", lv.name, "max_shift", LENGTH_MAX_SHIFT))
        if not record.passed:
            log(f"FAIL: length_match [{lv.name}]: {record.message}")
        records.append(record)
    return records


def length_record(variant: str, train: list[int], lengths: dict[str, list[int]], *, level: float,
                  max_distance: float, max_shift: float | None) -> CheckRecord:
    """length_match of one adapter's training prompt lengths against each task's (bench/bench_checks.py
    calls it directly: `max_shift=None` is the rule before issue 30, significance alone)."""
    from evalkit.pitfalls import length_match as compare

    per_task = {task: compare(train, n, alpha=1 - level, max_distance=max_distance, max_shift=max_shift)
                for task, n in lengths.items()}
    msg = "; ".join(_length_text(task, m, level, max_distance, max_shift) for task, m in per_task.items())
    return CheckRecord(name="length_match", variant=variant, passed=all(m.passed for m in per_task.values()),
                       message=msg, details={"confidence": level, "max_distance": max_distance, "max_shift": max_shift,
                                             "tasks": {t: dataclasses.asdict(m) for t, m in per_task.items()}})


def _length_text(task: str, m: LengthMatch, level: float, far: float, max_shift: float | None) -> str:
    """Both numbers, whichever decided: whether the lengths differ (KS) and by how much (the shift)."""
    tq, eq = m.train_quantiles, m.eval_quantiles
    text = (f"{task}: train p50 {tq['p50']:g} [p10 {tq['p10']:g}, p90 {tq['p90']:g}] vs eval p50 {eq['p50']:g} "
            f"[p10 {eq['p10']:g}, p90 {eq['p90']:g}] tokens; KS distance {m.distance:.3f}, p={m.p_value:.3g}, "
            f"largest shift {m.shift:.0%} (at {m.shift_at})")
    if not m.significant:
        return text + f": no difference at {1 - level:.0%}"
    if max_shift is not None and m.shift <= max_shift:
        return text + f": significant at {1 - level:.0%} but small (shift <= max_shift {max_shift:.0%})"
    if m.distance <= far:
        return text + f": significant at {1 - level:.0%} but small (distance <= max_distance {far:g})"
    return text + (f": differ at {1 - level:.0%}"
                   + (f", shift > max_shift {max_shift:.0%}" if max_shift is not None else "")
                   + (f", distance > max_distance {far:g}" if far else ""))

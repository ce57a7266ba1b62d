"""An adapter that no longer stops (`stops_generating`): its outputs cut at max_new_tokens against
its reference's, paired on the same cases."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from evalkit.checks.common import Log, gate_for, tolerance
from evalkit.config.gate import STOPS_MAX_INCREASE
from evalkit.record.types import CheckRecord

if TYPE_CHECKING:
    from evalkit.context import RunContext
    from evalkit.pitfalls import Runaway
    from evalkit.tasks.base import TaskResult


def stops_generating(ctx: RunContext, results: dict[str, TaskResult], log: Log) -> list[CheckRecord]:
    """Each variant's outputs cut at max_new_tokens against its reference's (the base, or the
    gate's `vs:`) on the same cases of every generating task, paired: an adapter that lost its end
    of turn (EOS masked out of the loss, a dataset without it) runs on where the base stopped,
    and exact match may not show it. On by default for generation tasks (`max_increase:` points)."""
    from evalkit.pitfalls import runaway

    base = next((lv.name for lv in ctx.variants if lv.variant.is_base), None)
    cut = {name: {(s.variant, s.case_id): s.meta["finish_reason"] == "length" for s in tr.samples
                  if s.meta.get("finish_reason")} for name, tr in results.items()}
    records = []
    for lv in ctx.variants:
        gate = gate_for(ctx, "stops_generating", lv.name)
        ref = (gate.vs if gate else None) or base
        if ref is None or ref == lv.name:
            continue
        limit = tolerance(ctx, "stops_generating", lv.name, "max_increase", STOPS_MAX_INCREASE)
        level = gate.confidence if gate else None
        per_task = {}
        for task, outs in cut.items():
            ids = [c for v, c in outs if v == lv.name and (ref, c) in outs]
            if ids:
                per_task[task] = runaway([outs[lv.name, c] for c in ids], [outs[ref, c] for c in ids],
                                         max_increase=limit, confidence=level)
        if not per_task:
            continue
        passed = all(r.passed for r in per_task.values())
        msg = "; ".join(_runaway_text(task, ref, r, limit, level) for task, r in per_task.items())
        if not passed:
            log(f"FAIL: stops_generating [{lv.name}]: {msg}")
        records.append(CheckRecord(name="stops_generating", variant=lv.name, passed=passed, message=msg, details={
            "vs": ref, "max_increase": limit, "confidence": level,
            "tasks": {task: dataclasses.asdict(r) for task, r in per_task.items()}}))
    return records


def _runaway_text(task: str, ref: str, r: Runaway, limit: float, level: float | None) -> str:
    if level is None:
        how = f"{r.increase:+.1f} pts {'<=' if r.passed else '>'} max_increase {limit:g} (point estimate)"
    else:
        how = (f"upper {level:.0%} one-sided bound {r.bound:.2f} pts {'<' if r.passed else '>='} "
               f"max_increase {limit:g}")
    return (f"{task}: {r.variant_cut}/{r.n} outputs cut at max_new_tokens ({r.variant_cut / r.n:.0%}) vs "
            f"{r.reference_cut}/{r.n} ({r.reference_cut / r.n:.0%}) for {ref}: {r.ran_on} ran on where {ref} "
            f"stopped, {r.stopped} the reverse, {r.increase:+.1f} pts [{r.low:+.1f}, {r.high:+.1f}], "
            f"p={r.p_value:.3g}; {how}")

"""The run record from a finished run: per-case values into metrics with intervals, paired
comparisons against the reference (Holm-adjusted across the run), gates, and the samples' lines."""
from __future__ import annotations

import time
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from evalkit import __version__
from evalkit.baseline.pairing import Joined
from evalkit.config.suite import Suite
from evalkit.config.task import Task
from evalkit.context import RunContext, RunVariant
from evalkit.gates import Scores, evaluate_gates, gate_targets
from evalkit.models.adapters import AdapterInfo
from evalkit.models.base import file_sha256
from evalkit.record.types import (
    BaseRecord,
    CacheStats,
    CheckRecord,
    ComparisonRecord,
    Cost,
    MetricRecord,
    Rendering,
    RunRecord,
    SuiteRecord,
    TaskRecord,
    VariantRecord,
)
from evalkit.record.versions import SCHEMA_VERSION
from evalkit.runlog import environment
from evalkit.stats.intervals import metric_interval
from evalkit.stats.paired import PairedComparison, holm, paired_compare
from evalkit.tasks.base import SampleResult, TaskResult


def assemble(suite: Suite, ctx: RunContext, infos: dict[str, AdapterInfo], results: dict[str, TaskResult],
             checks: list[CheckRecord], started: float, renderings: dict[str, Rendering], joined: Joined | None = None
             ) -> tuple[RunRecord, list[dict[str, Any]]]:
    """The run record (metrics with intervals, paired comparisons, gates) and the samples' lines."""
    values: dict[tuple[str, str, str], dict[str, float | None]] = defaultdict(dict)  # (task, metric, variant) -> case -> v
    samples: list[dict[str, Any]] = []
    for tname, tr in results.items():
        for s in tr.samples:
            for metric, score in s.scores.items():
                v = score.value
                values[(tname, metric, s.variant)][s.case_id] = None if v is None or v != v else v  # NaN is invalid
            samples.append(_sample_record(s))
    scores = {k: Scores(tuple(per_case.values()), results[k[0]].binary.get(k[1], False))
              for k, per_case in values.items()}
    metrics = []
    for (tname, metric, variant), sc in scores.items():
        iv = metric_interval(sc.valid, binary=sc.binary)
        metrics.append(MetricRecord(task=tname, metric=metric, variant=variant, value=iv.value, low=iv.low,
                                    high=iv.high, n=iv.n, n_invalid=sc.n_invalid, method=iv.method,
                                    confidence=iv.confidence))
    comparisons = _comparisons(suite, results, values)
    gates = evaluate_gates(suite, scores, comparisons, checks)
    if joined is not None and suite.baseline_mismatch == "intersect":
        gates = [joined.with_counts(g) for g in gates]
    assert suite.reference is not None  # set by validator
    record = RunRecord(
        schema_version=SCHEMA_VERSION, evalkit_version=__version__,
        run_id=f"{suite.name}-{datetime.fromtimestamp(started).strftime('%Y%m%d-%H%M%S')}",
        started_at=datetime.fromtimestamp(started, UTC).isoformat(),
        finished_at=datetime.now(UTC).isoformat(), duration_s=round(time.time() - started, 3),
        status="complete",
        suite=SuiteRecord(name=suite.name, path=str(suite.path), sha256=file_sha256(suite.path)),
        config=dict(suite.raw), environment=environment(ctx.device),
        base=BaseRecord(ref=suite.base.ref, kind=suite.base.kind, sha256=ctx.base.sha256),
        reference=suite.reference,
        variants=tuple(_variant_record(lv, ctx) for lv in ctx.variants) + ((joined.variant,) if joined else ()),
        tasks=tuple(TaskRecord(name=t, kind=suite_task(suite, t).kind, n_cases=len({s.case_id for s in tr.samples}),
                               binary=tr.binary, invalid=suite_task(suite, t).invalid, extras=tr.extras,
                               settings=suite_task(suite, t).settings(), rendering=renderings.get(t))
                    for t, tr in results.items()),
        metrics=tuple(metrics),
        comparisons=tuple(comparison_records(suite, comparisons)),
        gates=tuple(gates), checks=tuple(checks), verdict="pass" if all(g.passed for g in gates) else "fail",
        cache=CacheStats(hits=ctx.cache.hits, misses=ctx.cache.misses,
                         path=str(ctx.cache.path) if ctx.cache.path else None),
        baseline=joined.record if joined else None,
    )
    return record, samples


def suite_task(suite: Suite, name: str) -> Task:
    return next(t for t in suite.tasks if t.name == name)


def _comparisons(suite: Suite, results: dict[str, TaskResult], values) -> dict[tuple[str, str, str, str], Any]:
    """Paired comparisons of every variant against the reference, and for every `vs:` a gate names,
    over the cases both sides have; a candidate's invalid score is a loss unless `invalid: drop`."""
    reference = suite.reference
    assert reference is not None  # set by validator
    pairs = {(v.name, reference) for v in suite.variants if v.name != reference}
    if suite.baseline is not None:  # every candidate against what is in production
        pairs |= {(v.name, suite.baseline.name) for v in suite.variants if not v.is_base}
    pairs |= {(var, g.vs) for g in suite.gates if g.vs for var in gate_targets(g, suite) if var != g.vs}
    out = {}
    for (tname, metric, variant), cand in values.items():
        for cv, ref_name in pairs:
            if cv != variant or (tname, metric, ref_name) not in values:
                continue
            ref = values[(tname, metric, ref_name)]
            ids = [i for i in cand if i in ref]
            out[(tname, metric, variant, ref_name)] = paired_compare(
                [ref[i] for i in ids], [cand[i] for i in ids], binary=results[tname].binary.get(metric, False),
                invalid_as_loss=suite_task(suite, tname).invalid == "loss")
    return out


def comparison_records(suite: Suite, comparisons: dict[tuple[str, str, str, str], PairedComparison]
                        ) -> list[ComparisonRecord]:
    """Each comparison with its Holm-adjusted p (across every comparison of the run: the report's
    significance markers) and the drop it rules out, at the level of the gate on it (else 95%)."""
    adjusted = holm([c.p_value for c in comparisons.values()])
    levels = {(g.metric, v, g.vs): g.confidence for g in suite.gates if g.max_drop is not None and g.confidence
              for v in gate_targets(g, suite)}
    out = []
    for ((task, metric, variant, vs), c), p_holm in zip(comparisons.items(), adjusted):
        level = levels.get((f"{task}.{metric}", variant, vs), 0.95)
        out.append(ComparisonRecord(
            task=task, metric=metric, variant=variant, vs=vs, delta=c.delta, low=c.low, high=c.high,
            p_value=c.p_value, p_holm=p_holm, p_exact=c.p_exact, test=c.test, method=c.method, n=c.n,
            n_ref_only=_count(c.n_ref_only), n_cand_only=_count(c.n_cand_only), n_nonzero=c.n_nonzero,
            n_invalid=c.n_invalid, n_invalid_as_loss=c.n_invalid_as_loss, confidence=c.confidence,
            significant=bool(c.n and p_holm < 1 - c.confidence),
            excludes_drop=c.upper_drop(level) if c.n else None, excludes_level=level))
    return out


def _count(x: float | None) -> int | None:
    """A pair count the statistics keep as a float (a sum of 0/1 differences)."""
    return None if x is None else round(x)


def _variant_record(lv: RunVariant, ctx: RunContext) -> VariantRecord:
    v = lv.variant
    return VariantRecord(name=v.name, adapter=str(v.adapter) if v.adapter else None,
                         adapter_sha256=lv.info.sha256 if lv.info else None, quantize=v.quantize, merge=v.merge,
                         merge_into=v.merge_target, is_dora=bool(lv.info and lv.info.is_dora),
                         fingerprint=lv.fingerprint, provenance=lv.info.provenance if lv.info else None,
                         cost=Cost.from_counters(ctx.counters(lv)), backend=lv.backend.record(lv.name),
                         trial=v.trial)


def _sample_record(s: SampleResult) -> dict[str, Any]:
    return {"task": s.task, "variant": s.variant, "case_id": s.case_id, "prompt": s.prompt, "output": s.output,
            "target": s.target, "scores": {k: {"value": v.value, "reason": v.reason} for k, v in s.scores.items()},
            "cached": s.cached, "meta": dict(s.meta)}

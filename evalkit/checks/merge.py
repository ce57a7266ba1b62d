"""A merged variant against its unmerged twin (`merge_equivalence`): logits on probe prompts and
task cases, and the task scores, paired."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from evalkit.backends.base import PROBES, InProcess, token_ids
from evalkit.checks.common import Log, case_prompts, logit_diff, tolerance
from evalkit.config.task import GenerateTask
from evalkit.record.types import CheckRecord

if TYPE_CHECKING:
    from torch import Tensor

    from evalkit.context import RunContext, RunVariant
    from evalkit.tasks.base import SampleResult, TaskResult


def merge_equivalence(ctx: RunContext, results: dict[str, TaskResult], log: Log) -> list[CheckRecord]:
    """Merged variant vs its unmerged twin on probe prompts and task cases (max |logit diff|, top-1
    agreement at every position) and on the task scores (paired deltas, reported). A merge into a
    full-precision base matches its twin to fp32 noise; a merge into a 4-bit base re-quantizes
    the merged weights and fails."""
    merged = [lv for lv in ctx.variants if lv.variant.merge]
    if not merged:
        return []
    probes, cases = list(PROBES), case_prompts(ctx, limit=8)
    twin_logits: dict[str, list[Tensor]] = {}  # qlora-merged and qlora-merged-4bit share one twin
    records = []
    for lv in merged:
        tol = tolerance(ctx, "merge_equivalence", lv.name, "max_abs_logit_diff", 1e-3)
        min_agree = tolerance(ctx, "merge_equivalence", lv.name, "min_top1_agreement", 0.99)
        twin = _unmerged_twin(ctx, lv)
        if twin.name not in twin_logits:
            twin_logits[twin.name] = _in_process(twin).logits(twin.name, token_ids(ctx.tokenizer, probes + cases))
        a, b = _in_process(lv).logits(lv.name, token_ids(ctx.tokenizer, probes + cases)), twin_logits[twin.name]
        max_abs, agree = logit_diff(a, b)
        per_set = {"probes": logit_diff(a[:len(probes)], b[:len(probes)])}
        if cases:
            per_set["task_cases"] = logit_diff(a[len(probes):], b[len(probes):])
        scores = _score_deltas(ctx, results, lv, twin)
        passed = max_abs <= tol and agree >= min_agree
        where = "; ".join(f"{k} ({n}): {d:.3g} / {g:.1%}" for (k, (d, g)), n in
                          zip(per_set.items(), (len(probes), len(cases))))
        msg = (f"'{lv.name}' vs unmerged '{twin.name}': max |logit diff| {max_abs:.3g} "
               f"({'<=' if max_abs <= tol else '>'} {tol:g}), top-1 agreement {agree:.1%} "
               f"({'>=' if agree >= min_agree else '<'} {min_agree:.0%}) [{where}]")
        if scores:
            msg += "; paired score deltas " + ", ".join(
                f"{k} {c['delta']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]" for k, c in scores.items())
        log(("" if passed else "FAIL: ") + f"merge_equivalence: {msg}")
        records.append(CheckRecord(
            name="merge_equivalence", variant=lv.name, passed=passed, message=msg,
            details={"twin": twin.name, "merge_into": lv.variant.merge_target, "quantize": lv.variant.quantize,
                     "max_abs_logit_diff": max_abs, "top1_agreement": agree, "tolerance": tol,
                     "min_top1_agreement": min_agree,
                     **{f"{k}_max_abs_logit_diff": d for k, (d, _) in per_set.items()},
                     **{f"{k}_top1_agreement": g for k, (_, g) in per_set.items()},
                     "score_deltas": scores, "n_prompts": len(probes) + len(cases)}))
    return records


def _in_process(lv: RunVariant) -> InProcess:
    """A merged variant's backend, or its twin's: in process (the suite refuses a merge elsewhere,
    and `_unmerged_twin` picks an in-process twin)."""
    backend = lv.backend
    assert isinstance(backend, InProcess), f"variant '{lv.name}' does not run in process"
    return backend


def _score_deltas(ctx: RunContext, results: dict[str, TaskResult], lv: RunVariant,
                  twin: RunVariant) -> dict[str, dict[str, Any]]:
    """Paired task-score deltas merged - unmerged. A twin that is not a suite variant is generated
    and scored here (cached like any variant) for generation tasks."""
    from evalkit.stats.paired import paired_compare
    from evalkit.tasks import generation

    out = {}
    for task in ctx.suite.tasks:
        tr = results.get(task.name)
        if tr is None:
            continue
        twin_samples: list[SampleResult] = [s for s in tr.samples if s.variant == twin.name]
        if not twin_samples and isinstance(task, GenerateTask):
            cases = generation.task_cases(task)
            twin_samples = generation.score_outputs(
                task, twin.name, cases, ctx.generate(twin, cases, task.generation, desc=f"{task.name} (twin)"))
        for metric, binary in tr.binary.items():
            a = {s.case_id: s.scores[metric].value for s in tr.samples if s.variant == lv.name and metric in s.scores}
            b = {s.case_id: s.scores[metric].value for s in twin_samples if metric in s.scores}
            ids = [i for i in a if i in b]
            if ids:
                c = paired_compare([b[i] for i in ids], [a[i] for i in ids], binary=binary)
                out[f"{task.name}.{metric}"] = {"delta": c.delta, "low": c.low, "high": c.high,
                                                "p_value": c.p_value, "n": c.n}
    return out


def _unmerged_twin(ctx: RunContext, lv: RunVariant) -> RunVariant:
    """The same adapter, unmerged, on the base precision the merge started from: the quantized
    base for a QLoRA adapter (dequantize-then-merge must reproduce it), else the full one. A suite
    variant that is that, in process, else a twin attached to the in-process backend."""
    assert lv.info is not None  # a merged variant has an adapter
    for other in ctx.variants:
        if (other.info is not None and not other.variant.merge and other.info.sha256 == lv.info.sha256
                and other.variant.quantize == lv.variant.quantize and isinstance(other.backend, InProcess)):
            return other
    return ctx.attach_twin(lv)

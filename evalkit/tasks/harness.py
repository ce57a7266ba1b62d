"""Task kind `lm_eval`: any lm-eval task as a forgetting canary, run through evalkit's backends.

lm-eval builds the requests and computes each document's metrics, from its registry, a task YAML
or a generated config (the `mmlu` kind is a preset of this one); the tasks are found and sliced by
`evalkit.tasks.harness_tasks`. The model side is `BackendLM` (`evalkit.tasks.harness_lm`), an
lm-eval `LM` over a run variant, cached per request and run wherever the variant runs. Each
document (`evalkit.tasks.harness_results`) becomes one evalkit sample whose scores are lm-eval's
per-sample metrics, so variants are compared per document with evalkit's paired statistics;
lm-eval's own aggregate numbers are recorded beside them.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from evalkit.config.canary import LmEvalTask
from evalkit.tasks.base import SampleResult, TaskResult
from evalkit.tasks.harness_lm import backend_lm, refuse_sampling, simple_evaluate
from evalkit.tasks.harness_results import Document, aggregate_numbers, documents
from evalkit.tasks.harness_tasks import load_tasks, resolve_specs, seeded_indices, slice_sizes, task_manager
from evalkit.types import Score

if TYPE_CHECKING:
    from evalkit.context import RunContext


# ---------------------------------------------------------------- running a canary for every variant

@dataclass
class Canary:
    """What a canary found: per variant, its documents and lm-eval's own numbers."""

    documents: dict[str, list[Document]] = field(default_factory=dict)
    lm_eval: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    computed: dict[str, set[str]] = field(default_factory=dict)  # variant -> case ids the cache could not answer
    seconds: dict[str, float] = field(default_factory=dict)


def run_canary(ctx: RunContext, name: str, build: Callable[[], list[Any]], *, batch_size: int,
               task_manager: Any = None, samples: Mapping[str, list[int]] | None = None,
               unit: str = "documents", **evaluate_args: Any) -> Canary:
    """Every variant through lm-eval on the tasks `build()` makes (fresh per variant: lm-eval keeps
    per-run state on its Task objects), on the documents `samples` picks (default: all)."""
    out = Canary()
    for lv in ctx.variants:
        lm = backend_lm(ctx, lv, batch_size=batch_size, desc=name)
        t0 = time.perf_counter()
        results = simple_evaluate(lm, build(), task_manager, samples=dict(samples) if samples else None,
                                  **evaluate_args)
        wall = time.perf_counter() - t0
        docs = documents(results)
        # lm-eval numbers a sliced task's requests by position in the slice, its samples by document
        computed = {f"{t}/{samples[t][i] if samples else i}" for t, i in lm.computed}
        out.documents[lv.name], out.lm_eval[lv.name] = docs, aggregate_numbers(results)
        out.computed[lv.name] = {d.case_id for d in docs} & computed
        out.seconds[lv.name] = wall
        if computed:
            n = len(out.computed[lv.name])
            ctx.count(lv.name, cases=n)
            ctx.log(f"{name} [{lv.name}]: {n} {unit} through lm-eval in {wall:.1f} s ({wall / n:.3f} s each)"
                    + (f", {len(docs) - n} reused from cache" if len(docs) > n else ""))
        else:
            ctx.log(f"{name}: {lv.name} answers reused from cache ({len(docs)} {unit})")
    return out


def check_tasks(task: LmEvalTask) -> list[str]:
    """Before any training or model load: every listed task exists (data is loaded by `run`)."""
    return resolve_specs(task.tasks, task_manager(task.tasks), task.where("tasks"))


def run(ctx: RunContext, task: LmEvalTask) -> TaskResult:
    """`kind: lm_eval`: the tasks' seeded slice, scored by every variant, one sample per document."""
    seed = ctx.suite.seed if task.seed is None else task.seed
    tm = task_manager(task.tasks)
    specs = resolve_specs(task.tasks, tm, task.where("tasks"))
    loaded = load_tasks(specs, tm, task.where("tasks"))
    for name, t in loaded.items():
        if t.config.output_type == "generate_until":
            refuse_sampling(name, t.config.generation_kwargs, task.where("tasks"))
    counts, slice_info = slice_sizes(task, {n: len(t.eval_docs) for n, t in loaded.items()}, seed, ctx.log)
    samples = {n: seeded_indices(len(loaded[n].eval_docs), k, seed, n) for n, k in counts.items()}
    canary = run_canary(ctx, task.name, lambda: list(load_tasks(specs, tm, task.where("tasks")).values()),
                        batch_size=task.batch_size, task_manager=tm, samples=samples, fewshot_random_seed=seed,
                        num_fewshot=task.num_fewshot)
    result_samples = [_sample(task.name, v, d, d.case_id not in canary.computed[v])
                      for v, docs in canary.documents.items() for d in docs]
    return TaskResult(samples=result_samples, binary=_binary(result_samples), extras={
        "lm_eval_tasks": sorted(counts), "per_task": {v: _per_task(docs) for v, docs in canary.documents.items()},
        "lm_eval": canary.lm_eval, "computed": {v: len(c) for v, c in canary.computed.items()},
        "seconds": canary.seconds, "slice": slice_info, "num_fewshot": task.num_fewshot})


def _sample(task: str, variant: str, d: Document, cached: bool) -> SampleResult:
    meta: dict[str, Any] = {"lm_eval_task": d.task, "doc_id": d.doc_id}
    if d.loglikelihoods is not None:
        meta["loglikelihoods"] = list(d.loglikelihoods)
    if d.filtered:
        meta["filtered"] = {k: str(v) for k, v in d.filtered.items()}
    return SampleResult(task=task, variant=variant, case_id=d.case_id, prompt=d.prompt, output=d.output,
                        target=d.target, scores={m: Score(v) for m, v in d.metrics.items()}, cached=cached, meta=meta)


def _binary(samples: Sequence[SampleResult]) -> dict[str, bool]:
    """A metric is 0/1 when every document's value is (acc, exact_match), graded otherwise."""
    out: dict[str, bool] = {}
    for s in samples:
        for m, score in s.scores.items():
            out[m] = out.get(m, True) and score.value in (0.0, 1.0)
    return out


def _per_task(docs: Sequence[Document]) -> dict[str, dict[str, Any]]:
    """{lm-eval task: {n, metric, value, metrics}} for one variant (the breakdown the console shows
    where it changed and the report draws whole); `metric` is the task's first, its headline."""
    sums: dict[str, dict[str, list[float]]] = {}
    for d in docs:
        for m, v in d.metrics.items():
            sums.setdefault(d.task, {}).setdefault(m, []).append(v)
    out: dict[str, dict[str, Any]] = {}
    for t, metrics in sums.items():
        means = {m: sum(v) / len(v) for m, v in metrics.items()}
        headline = next(iter(means))
        out[t] = {"n": len(metrics[headline]), "metric": headline, "value": means[headline], "metrics": means}
    return out

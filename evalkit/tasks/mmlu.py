"""Task kind `mmlu`: the catastrophic-forgetting canary, a preset of `lm_eval` on an MMLU slice.

lm-eval builds the prompts and scores the answers from task configs generated here (lm-eval's
own MMLU template, one task per subject as lm-eval's `mmlu` group has, data passed in memory:
nothing is written to lm-eval's task folder and nothing is downloaded); the slice is stratified
by subject and sized for the gate it serves (`mmlu_data`). Everything else is the `lm_eval`
kind's (`harness`): the variant's backend answers as an lm-eval LM (in process, the four
" A"/" B"/" C"/" D" requests of a question share ONE forward pass), each request is cached as it
finishes (a second run reuses the base's answers, an interrupted canary resumes), and each
question becomes one paired sample.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evalkit.config.canary import MmluTask
from evalkit.errors import ConfigError
from evalkit.tasks import harness, harness_lm, harness_results
from evalkit.tasks.base import SampleResult, TaskResult
from evalkit.tasks.mmlu_data import LETTERS, CanarySlice, Question, load_questions, per_subject_accuracy, plan_slice
from evalkit.types import Score

if TYPE_CHECKING:
    from evalkit.context import RunContext

# lm-eval's tasks/mmlu/default template, verbatim, so numbers compare with lm-eval's `mmlu`.
DOC_TO_TEXT = ("{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
               "D. {{choices[3]}}\nAnswer:")
TASK_PREFIX = "evalkit_mmlu_"


def plan(task: MmluTask, suite_seed: int = 0, base_dir: Path | None = None,
         log: Callable[[str], None] | None = None) -> tuple[CanarySlice, str]:
    """The questions this canary asks (and the few-shot pool), and where they came from."""
    source = task.source if isinstance(task.source, str) else task.source.model_dump(exclude_none=True)
    loaded = load_questions(source, base_dir)
    if loaded.skipped and log is not None:
        log(f"canary: skipped {loaded.skipped} malformed row(s) in {loaded.source}")
    sl = plan_slice(loaded, subjects=task.subjects, per_subject=task.per_subject, detect_drop=task.detect_drop,
                    n_shot=task.n_shot, seed=suite_seed if task.seed is None else task.seed,
                    confidence=task.confidence, power=task.power, discordance=task.discordance, log=log)
    return sl, loaded.source


# ---------------------------------------------------------------- lm-eval task configs

def _description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def _dataset(docs: list[dict[str, Any]], **_: Any) -> Any:
    """lm-eval's `custom_dataset` hook: rows in memory (lm-eval passes its metadata as kwargs)."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def task_configs(questions: Sequence[Question], fewshot: Mapping[str, Sequence[Question]],
                 n_shot: int = 0) -> list[dict[str, Any]]:
    """One lm-eval task config per subject, mirroring lm-eval's mmlu default template; usable
    unchanged with `lm_eval.simple_evaluate(model="hf", tasks=...)` (the equality test does)."""
    by_subject: dict[str, list[Question]] = {}
    for q in questions:
        by_subject.setdefault(q.subject, []).append(q)
    configs = []
    for subject, qs in by_subject.items():
        cfg: dict[str, Any] = {
            "task": TASK_PREFIX + subject, "task_alias": subject,
            "custom_dataset": functools.partial(_dataset, [q.doc() for q in qs]), "test_split": "test",
            "output_type": "multiple_choice", "description": _description(subject),
            "doc_to_text": DOC_TO_TEXT, "doc_to_choice": list(LETTERS), "doc_to_target": "answer",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "num_fewshot": n_shot, "metadata": {"version": 1.0},
        }
        if n_shot:
            shots = list(fewshot.get(subject, ()))[:n_shot]
            if len(shots) < n_shot:
                raise ConfigError(f"subject {subject}: {len(shots)} few-shot examples for n_shot={n_shot}")
            cfg["fewshot_config"] = {"sampler": "first_n", "samples": [q.doc() for q in shots]}
        configs.append(cfg)
    return configs


def simple_evaluate(model: Any, configs: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` on generated configs, as the canary calls it (no task-folder scan)."""
    return harness_lm.simple_evaluate(model, configs, **kwargs)


def records_from_results(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """question id -> {prompt, loglikelihoods, choice, correct}, read from lm-eval's logged samples."""
    return {d.doc["id"]: {"prompt": d.prompt, "loglikelihoods": list(d.loglikelihoods or ()), "choice": d.choice,
                          "correct": bool(d.metrics["acc"])} for d in harness_results.documents(results)}


# ---------------------------------------------------------------- the task kind

def run(ctx: RunContext, task: MmluTask) -> TaskResult:
    """Every variant's answer to every question of the slice, joined by question id."""
    sl, source = plan(task, ctx.suite.seed, ctx.suite.dir, log=ctx.log)
    canary = harness.run_canary(ctx, task.name, lambda: task_configs(sl.questions, sl.fewshot, task.n_shot),
                                batch_size=task.batch_size, unit="questions")
    samples: list[SampleResult] = []
    per_subject: dict[str, Any] = {}
    for variant, docs in canary.documents.items():
        by_id = {d.doc["id"]: d for d in docs}
        for q in sl.questions:
            d = by_id[q.id]
            assert d.choice is not None  # multiple choice
            chosen, answer = LETTERS[d.choice], LETTERS[q.answer]
            samples.append(SampleResult(
                task=task.name, variant=variant, case_id=q.id, prompt=d.prompt, output=chosen, target=answer,
                scores={"accuracy": Score(d.metrics["acc"], reason=f"chose {chosen}, answer {answer}")},
                cached=d.case_id not in canary.computed[variant],
                meta={"subject": q.subject, "loglikelihoods": list(d.loglikelihoods or ())}))
        per_subject[variant] = per_subject_accuracy({q.id: bool(by_id[q.id].metrics["acc"]) for q in sl.questions},
                                                    sl.questions)
    slice_info = {k: v for k, v in sl.info.items() if k in ("per_subject", "detect_drop", "seed", "power_note",
                                                             "n", "needed", "confidence", "power", "discordance",
                                                             "clears_max_drop")}
    computed = {v: len(c) for v, c in canary.computed.items()}
    return TaskResult(samples=samples, binary={"accuracy": True}, extras={
        "question_ids": sl.ids, "per_subject": per_subject, "computed": computed, "source": source,
        "seconds_per_question": {v: canary.seconds[v] / n if n else 0.0 for v, n in computed.items()},
        "n_shot": task.n_shot, "slice": slice_info})

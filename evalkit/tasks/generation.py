"""Generation tasks: jsonl rows (messages or prompt, plus target) -> batched greedy outputs -> scorers."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from evalkit.config.suite import CasesTask, GenerateTask
from evalkit.errors import ConfigError
from evalkit.fileio import iter_jsonl
from evalkit.tasks.base import SampleResult, TaskResult
from evalkit.types import Case, Output, Score

if TYPE_CHECKING:
    from evalkit.context import RunContext


def load_cases(path: Path, limit: int | None = None, *, need_target: str | None = None) -> list[Case]:
    """Read a jsonl dataset; a bad row is reported as FILE:LINE with what is wrong. `need_target`:
    the scorer that compares with each case's target (a row without one is an error)."""
    path = Path(path)
    cases: list[Case] = []
    seen: dict[str, int] = {}  # case id -> its line
    for lineno, row in iter_jsonl(path):
        if not isinstance(row, dict) or not ("messages" in row or "prompt" in row):
            raise ConfigError("each row needs `messages` (a chat) or `prompt`", file=path, line=lineno)
        messages, prompt = row.get("messages"), row.get("prompt")
        if messages is not None and not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages)):
            raise ConfigError("`messages` must be a non-empty list of {role, content} with string values",
                              file=path, line=lineno)
        if messages is None and not isinstance(prompt, str):
            raise ConfigError(f"`prompt` must be a string, not {type(prompt).__name__}", file=path, line=lineno)
        if need_target and row.get("target") is None:
            raise ConfigError(f"no `target`: scorer '{need_target}' compares each output with its case's target",
                              file=path, line=lineno)
        case_id = row.get("id", f"{path.stem}:{lineno}")
        if isinstance(case_id, bool) or not isinstance(case_id, str | int):
            raise ConfigError(f"`id` must be a string or an integer, not {case_id!r}", file=path, line=lineno)
        case_id = str(case_id)
        if case_id in seen:
            raise ConfigError(f"duplicate case id '{case_id}' (first at line {seen[case_id]})", file=path, line=lineno)
        seen[case_id] = lineno
        meta = {k: v for k, v in row.items() if k not in ("id", "messages", "prompt", "target")}
        cases.append(Case(id=case_id, messages=tuple(messages) if messages else None,
                          prompt=prompt if messages is None else None, target=row.get("target"), meta=meta))
        if limit is not None and len(cases) >= limit:
            break
    if not cases:
        raise ConfigError("no cases: the file has no rows", file=path)
    return cases


def task_cases(task: CasesTask, *, limit: int | None = -1) -> list[Case]:
    """A task's cases as the run scores them (the task's `limit` unless another is given)."""
    return load_cases(task.data, task.limit if limit == -1 else limit, need_target=task.target_scorer)


def run(ctx: RunContext, task: GenerateTask) -> TaskResult:
    cases = task_cases(task)
    outputs = ctx.generate_many(ctx.variants, cases, task.generation, desc=task.name)
    samples = [s for lv in ctx.variants for s in score_outputs(task, lv.name, cases, outputs[lv.name])]
    return TaskResult(samples=samples, binary={s.name: s.binary for s in task.scorers},
                      extras={"n_cases": len(cases)})


def score_outputs(task: CasesTask, variant: str, cases: list[Case], outputs: list[tuple[Output, bool]]) -> list[SampleResult]:
    """One variant's (output, was_cached) pairs, scored by the task's scorers."""
    samples = []
    for case, (out, cached) in zip(cases, outputs):
        scores = {s.name: _safe_score(s, case, out) for s in task.scorers}
        samples.append(SampleResult(task=task.name, variant=variant, case_id=case.id, prompt=out.prompt,
                                    output=out.text, target=case.target, scores=scores, cached=cached,
                                    meta={"finish_reason": out.finish_reason, "output_tokens": out.n_output_tokens}))
    return samples


def _safe_score(spec, case: Case, out) -> Score:
    # a scorer bug on one odd output must not sink the whole run: record it as invalid
    try:
        return spec.fn(case, out)
    except ConfigError:
        raise
    except Exception as e:
        return Score(None, f"scorer error: {type(e).__name__}: {e}")

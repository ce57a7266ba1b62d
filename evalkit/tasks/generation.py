"""Generation tasks: jsonl rows (`evalkit.rows`: messages or prompt, plus target or completion) -> batched
greedy outputs -> scorers."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from evalkit.config.task import CasesTask, GenerateTask, ScorerSpec
from evalkit.errors import ConfigError
from evalkit.fileio import iter_jsonl
from evalkit.record.types import Rendering
from evalkit.rows import Template, parse_row
from evalkit.tasks.base import SampleResult, TaskResult
from evalkit.types import Case, Output, Score

if TYPE_CHECKING:
    from evalkit.context import RunContext


def load_cases(path: Path, limit: int | None = None, *, need_target: str | None = None,
               template: Template = "auto") -> list[Case]:
    """Read a jsonl dataset of rows (`evalkit.rows`); a bad row is reported as FILE:LINE with what is
    wrong. `need_target`: the scorer that compares with each case's answer (a row without one is an error)."""
    path = Path(path)
    cases: list[Case] = []
    seen: dict[str, int] = {}  # case id -> its line
    for lineno, raw in iter_jsonl(path):
        try:
            row = parse_row(raw, template)
        except ConfigError as e:
            raise ConfigError(e.message, file=path, line=lineno, hint=e.hint) from None
        if need_target and row.answer is None:
            raise ConfigError(f"no `target` (or `completion`): scorer '{need_target}' compares each output with "
                              "its case's answer", file=path, line=lineno)
        case_id = row.id or f"{path.stem}:{lineno}"
        if case_id in seen:
            raise ConfigError(f"duplicate case id '{case_id}' (first at line {seen[case_id]})", file=path, line=lineno)
        seen[case_id] = lineno
        cases.append(Case(id=case_id, messages=row.messages, prompt=row.prompt, target=row.answer, meta=row.meta))
        if limit is not None and len(cases) >= limit:
            break
    if not cases:
        raise ConfigError("no cases: the file has no rows", file=path)
    return cases


def task_cases(task: CasesTask, *, limit: int | None = -1) -> list[Case]:
    """A task's cases as the run scores them (the task's `limit` unless another is given)."""
    return load_cases(task.data, task.limit if limit == -1 else limit, need_target=task.target_scorer,
                      template=task.template)


def rendering(cases: list[Case]) -> Rendering:
    """How a task's prompts reach the model, as the record says: `chat_template`, `raw` or `mixed`."""
    chats = sum(c.messages is not None for c in cases)
    return "chat_template" if chats == len(cases) else "raw" if chats == 0 else "mixed"


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


def _safe_score(spec: ScorerSpec, case: Case, out: Output) -> Score:
    # a scorer bug on one odd output must not sink the whole run: record it as invalid
    try:
        return spec.fn(case, out)
    except ConfigError:
        raise
    except Exception as e:
        return Score(None, f"scorer error: {type(e).__name__}: {e}")

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


def load_cases(path: Path, limit: int | None = None) -> list[Case]:
    """Read a jsonl dataset; a bad row is reported as FILE:LINE with what is wrong."""
    path = Path(path)
    cases: list[Case] = []
    for lineno, row in iter_jsonl(path):
        if not isinstance(row, dict) or not ("messages" in row or "prompt" in row):
            raise ConfigError("each row needs `messages` (a chat) or `prompt`", file=path, line=lineno)
        messages = row.get("messages")
        if messages is not None and not (isinstance(messages, list) and all(
                isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
            raise ConfigError("`messages` must be a list of {role, content}", file=path, line=lineno)
        case_id = str(row.get("id", f"{path.stem}:{lineno}"))
        meta = {k: v for k, v in row.items() if k not in ("id", "messages", "prompt", "target")}
        cases.append(Case(id=case_id, messages=tuple(messages) if messages else None,
                          prompt=row.get("prompt"), target=row.get("target"), meta=meta))
        if limit is not None and len(cases) >= limit:
            break
    ids = [c.id for c in cases]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ConfigError(f"duplicate case id '{dup}'", file=path)
    return cases


def run(ctx: RunContext, task: GenerateTask) -> TaskResult:
    cases = load_cases(task.data, task.limit)
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

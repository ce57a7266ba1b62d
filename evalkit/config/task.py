"""What every task kind takes (`Task`, and the settings a promoted baseline compares), and the kinds that
generate an answer per case of a data file and score it: `generate` with scorers, `judge` with an LLM judge."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, PlainValidator, ValidationInfo, WithJsonSchema, field_validator, model_validator

from evalkit import scorers
from evalkit.config.endpoint import EndpointSettings
from evalkit.config.generation import DECODER, GenerationConfig
from evalkit.config.judge import JudgeConfig
from evalkit.config.located import Located
from evalkit.errors import ConfigError, fmt_path
from evalkit.rows import TEMPLATE_DOC, Template
from evalkit.shape import existing, invalid, resolve
from evalkit.types import Scorer, stable_hash

# ---------------------------------------------------------------- scorers

@dataclass(frozen=True)
class ScorerSpec:
    name: str
    params: Mapping[str, Any]
    fn: Scorer
    binary: bool
    needs_target: bool = False  # each case must have a `target`


def _scorer(entry: Any, info: ValidationInfo) -> ScorerSpec:
    """`name` or `{name: {params}}` or `{name: value}` (the scorer's primary parameter)."""
    if isinstance(entry, ScorerSpec):
        return entry
    if isinstance(entry, Mapping) and len(entry) == 1:
        name, value = next(iter(entry.items()))
    elif isinstance(entry, str):
        name, value = entry, {}
    else:
        raise invalid("a scorer is a name or a one-key mapping {name: parameters}")
    try:
        sdef = scorers.get(str(name))
        if not isinstance(value, Mapping):
            if sdef.primary is None:
                raise invalid(f"scorer '{name}' takes a mapping of parameters", at=(name,))
            value = {sdef.primary: value}
        fn = scorers.build(str(name), dict(value), resolve(info, "."))
    except ConfigError as e:
        raise invalid(e.message, hint=e.hint) from None
    return ScorerSpec(str(name), dict(value), fn, sdef.binary, sdef.uses_target(value))


ScorerEntry = Annotated[ScorerSpec, PlainValidator(_scorer), WithJsonSchema(
    {"oneOf": [{"type": "string"}, {"type": "object", "minProperties": 1, "maxProperties": 1}],
     "description": "a scorer name, or {name: parameters}"})]


# ---------------------------------------------------------------- tasks

class Task(Located):
    """What every task kind takes; each kind adds its own keys."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    limit: int | None = Field(None, ge=1, description="score the first N cases only")
    batch_size: int = Field(8, ge=1)
    invalid: Literal["loss", "drop"] = Field(
        "loss", description="loss (default): a candidate's invalid score counts as the worst score in paired "
                            "comparisons and a metric with no valid score fails the run; drop: such pairs are "
                            "left out (still counted) and an all-invalid metric does not fail")
    kind: str

    # metrics the kind itself adds to its scorers' (what gates may name)
    kind_metrics: ClassVar[tuple[str, ...]] = ()
    open_metrics: ClassVar[bool] = False  # True: the metrics are only known once the task runs
    # per-case ranges of the metrics that are not in [0, 1] (every scorer's is); None: no bound
    ranges: ClassVar[Mapping[str, tuple[float, float | None]]] = {}

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(s.name for s in getattr(self, "scorers", ())) + self.kind_metrics

    def metric_range(self, metric: str) -> tuple[float, float | None] | None:
        """The range of a metric's per-case values (None: not known before the task runs)."""
        return self.ranges.get(metric, (0.0, 1.0)) if metric in self.metrics else None

    def settings(self) -> dict[str, Any]:
        """What this task's scores depend on besides its cases: every key but those that choose the
        cases (their effect shows in the cases themselves) or only say how they are run. Files count
        by their content, so a promoted baseline pairs across machines and checkouts."""
        return {k: _setting(getattr(self, k)) for k in type(self).model_fields if k not in NOT_SETTINGS}

    def where(self, *sub: str | int) -> str:
        """The YAML path of this task (or of a key inside it) as errors print it: `tasks[2].judge`."""
        return fmt_path(("tasks", self._index, *sub))


# task keys that choose cases, or say how they are run and compared, not what a case scores
NOT_SETTINGS = frozenset({"name", "description", "data", "template", "limit", "batch_size", "invalid", "detect_drop", "seed",
                          "confidence", "power", "discordance", "per_subject", "subjects", "source"})


def _setting(value: Any) -> Any:
    """A setting as plain JSON: files as their sha256, scorers with their bound parameters (a JSON
    Schema file as its content), endpoints without their transport keys (timeouts, retries, keys)."""
    if isinstance(value, Path) or (isinstance(value, str) and value.startswith("/") and Path(value).exists()):
        return {"sha256": _content_sha256(Path(value))} if Path(value).exists() else str(value)
    if isinstance(value, ScorerSpec):
        return {value.name: _setting(dict(getattr(value.fn, "keywords", value.params)))}
    if isinstance(value, EndpointSettings):
        return {k: _setting(getattr(value, k)) for k in type(value).model_fields
                if k not in EndpointSettings.model_fields}
    if isinstance(value, Mapping):
        return {str(k): _setting(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_setting(v) for v in value]
    return value


def _content_sha256(path: Path) -> str:
    """A file's sha256; a folder's over its files' relative names and contents."""
    from evalkit.models.base import file_sha256

    if path.is_file():
        return file_sha256(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return stable_hash([[str(p.relative_to(path)), file_sha256(p)] for p in files])


class CasesTask(Task):
    """Kinds that generate an answer per case of a jsonl file."""

    data: Annotated[Path, existing("data file")] = Field(
        description="jsonl: rows with messages or prompt, plus target or completion (see evalkit.rows)")
    template: Template = Field("auto", description=TEMPLATE_DOC)
    scorers: tuple[ScorerEntry, ...] = Field((), strict=False)
    max_new_tokens: int = Field(64, ge=1)
    stop: tuple[Annotated[str, Field(min_length=1)], ...] = Field((), strict=False)

    @field_validator("scorers")
    @classmethod
    def _once_each(cls, specs: tuple[ScorerSpec, ...]) -> tuple[ScorerSpec, ...]:
        names = [s.name for s in specs]
        for j, n in enumerate(names):
            if names.index(n) != j:
                raise invalid(f"scorer '{n}' listed twice", at=(j,))
        return specs

    @property
    def target_scorer(self) -> str | None:
        """The first scorer that compares with each case's target, if any (its rows need one)."""
        return next((s.name for s in self.scorers if s.needs_target), None)

    @property
    def generation(self) -> GenerationConfig:
        return GenerationConfig(self.max_new_tokens, self.stop, self.batch_size)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "decoder": DECODER}  # outputs of another decoder never pair silently


class GenerateTask(CasesTask):
    kind: Literal["generate"] = "generate"

    @model_validator(mode="after")
    def _scored(self) -> GenerateTask:
        if not self.scorers:
            raise invalid(f"task '{self.name}' has no scorers", hint="add e.g. `scorers: [exact_match]`")
        return self


class JudgeTask(CasesTask):
    """Generate each variant's answers, then have an LLM judge score them."""

    kind: Literal["judge"]
    kind_metrics: ClassVar[tuple[str, ...]] = ("rubric", "pairwise", "anchor_accuracy", "anchor_kappa")
    ranges: ClassVar[Mapping[str, tuple[float, float | None]]] = {"anchor_kappa": (-1.0, 1.0)}

    judge: JudgeConfig
    mode: Literal["rubric", "pairwise"] = "rubric"
    rubric: Annotated[Path | None, existing("rubric file")] = Field(
        None, description="markdown file of criteria, relative to the suite file")
    scale: Annotated[tuple[float, float], Field(strict=False)] | Literal["pass_fail"] = (1.0, 5.0)
    samples: int = Field(1, ge=1, le=25)
    aggregate: Literal["majority", "mean"] = "majority"
    vs: str | None = Field(None, description="pairwise reference variant (default: the suite's reference)")
    anchors: Annotated[Path | None, existing("anchors file")] = Field(
        None, description="jsonl of human-labelled items, relative to the suite file")

    @model_validator(mode="after")
    def _graded(self) -> JudgeTask:
        if self.scale != "pass_fail" and self.scale[0] >= self.scale[1]:
            raise invalid(f"scale must be [min, max] with min < max, got {list(self.scale)}", at=("scale",))
        if self.mode == "rubric" and self.rubric is None:
            raise invalid("a rubric judge task needs `rubric: FILE`")
        return self

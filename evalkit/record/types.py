"""The run record's types: what results.json holds, one frozen dataclass per object.

The runner builds a `RunRecord`; everything that reads a run reads one: report.html, summary.md,
junit.xml, the console summary, the pytest plugin, `evalkit report RUN --baseline OLDER`. Only the
standard library here (the pytest plugin and the report helpers load it). Each field's metadata
(`doc`) is its description in the generated JSON Schema (`evalkit.record.schema`); the open parts
(`config`, task `extras`, variant `provenance`, check `details`) hold whatever the suite, the task
kind, the trainer or the check wrote: readers of those stay defensive.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from evalkit.record.codec import RecordError, decode, to_jsonable, value_kind
from evalkit.record.versions import SCHEMA_VERSION, migrate

Num = float | None  # a number that may not exist (no valid score, not computed); NaN/inf are written as null


def doc(text: str, **schema: Any) -> dict[str, Any]:
    """Field metadata: its description (and extra JSON Schema keywords) for the generated schema."""
    return {"doc": text, "schema": schema}


# ---- the record

@dataclass(frozen=True, kw_only=True)
class SuiteRecord:
    """The suite file the run was made from."""

    name: str
    path: str
    sha256: str


@dataclass(frozen=True, kw_only=True)
class Environment:
    """Where the run ran."""

    python: str
    platform: str
    device: str = field(metadata=doc("where the models ran; none when the cache answered everything"))
    packages: Mapping[str, str | None] = field(metadata=doc("package -> version (null: not installed)"))


@dataclass(frozen=True, kw_only=True)
class BaseRecord:
    """The base model every variant sits on."""

    ref: str
    kind: Literal["gguf", "path", "id"]
    sha256: str


@dataclass(frozen=True, kw_only=True)
class BackendRecord:
    """Where a variant ran: in this process (`hf`), or on a server (`openai`) under a served name."""

    engine: str = field(metadata=doc("hf (transformers + peft in process), openai (an OpenAI-compatible server) or "
                                     "baseline (scores read from a promoted bundle: nothing ran)"))
    endpoints: tuple[str, ...] = field(default=(), metadata=doc("the server's base URLs (replicas)"))
    served_name: str | None = None
    served: Mapping[str, Any] | None = field(default=None, metadata=doc(
        "what the server said it serves: its GET /models entry (id, root, parent, fingerprint) and the "
        "hash of its greedy answers to fixed probe prompts (the variant's cache identity)"))
    server_version: str | None = field(default=None, metadata=doc("GET /version, when the server has it"))
    fallback: str | None = field(default=None, metadata=doc(
        "why a variant meant for a server ran in process instead (`fallback: hf`)"))
    mixed_traffic: Mapping[str, Any] | None = field(default=None, metadata=doc(
        "the mixed-traffic probe: whether answers changed with every variant in flight together, and whether "
        "the run then sent one variant at a time (isolated)"))


@dataclass(frozen=True, kw_only=True)
class TrialRecord:
    """Where a trained variant comes from when one suite entry gave several: a sweep's trial, a kept checkpoint."""

    of: str = field(metadata=doc("the suite's variant (with `sweep:` or `checkpoints:`) this one was trained from"))
    params: Mapping[str, Any] = field(default_factory=dict, metadata=doc(
        "recipe field path -> the value this trial set (empty without a sweep)"))
    step: int | None = field(default=None, metadata=doc("a kept checkpoint's optimizer step (null: the final adapter)"))


@dataclass(frozen=True, kw_only=True)
class Cost:
    """What generating a variant's outputs cost in this run (all null when the cache answered it)."""

    cases: Num = None
    output_tokens: Num = None
    seconds: Num = None
    tokens_per_s: Num = None
    latency_per_case_s: Num = None
    peak_memory_mb: Num = None
    peak_memory_source: Literal["cuda_max_allocated", "cpu_peak_rss", "cpu_maxrss"] | None = field(
        default=None, metadata=doc("see evalkit/memory.py"))

    @classmethod
    def from_counters(cls, counters: Mapping[str, Any]) -> Cost:
        """The run context's per-variant counters, with the rates derived from them."""
        seconds = counters.get("seconds")
        return cls(cases=counters.get("cases"), output_tokens=counters.get("output_tokens"), seconds=seconds,
                   tokens_per_s=counters.get("output_tokens", 0) / seconds if seconds else None,
                   latency_per_case_s=seconds / max(counters.get("cases", 1), 1) if seconds else None,
                   peak_memory_mb=counters.get("peak_memory_mb"),
                   peak_memory_source=counters.get("peak_memory_source"))


@dataclass(frozen=True, kw_only=True)
class VariantRecord:
    """One evaluated variant: the base alone, or the base with an adapter (quantized, merged)."""

    name: str
    adapter: str | None
    adapter_sha256: str | None
    quantize: Literal["nf4", "int8"] | None
    merge: bool
    merge_into: Literal["full", "quantized"] | None = field(default=None, metadata=doc(
        "merged variants: full (dequantize-then-merge for a quantized base) or quantized (the lossy 4-bit merge)"))
    is_dora: bool = False
    fingerprint: str = field(metadata=doc("content address of the model as evaluated"))
    provenance: Mapping[str, Any] | None = field(default=None, metadata=doc(
        "evalkit_train.json of a bundled-trainer adapter (its shape is the trainer's)"))
    cost: Cost = field(default_factory=Cost)
    backend: BackendRecord = field(default_factory=lambda: BackendRecord(engine="hf"))
    trial: TrialRecord | None = field(default=None, metadata=doc("the sweep trial or checkpoint this variant is"))


Rendering = Literal["chat_template", "raw", "mixed"]  # how a task's cases reached the model


@dataclass(frozen=True, kw_only=True)
class TaskRecord:
    """One task of the suite as run."""

    name: str
    kind: str
    n_cases: int
    binary: Mapping[str, bool] = field(metadata=doc(
        "metric -> values are 0/1 (Clopper-Pearson intervals, Tango score comparisons)"))
    invalid: Literal["loss", "drop"] | None = field(default=None, metadata=doc(
        "a candidate's invalid score: a loss in comparisons, or dropped with its pair (null: not recorded)"))
    extras: Mapping[str, Any] = field(default_factory=dict, metadata=doc(
        "kind-specific: per-subject accuracy, slice ids, judge agreement, ..."))
    settings: Mapping[str, Any] | None = field(default=None, metadata=doc(
        "what the task's scores depend on besides its cases (scorers with their parameters, generation, "
        "judge), as compared with a promoted baseline's; null in records older than 1.4"))
    rendering: Rendering | None = field(default=None, metadata=doc(
        "how the cases' prompts reached the model: chat_template (chats, through the base's chat template), raw "
        "(`prompt` text as is) or mixed; null for kinds that build their own prompts (lm-eval, drift) and in "
        "records older than 1.6"))


@dataclass(frozen=True, kw_only=True)
class MetricRecord:
    """One metric of one variant on one task: the mean of the valid scores and its interval."""

    task: str
    metric: str
    variant: str
    value: Num
    low: Num
    high: Num
    n: int = field(metadata=doc("valid scores", minimum=0))
    n_invalid: int = field(metadata=doc("invalid scores (not in value)", minimum=0))
    method: str
    confidence: float = field(metadata=doc("two-sided level of low/high"))


@dataclass(frozen=True, kw_only=True)
class ComparisonRecord:
    """Paired: the candidate minus the reference on the same cases."""

    task: str
    metric: str
    variant: str
    vs: str
    delta: Num
    low: Num
    high: Num
    p_value: Num
    p_holm: Num = field(default=None, metadata=doc("p adjusted (Holm) across every comparison of the run"))
    p_exact: Num = field(default=None, metadata=doc("binary: exact McNemar p"))
    test: str
    method: str = field(metadata=doc("Tango score | bootstrap-t [+ score floor]"))
    n: int = field(metadata=doc("pairs compared", minimum=0))
    n_ref_only: int | None = field(default=None, metadata=doc("binary: reference right, candidate wrong (lost)"))
    n_cand_only: int | None = field(default=None, metadata=doc("binary: reference wrong, candidate right (gained)"))
    n_nonzero: int | None = field(default=None, metadata=doc("pairs whose scores differ"))
    n_invalid: int | None = field(default=None, metadata=doc("pairs with an invalid score on either side"))
    n_invalid_as_loss: int = field(default=0, metadata=doc(
        "candidate-invalid pairs scored as the worst value (task invalid: loss)"))
    confidence: Num = field(default=None, metadata=doc("two-sided level of low/high"))
    significant: bool = field(metadata=doc("p_holm < 1 - confidence"))
    excludes_drop: Num = field(default=None, metadata=doc(
        "upper one-sided bound of the drop at excludes_level: the smallest drop this run rules out"))
    excludes_level: Num = None


GateKind = Literal["min", "max", "max_drop", "max_invalid", "all_invalid", "check"]


@dataclass(frozen=True, kw_only=True)
class GateRecord:
    """One gate of the suite on one variant, and its verdict."""

    id: str = field(metadata=doc("readable id, e.g. extract.exact_match[lora]"))
    kind: GateKind
    metric: str | None = None
    check: str | None = None
    variant: str
    vs: str | None = None
    threshold: Num = None
    value: Num = None
    low: Num = None
    high: Num = None
    interval_confidence: Num = field(default=None, metadata=doc("two-sided level of low/high"))
    p_value: Num = None
    confidence: Num = field(default=None, metadata=doc("the gate's one-sided level (null: point estimate)"))
    bound: Num = field(default=None, metadata=doc("the one-sided bound tested (max_drop: points of drop)"))
    side: Literal["lower", "upper"] | None = None
    method: str | None = None
    n: int | None = None
    n_invalid: int | None = None
    passed: bool
    message: str
    skipped: str | None = field(default=None, metadata=doc("why its check did not apply to the variant "
                                                            "(passed, shown as skipped)"))
    line: int | None = field(default=None, metadata=doc("the gate's line in the suite file (null: on by default)"))


@dataclass(frozen=True, kw_only=True)
class CheckRecord:
    """A check that catches a silent failure no score shows (an inert adapter, a lossy merge, leakage)."""

    name: str
    variant: str
    passed: bool
    message: str = ""
    skipped: str | None = field(default=None, metadata=doc("why it did not apply (e.g. an adapter without "
                                                            "provenance); passed is then true"))
    details: Mapping[str, Any] = field(default_factory=dict, metadata=doc("check-specific numbers"))


@dataclass(frozen=True, kw_only=True)
class PromotionRecord:
    """One promotion of a baseline store (a line of its history.jsonl): which variant of which run
    became the baseline, by whom, and its gated metrics."""

    bundle: str = field(metadata=doc("the bundle's folder name in the store"))
    promoted_at: str = field(metadata=doc("ISO 8601, UTC"))
    by: str
    run_id: str
    suite: str
    variant: str = field(metadata=doc("the promoted variant's name in its run"))
    verdict: Literal["pass", "fail", "error"] = field(metadata=doc("the run's verdict"))
    forced: bool = field(metadata=doc("promoted with --force although the run did not pass"))
    base_sha256: str
    adapter_sha256: str | None
    fingerprint: str
    metrics: Mapping[str, Num] = field(metadata=doc("task.metric -> the variant's value, for each of its metrics"))
    gated: tuple[str, ...] = field(default=(), metadata=doc("the metrics its run's gates tested on it"))
    manifest_sha256: str | None = field(default=None, metadata=doc(
        "sha256 of the bundle's manifest.json (in the history line; the manifest holds every file's)"))


@dataclass(frozen=True, kw_only=True)
class BaselineRecord:
    """The promoted variant this run was compared with, read from a baseline store."""

    name: str = field(metadata=doc("its variant name in this run"))
    store: str
    promotion: PromotionRecord
    mismatch: Literal["refuse", "intersect"] = field(metadata=doc("the suite's baseline_mismatch"))
    cases: int = field(metadata=doc("cases paired with the bundle's", minimum=0))
    dropped: int = field(metadata=doc("cases of the run or the bundle left out (added, removed, changed)", minimum=0))
    differences: tuple[str, ...] = field(default=(), metadata=doc("what differs from the bundle"))
    history: tuple[PromotionRecord, ...] = field(default=(), metadata=doc("the store's promotions, oldest first"))


@dataclass(frozen=True, kw_only=True)
class CacheStats:
    """The results cache during the run."""

    hits: int
    misses: int
    path: str | None = None


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    """One evalkit run: the suite as resolved, the environment, per-variant per-task metrics with
    intervals, paired comparisons against the reference variant, gates and checks. Per-case records
    live beside it in samples.jsonl."""

    schema_version: str = field(metadata=doc(
        "MAJOR.MINOR: a minor bump only adds fields, a major one changes them", const=SCHEMA_VERSION))
    evalkit_version: str
    run_id: str
    started_at: str | None = field(default=None, metadata=doc("ISO 8601, UTC"))
    finished_at: str | None = None
    duration_s: Num = None
    status: Literal["complete", "interrupted", "error"]
    suite: SuiteRecord
    config: Mapping[str, Any] = field(metadata=doc("the suite as loaded (YAML mapping), paths as written"))
    environment: Environment
    base: BaseRecord
    reference: str = field(metadata=doc("the variant every comparison is made against unless a gate names another"))
    variants: tuple[VariantRecord, ...]
    tasks: tuple[TaskRecord, ...]
    metrics: tuple[MetricRecord, ...]
    comparisons: tuple[ComparisonRecord, ...]
    gates: tuple[GateRecord, ...]
    checks: tuple[CheckRecord, ...]
    verdict: Literal["pass", "fail", "error"]
    cache: CacheStats | None = None
    baseline: BaselineRecord | None = None
    # how the record was read: not part of results.json
    source_version: str | None = field(default=None, compare=False, metadata={"transient": True})

    def to_json(self) -> dict[str, Any]:
        """What results.json holds: plain JSON (NaN and infinities as null, paths as strings)."""
        return to_jsonable(self)

    @classmethod
    def from_json(cls, obj: Any) -> RunRecord:
        """A results.json object of any readable version (see the version policy in `evalkit.record.versions`)."""
        if not isinstance(obj, Mapping):
            raise RecordError(f"expected a JSON object, got {value_kind(obj)}")
        source = obj.get("schema_version")
        record = decode(cls, migrate(obj))
        return record if source == SCHEMA_VERSION else dataclasses.replace(record, source_version=str(source))


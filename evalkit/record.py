"""The run record (results.json): the one typed, versioned definition of what a run found.

The runner builds a `RunRecord`; everything that reads a run reads one: report.html, summary.md,
junit.xml, the console summary, the pytest plugin, `evalkit report RUN --baseline OLDER`. Only the
standard library here (the pytest plugin and the report helpers load it).

Version policy (`schema_version` is "MAJOR.MINOR"):
- a MINOR bump only adds fields; an older 1.x reader (which ignores what it does not know) still
  reads the record;
- a MAJOR bump renames, removes or redefines a field, or adds a value to an enum;
- `RunRecord.from_json` reads every 1.x record: an older minor is migrated to this shape first
  (`migrate`: what each version lacked is filled in or derived, never guessed), a newer minor loads
  with its unknown fields ignored, another major is refused with a message.

History: 1.0 the first record. 1.1 gate bounds and levels, invalid counts, Holm p, excludes_drop.
1.2 the typed record: `reference` (the variant comparisons are made against, as the suite resolved
it) and every field written, null where it does not apply (a fully cached variant's cost).
1.3 each variant's `backend`: where it ran (engine, endpoints, served name and identity).
1.4 each task's `settings` (what its scores depend on besides the cases) and the run's `baseline`
(the promoted variant it was compared with, read from a baseline store, and the store's history).
1.5 `skipped` on checks and gates: a check that did not apply (an adapter without provenance).
1.6 each task's `rendering`: whether its prompts went through the chat template or as raw text.

The JSON Schema shipped in evalkit/schemas/results.schema.json is generated from these types:
`python -m evalkit.record --schema --write` regenerates it; a test checks the shipped file is the
generated one. The open parts (`config`, task `extras`, variant `provenance`, check `details`)
hold whatever the suite, the task kind, the trainer or the check wrote: readers of those stay
defensive.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

SCHEMA_VERSION = "1.6"
SCHEMA_FILE = Path(__file__).parent / "schemas" / "results.schema.json"

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
        """A results.json object of any readable version (see the module's version policy)."""
        if not isinstance(obj, Mapping):
            raise RecordError(f"expected a JSON object, got {_kind(obj)}")
        source = obj.get("schema_version")
        record = decode(cls, migrate(obj))
        return record if source == SCHEMA_VERSION else dataclasses.replace(record, source_version=str(source))


# ---- reading: JSON -> types, with the path of whatever does not fit

class RecordError(ValueError):
    """A results.json object that does not fit the record; the message names where (`gates[2].passed`)."""


def decode(tp: Any, value: Any, where: str = "") -> Any:
    """`value` (parsed JSON) as an instance of `tp`: dataclasses from objects (unknown keys ignored,
    missing ones defaulted when the type has a default), tuples from arrays, numbers checked
    (an integral float is an int, a non-finite float where null is allowed is null)."""
    if tp is Any:
        return value
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, float) and not math.isfinite(value) and type(None) in args):
            if type(None) in args:
                return None
            raise RecordError(f"{where or 'record'}: expected {_name(tp)}, got null")
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return decode(arg, value, where)
            except RecordError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else RecordError(f"{where}: expected {_name(tp)}, got {_kind(value)}")
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise RecordError(f"{where}: expected one of {', '.join(map(repr, args))}, got {_short(value)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise RecordError(f"{where}: expected an array, got {_kind(value)}")
        return tuple(decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is Mapping:
        if not isinstance(value, Mapping):
            raise RecordError(f"{where}: expected an object, got {_kind(value)}")
        return {str(k): decode(args[1], v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _decode_object(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"the record has a field type decode does not know: {tp!r}")
    raise RecordError(f"{where}: expected {_name(tp)}, got {_kind(value)}")


def _decode_object(cls: type, value: Any, where: str) -> Any:
    if not isinstance(value, Mapping):
        raise RecordError(f"{where or 'record'}: expected an object, got {_kind(value)}")
    hints = _hints(cls)
    kwargs = {}
    for f in _fields(cls):
        here = f"{where}.{f.name}" if where else f.name
        if f.name in value:
            kwargs[f.name] = decode(hints[f.name], value[f.name], here)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecordError(f"{here}: missing")
    return cls(**kwargs)


@cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("transient")]


def _name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_name(a) for a in get_args(tp))
    if origin is tuple:
        return "an array"
    if origin is Mapping:
        return "an object"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {_short(value)}"
    return "an array" if isinstance(value, (list, tuple)) else "an object" if isinstance(value, Mapping) \
        else type(value).__name__


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- writing: types -> JSON

def to_jsonable(o: Any) -> Any:
    """A JSON-safe copy: records as objects (transient fields left out), tuples as arrays, NaN and
    infinities as null (strict JSON has no NaN), paths and other objects as strings."""
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return {f.name: to_jsonable(getattr(o, f.name)) for f in _fields(type(o))}
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, Mapping):
        return {str(k): to_jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [to_jsonable(v) for v in o]
    if o is None or isinstance(o, (str, int, bool)):
        return o
    return str(o)


# ---- older versions

MAJOR = int(SCHEMA_VERSION.split(".")[0])


def parse_version(version: Any) -> tuple[int, int]:
    try:
        major, minor = str(version).split(".")
        return int(major), int(minor)
    except ValueError:
        raise RecordError(f"schema_version {version!r} is not a MAJOR.MINOR version") from None


def migrate(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A results.json object of any 1.x version as a copy in this version's shape. Each step fills in
    what its version lacked, from what the record itself says; odd values are left for `decode` to
    report."""
    version = obj.get("schema_version")
    if version is None:
        raise RecordError("schema_version: missing")
    major, minor = parse_version(version)
    if major != MAJOR:
        raise RecordError(f"schema_version {version!r} is not supported (this evalkit reads {MAJOR}.x)")
    out = copy.deepcopy(dict(obj))
    for to_minor, step in ((1, _from_1_0), (2, _from_1_1), (3, _from_1_2)):  # 1.4 to 1.6 only added fields
        if minor < to_minor:
            step(out)
    out["schema_version"] = SCHEMA_VERSION
    return out


def _objects(r: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    items = r.get(key)
    return [x for x in items if isinstance(x, dict)] if isinstance(items, list) else []


def _from_1_0(r: dict[str, Any]) -> None:
    """1.0 -> 1.1. 1.0 dropped every pair with an invalid side and scored nothing invalid as a loss
    (the policy 1.1 calls `invalid: drop`); its comparisons named their test, not a method, and
    counted no differing pairs (for 0/1 metrics they are the lost plus the gained). Gate bounds,
    Holm p and excluded drops were not computed: they stay null."""
    for t in _objects(r, "tasks"):
        t.setdefault("invalid", "drop")
    for c in _objects(r, "comparisons"):
        c.setdefault("method", c.get("test"))
        c.setdefault("n_invalid_as_loss", 0)
        lost, gained = c.get("n_ref_only"), c.get("n_cand_only")
        if "n_nonzero" not in c and isinstance(lost, (int, float)) and isinstance(gained, (int, float)):
            c["n_nonzero"] = lost + gained


def _from_1_1(r: dict[str, Any]) -> None:
    """1.1 -> 1.2: the reference variant, by the suite loader's rule (`reference:` if the suite set
    one, else `base` when a variant has that name, else the first variant)."""
    if "reference" in r:
        return
    config = r.get("config")
    if not isinstance(config, dict):
        config = {}
    names = [v.get("name") for v in _objects(r, "variants")]
    if isinstance(config.get("reference"), str):
        r["reference"] = config["reference"]
    elif "base" in names or not names or not isinstance(names[0], str):
        r["reference"] = "base"
    else:
        r["reference"] = names[0]


def _from_1_2(r: dict[str, Any]) -> None:
    """1.2 -> 1.3: before backends every variant ran in process."""
    for v in _objects(r, "variants"):
        v.setdefault("backend", {"engine": "hf"})


# ---- the JSON Schema, generated from the types

def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the results.json this evalkit writes."""
    defs: dict[str, Any] = {}
    root = _object_schema(RunRecord, defs)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://evalkit.dev/schemas/results-{SCHEMA_VERSION}.json",
            "title": "evalkit run record (results.json)",
            **root,
            "$defs": dict(sorted(defs.items()))}


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


def _object_schema(cls: type, defs: dict[str, Any]) -> dict[str, Any]:
    hints = _hints(cls)
    props = {}
    for f in _fields(cls):
        prop = _type_schema(hints[f.name], defs) | f.metadata.get("schema", {})
        if f.metadata.get("doc"):
            prop["description"] = f.metadata["doc"]
        props[f.name] = prop
    doc = " ".join((cls.__doc__ or "").split())
    return {"description": doc, "type": "object", "required": list(props), "additionalProperties": False,
            "properties": props}


def _type_schema(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    if tp is Any:
        return {}
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1 or len(args) != 2:
            return {"anyOf": [_type_schema(a, defs) for a in args]}
        sub = _type_schema(inner[0], defs)
        if isinstance(sub.get("type"), str):
            return sub | {"type": [sub["type"], "null"]}
        if "enum" in sub:
            return {"enum": [*sub["enum"], None]}
        return {"anyOf": [sub, {"type": "null"}]}
    if origin is Literal:
        return {"enum": list(args)}
    if origin is tuple:
        return {"type": "array", "items": _type_schema(args[0], defs)}
    if origin is Mapping:
        values = _type_schema(args[1], defs)
        return {"type": "object", "additionalProperties": values} if values else {"type": "object"}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if tp.__name__ not in defs:
            defs[tp.__name__] = {}  # placeholder: a type met again while being described
            defs[tp.__name__] = _object_schema(tp, defs)
        return {"$ref": f"#/$defs/{tp.__name__}"}
    names = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}
    if tp in names:
        return {"type": names[tp]}
    raise TypeError(f"no JSON Schema for {tp!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evalkit.record", description="The run record's JSON Schema.")
    p.add_argument("--schema", action="store_true", required=True, help="print the schema generated from the types")
    p.add_argument("--write", action="store_true", help="write it to evalkit/schemas/results.schema.json")
    args = p.parse_args(argv)
    text = schema_text()
    if args.write:
        SCHEMA_FILE.write_text(text, encoding="utf-8")
        print(f"wrote {SCHEMA_FILE}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

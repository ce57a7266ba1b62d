"""Typed suite objects (frozen). Built by `evalkit.config.loader.load_suite` from YAML."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evalkit.errors import ConfigError, YamlPath, fmt_path, located
from evalkit.models.base import BaseSpec
from evalkit.types import Scorer


@dataclass(frozen=True)
class Variant:
    """Base or one adapter; quantize/merge are flags on the same config (as peft makes DoRA a flag)."""

    name: str
    adapter: Path | None = None
    train: Path | None = None  # recipe: the adapter is trained when missing or stale
    quantize: str | None = None  # "nf4" | "int8"
    merge: bool = False
    merge_into: str = "full"  # "full" (dequantize-then-merge) or "quantized" (the lossy 4-bit merge)
    allow_pickle: bool = False  # permit adapter_model.bin (pickle); off by default
    allow_template_mismatch: bool = False
    line: int | None = None

    @property
    def is_base(self) -> bool:
        return self.adapter is None and self.train is None

    @property
    def merge_target(self) -> str | None:
        """Where a merge goes: "quantized" only for a quantized variant that asks for it; None unmerged."""
        if not self.merge:
            return None
        return "quantized" if self.quantize and self.merge_into == "quantized" else "full"


@dataclass(frozen=True)
class ScorerSpec:
    name: str
    params: Mapping[str, Any]
    fn: Scorer
    binary: bool


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    batch_size: int = 8

    def key(self) -> dict[str, Any]:
        # batch_size does not change greedy outputs, so it stays out of cache keys
        return {"max_new_tokens": self.max_new_tokens, "stop": list(self.stop), "greedy": True}


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "generate" | "mmlu" | "judge"
    data: Path | None = None
    scorers: tuple[ScorerSpec, ...] = ()
    limit: int | None = None
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    params: Mapping[str, Any] = field(default_factory=dict)  # kind-specific keys, schema-validated
    # "loss": a candidate's invalid score (unparseable verdict, NaN) counts as the worst score in
    # paired comparisons, and a metric with no valid score fails the run; "drop": such pairs are
    # left out (still counted) and an all-invalid metric is only reported
    invalid: str = "loss"
    line: int | None = None
    index: int = 0  # position in the suite's `tasks:` list, for error paths

    def where(self, *sub: str | int) -> str:
        """The YAML path of this task (or of a key inside it) as errors print it: `tasks[2].judge`."""
        return fmt_path(("tasks", self.index, *sub))


@dataclass(frozen=True)
class Gate:
    """`metric: task.metric` with min/max, or max_drop vs a reference; or a named `check`."""

    id: str
    metric: str | None = None
    variant: str | None = None  # None: every non-base variant
    min: float | None = None
    max: float | None = None
    max_drop: float | None = None  # in points (percentage points for proportions)
    max_invalid: float | None = None  # the share of cases whose score is invalid
    vs: str | None = None
    confidence: float | None = None  # None: compare point estimates; else a one-sided bound at this level
    check: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    line: int | None = None


@dataclass(frozen=True)
class Suite:
    name: str
    path: Path
    base: BaseSpec
    variants: tuple[Variant, ...]
    tasks: tuple[Task, ...]
    gates: tuple[Gate, ...]
    seed: int = 0
    reference: str = "base"  # variant every comparison is made against
    raw: Mapping[str, Any] = field(default_factory=dict)  # the YAML as loaded, for the run record
    lines: Mapping[YamlPath, int] = field(default_factory=dict, repr=False)  # YAML path -> line

    def error(self, path: YamlPath, message: str, hint: str | None = None) -> ConfigError:
        """A located error about part of this suite found after loading (an adapter for another
        base, an unreachable judge): `FILE:LINE PATH: message`, like the loader's own."""
        return located(message, self.path, self.lines, path, hint)

    def variant_path(self, name: str) -> YamlPath:
        i, v = next((i, v) for i, v in enumerate(self.variants) if v.name == name)
        return ("variants", i, "train" if v.train else "adapter")

    @property
    def dir(self) -> Path:
        return self.path.parent

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

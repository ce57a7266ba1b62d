"""What every task kind produces: per-variant, per-case scored samples.

Metrics, paired comparisons and gates are computed generically from these, so a new task kind
(generation, mmlu, judge, ...) only has to yield SampleResults.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from evalkit.types import Score


@dataclass(frozen=True)
class SampleResult:
    task: str
    variant: str
    case_id: str
    prompt: str  # as sent to the model (after the chat template)
    output: str
    target: Any
    scores: Mapping[str, Score]  # metric name -> score
    cached: bool = False
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class TaskResult:
    samples: list[SampleResult]
    binary: dict[str, bool]  # metric name -> True when values are 0/1 (Clopper-Pearson, Tango)
    extras: dict[str, Any] = field(default_factory=dict)  # kind-specific, into results.json tasks[].extras

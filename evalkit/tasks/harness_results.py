"""lm-eval's results as evalkit reads them: one `Document` per (task, document) with its per-sample
metrics and what the model said, and lm-eval's own aggregate numbers."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Document:
    """One document as lm-eval scored it for one variant: its metrics and what the model said."""

    task: str
    doc_id: int
    prompt: str
    output: str  # generation: the raw text; multiple choice: the chosen continuation
    target: Any
    metrics: dict[str, float]  # lm-eval's per-sample metrics; `metric.filter` for filters other than "none"
    doc: Mapping[str, Any] = field(default_factory=dict)
    loglikelihoods: tuple[float, ...] | None = None  # multiple choice: one per choice
    filtered: dict[str, Any] = field(default_factory=dict)  # filter -> the response after it

    @property
    def case_id(self) -> str:
        return f"{self.task}/{self.doc_id}"

    @property
    def choice(self) -> int | None:
        lls = self.loglikelihoods
        return None if lls is None else max(range(len(lls)), key=lls.__getitem__)  # first maximum, as argmax


def _scalar(value: Any) -> float | None:
    if isinstance(value, bool | int | float) and not (isinstance(value, float) and math.isinf(value)):
        return float(value)
    return None


def documents(results: Mapping[str, Any]) -> list[Document]:
    """One Document per (task, doc_id) from lm-eval's logged samples; a document scored under
    several filters (gsm8k's strict-match, flexible-extract) carries each filter's metrics.
    Non-scalar per-sample values (corpus-level BLEU's pairs, IFEval's per-instruction lists) stay
    in lm-eval's own aggregate numbers only."""
    out: dict[tuple[str, int], Document] = {}
    for task, samples in results["samples"].items():
        for s in samples:
            key = (task, int(s["doc_id"]))
            suffix = "" if s["filter"] == "none" else f".{s['filter']}"
            metrics = {f"{m}{suffix}": v for m in s["metrics"] if (v := _scalar(s.get(m))) is not None}
            doc = out.get(key)
            if doc is None:
                args = [list(a) for a in s["arguments"]]
                resps = s["filtered_resps"]
                multiple_choice = bool(resps) and all(isinstance(r, list | tuple) and len(r) == 2
                                                      and isinstance(r[0], float) for r in resps)
                lls = tuple(float(r[0]) for r in resps) if multiple_choice else None
                target = s["target"]
                if lls is not None:
                    choice = max(range(len(lls)), key=lls.__getitem__)
                    output = str(args[choice][1]).strip()
                    if isinstance(target, int) and 0 <= target < len(args):
                        target = str(args[target][1]).strip()
                else:
                    raw = s["resps"][0][0] if s["resps"] and s["resps"][0] else ""
                    output = str(raw)
                doc = out[key] = Document(task, key[1], str(args[0][0]) if args else "", output, target, {},
                                          s.get("doc") or {}, lls)
            doc.metrics.update(metrics)
            if doc.loglikelihoods is None:
                doc.filtered[s["filter"]] = s["filtered_resps"][0] if s["filtered_resps"] else None
    return list(out.values())


def aggregate_numbers(results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """lm-eval's own numbers per task and group (`acc,none` ...), stderr left out (not computed)."""
    out: dict[str, dict[str, float]] = {}
    for section in ("results", "groups"):
        for task, values in (results.get(section) or {}).items():
            nums = {k: float(v) for k, v in values.items()
                    if "_stderr" not in k and k != "alias" and _scalar(v) is not None}
            if nums:
                out.setdefault(task, {}).update(nums)
    return out

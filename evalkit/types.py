"""The small core types that flow through a run (in-process, frozen).

Suite config types live in `evalkit.config`; the run record (results.json) in `evalkit.record`.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


def stable_hash(obj: Any) -> str:
    """sha256 of a canonical JSON rendering: the content address used by caches."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def template_hash(tokenizer_or_template: Any) -> str:
    """sha256 of a chat template (a tokenizer's `chat_template`, or the template itself); "" when
    there is none. Several named templates (a dict) hash as canonical JSON. The one definition:
    part of every variant fingerprint (cache keys) and recorded with each trained adapter."""
    template = tokenizer_or_template
    if template is not None and not isinstance(template, (str, dict)):
        template = getattr(tokenizer_or_template, "chat_template", None)
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    return hashlib.sha256(template.encode()).hexdigest() if template else ""


@dataclass(frozen=True)
class Case:
    """One item to evaluate: a chat (`messages`) or a raw `prompt`, and what a good answer is."""

    id: str
    messages: tuple[Mapping[str, str], ...] | None = None
    prompt: str | None = None
    target: Any = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def content(self) -> dict[str, Any]:
        return {"messages": [dict(m) for m in self.messages] if self.messages else None,
                "prompt": self.prompt, "target": self.target}

    @property
    def content_hash(self) -> str:
        return stable_hash(self.content())


@dataclass(frozen=True)
class Output:
    """What a model produced for a case; `prompt` is the exact text sent, after the chat template."""

    text: str
    prompt: str = ""
    n_prompt_tokens: int = 0
    n_output_tokens: int = 0
    finish_reason: str = ""  # "stop" (stop string / eos) or "length"
    latency_s: float = 0.0  # wall time of its batch divided by the batch size


@dataclass(frozen=True)
class Score:
    """One scorer's verdict on one output; `value` is in [0, 1] unless the scorer says otherwise.

    `value is None` marks an invalid score (e.g. an unparseable judge verdict): recorded, never a pass.
    """

    value: float | None
    reason: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def valid(self) -> bool:
        return self.value is not None


Scorer = Callable[[Case, Output], Score]

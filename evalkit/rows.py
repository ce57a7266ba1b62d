"""One row shape for evaluation and training: a task's data and a recipe's training file take the
same JSON objects, one per line.

- The input: `messages`, a chat (a non-empty list of `{role, content}`), or `prompt`, text (a list
  of messages there is a chat too: trl's conversational form).
- The answer: `target` (any JSON: text, or an object that exact match compares JSON-aware and
  training writes as its JSON), or `completion` (text, or trl's one assistant turn), or, in a
  `messages` row with neither, the chat's final assistant turn. Training needs one; evaluation
  needs one when a scorer compares with it.
- `id` (text or an integer), and any other keys, kept as the case's metadata.

How the input becomes the text the model sees is the task's (or recipe's) `template:`. A chat
always goes through the base's chat template. `prompt` text is sent raw by default (`auto`: the
run warns when the base has a chat template, since an instruct model answers raw text poorly);
`chat` makes each prompt one user turn of a chat; `none` says raw text is meant (a completion
model), and a chat row is then a mistake.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from evalkit.errors import ConfigError

Template = Literal["auto", "chat", "none"]
TEMPLATE_DOC = ("how `prompt` rows are rendered: auto (default) sends them as raw text and warns when the base "
                "has a chat template; chat sends each prompt as one user turn through the chat template; none "
                "sends raw text, as meant for a completion model (`messages` rows are then refused)")
ROW_KEYS = ("id", "messages", "prompt", "target", "completion")
SHAPE = ("each row needs `messages` (a chat) or `prompt` (text), and for training or a target scorer "
         "`target` or `completion`")


def raw_prompt_hint(key: str) -> str:
    """The fix for `prompt` text sent raw to a base with a chat template (`key`: where `template` is
    written, the task's or the recipe's `data.template`)."""
    return (f"give the rows as `messages`, or set `{key}: chat` to send each prompt as one user turn through "
            f"the chat template (`{key}: none` says raw text is meant)")


@dataclass(frozen=True)
class Row:
    """A row's input (a chat or raw text), its answer (None: it has none), its id and other keys."""

    messages: tuple[dict[str, str], ...] | None
    prompt: str | None
    answer: Any = None
    id: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


def answer_text(answer: Any) -> str:
    """An answer as the text the model learns to write (and exact match compares with): text as is,
    anything else as its JSON."""
    return answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False)


def parse_row(row: Any, template: Template = "auto") -> Row:
    """A JSON line as a Row; what is wrong with it is a ConfigError (the caller adds FILE:LINE)."""
    if not isinstance(row, dict):
        raise ConfigError(f"a row is a JSON object, not {_kind(row)}: {SHAPE}")
    if "messages" in row and "prompt" in row:
        raise ConfigError("a row gives `messages` or `prompt`, not both")
    messages, prompt = None, None
    if "messages" in row:
        messages = _chat(row["messages"], "messages")
    elif isinstance(row.get("prompt"), list):
        messages = _chat(row["prompt"], "prompt")
    elif isinstance(row.get("prompt"), str):
        prompt = row["prompt"]
    elif "prompt" in row:
        raise ConfigError(f"`prompt` must be text (or a list of messages), not {_kind(row['prompt'])}")
    else:
        raise ConfigError(SHAPE)
    answer = row.get("target")
    if "completion" in row:
        completion = _completion(row["completion"])
        if answer is not None and answer_text(answer) != completion:
            raise ConfigError("`target` and `completion` differ: a row has one answer")
        answer = completion if answer is None else answer
    elif answer is None and messages is not None and len(messages) > 1 and messages[-1]["role"] == "assistant":
        messages, answer = messages[:-1], messages[-1]["content"]
    if template == "chat" and prompt is not None:
        messages, prompt = ({"role": "user", "content": prompt},), None
    elif template == "none" and messages is not None:
        raise ConfigError("`template: none` sends `prompt` text raw, but this row is a chat (`messages`)",
                          hint="give the rows as `prompt` text, or drop `template: none` to use the chat template")
    rid = row.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, str | int)):
        raise ConfigError(f"`id` must be a string or an integer, not {rid!r}")
    return Row(messages, prompt, answer, None if rid is None else str(rid),
               {k: v for k, v in row.items() if k not in ROW_KEYS})


def _chat(value: Any, key: str) -> tuple[dict[str, str], ...]:
    if not (isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value)):
        raise ConfigError(f"`{key}` must be a non-empty list of {{role, content}} with string values")
    return tuple({"role": m["role"], "content": m["content"]} for m in value)


def _completion(value: Any) -> str:
    if isinstance(value, str):
        return value
    if (isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)
            and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str)):
        return value[0]["content"]
    raise ConfigError("`completion` must be text (or one assistant turn, [{role: assistant, content}])")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "text", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")

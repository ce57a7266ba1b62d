"""Training rows: suite-format jsonl -> trl prompt/completion rows, and the held-out split.

Accepted rows (one format per file):
- `{"messages": [...], "target": X}`: the suite format. The completion is X as an assistant turn
  (a dict or list is serialized with `json.dumps(X, ensure_ascii=False)`, a string is used as is).
- `{"messages": [..., {"role": "assistant", ...}]}`: the trailing assistant turn is the completion.
- `{"prompt": str, "completion": str}`: raw text, no chat template (as a raw-prompt case is evaluated).
Conversational rows become trl rows `{"prompt": messages, "completion": [assistant turn]}`, so the
loss is on the completion only and the prompt is rendered with the tokenizer's chat template.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from evalkit.errors import ConfigError
from evalkit.fileio import read_jsonl


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a jsonl file (located errors: `evalkit.fileio.read_jsonl`); none is an error."""
    rows = [row for _, row in read_jsonl(path)]
    if not rows:
        raise ConfigError("no rows", file=path)
    return rows


def completion_text(target: Any) -> str:
    """How a suite target is written as the answer the model learns (and exact match compares to)."""
    return target if isinstance(target, str) else json.dumps(target, ensure_ascii=False)


def to_trl_row(row: dict[str, Any]) -> dict[str, Any]:
    """One row as trl's prompt/completion row; a row of no accepted shape is a ConfigError (unlocated)."""
    messages = row.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                     for m in messages):
            raise ConfigError("'messages' must be a list of {role, content} objects")
        turns = [{"role": m["role"], "content": m.get("content") or ""} for m in messages]
        if not all(isinstance(t["content"], str) for t in turns):
            raise ConfigError("each message's 'content' must be a string")
        if "target" in row:
            return {"prompt": turns, "completion": [{"role": "assistant", "content": completion_text(row["target"])}]}
        if turns and turns[-1]["role"] == "assistant" and len(turns) > 1:
            return {"prompt": turns[:-1], "completion": turns[-1:]}
        raise ConfigError("a messages row needs a 'target' or a final assistant turn")
    if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return {"prompt": row["prompt"], "completion": row["completion"]}
    raise ConfigError("expected 'messages' (+ 'target') or 'prompt' + 'completion' strings")


def load_training_rows(path: Path) -> list[dict[str, Any]]:
    """The raw rows (for leakage checks) converted to trl rows, with an `id` each; one format per file.
    Each mistake is a ConfigError at its FILE:LINE."""
    out: list[dict[str, Any]] = []
    for i, (lineno, row) in enumerate(read_jsonl(path)):
        try:
            trl_row = to_trl_row(row)
        except ConfigError as e:
            raise ConfigError(e.message, file=path, line=lineno) from None
        if out and isinstance(out[0]["prompt"], str) != isinstance(trl_row["prompt"], str):
            raise ConfigError("mixes chat rows and raw prompt/completion rows (one format per file)",
                              file=path, line=lineno)
        out.append({"id": str(row.get("id", f"#{i}")), **trl_row})
    if not out:
        raise ConfigError("no rows", file=path)
    return out


def split_rows(rows: list[dict[str, Any]], eval_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic held-out split of the training file (at least one row each side when asked)."""
    if eval_fraction <= 0 or len(rows) < 2:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(rows) - 1, max(1, round(len(rows) * eval_fraction)))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]

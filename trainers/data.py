"""Training rows: the jsonl rows evaluation reads too (`evalkit.rows`) -> trl prompt/completion rows,
and the held-out split.

A chat row becomes trl's conversational row `{"prompt": messages, "completion": [assistant turn]}`
(the loss on the completion only, the prompt rendered with the tokenizer's chat template); a
`prompt` text row stays raw text (`{"prompt": str, "completion": str}`), as evaluation sends it,
unless the recipe's `data.template` is `chat`. The answer (`target` or `completion`) is written as
`evalkit.rows.answer_text` makes it: text as is, an object as its JSON.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from evalkit.errors import ConfigError
from evalkit.fileio import read_jsonl
from evalkit.rows import Row, Template, answer_text, parse_row


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a jsonl file (located errors: `evalkit.fileio.read_jsonl`); none is an error."""
    rows = [row for _, row in read_jsonl(path)]
    if not rows:
        raise ConfigError("no rows", file=path)
    return rows


def to_trl_row(row: Any, template: Template = "auto") -> dict[str, Any]:
    """One row as trl's prompt/completion row; a row without an answer, or of no accepted shape, is
    a ConfigError (unlocated)."""
    parsed = parse_row(row, template)
    if parsed.answer is None:
        raise ConfigError("a training row needs its answer: `target` or `completion` (or, in a `messages` row, "
                          "a final assistant turn)")
    return _trl(parsed)


def _trl(row: Row) -> dict[str, Any]:
    text = answer_text(row.answer)
    if row.messages is not None:
        return {"prompt": [dict(m) for m in row.messages], "completion": [{"role": "assistant", "content": text}]}
    return {"prompt": row.prompt, "completion": text}


def load_training_rows(path: Path, template: Template = "auto") -> list[dict[str, Any]]:
    """A training file's rows as trl rows, with an `id` each; one format per file (chats or text).
    Each mistake is a ConfigError at its FILE:LINE."""
    out: list[dict[str, Any]] = []
    for i, (lineno, row) in enumerate(read_jsonl(path)):
        try:
            trl_row = to_trl_row(row, template)
        except ConfigError as e:
            raise ConfigError(e.message, file=path, line=lineno, hint=e.hint) from None
        if out and isinstance(out[0]["prompt"], str) != isinstance(trl_row["prompt"], str):
            raise ConfigError("mixes chat rows and raw prompt rows (one format per file)", file=path, line=lineno,
                              hint="give every row `messages`, or set the recipe's `data.template: chat`")
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

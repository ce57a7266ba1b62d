"""Train/eval leakage: eval cases whose input also appears in the training data, after normalization.

A row's key is the text of its prompt turns (user and any earlier assistant turns; system turns and
the trailing assistant answer are left out, so a training row with a different system prompt still
matches), normalized: Unicode NFKC, case-folded, whitespace collapsed, and punctuation or symbols
dropped unless they sit between two letters/digits (so "Hello, world!" equals "hello world" but
"2+3" stays distinct from "2-3"). Rows are suite rows (`messages` + `target`), prompt/completion rows, or `evalkit.types.Case`s.

Pure functions: no I/O. `train_index` is what a trainer stores in an adapter's provenance, so an
evaluator can check an adapter for leakage even when its training file is gone.
"""
from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

NORMALIZATION = "v1"  # bump when `normalize` changes: stored indexes are then incomparable


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    out = []
    for i, c in enumerate(text):
        cat = unicodedata.category(c)[0]
        if cat in "PS":
            inner = 0 < i < len(text) - 1 and text[i - 1].isalnum() and text[i + 1].isalnum()
            out.append(c if inner else " ")
        else:
            out.append(" " if cat in "ZC" else c)
    return " ".join("".join(out).split())


def _get(row: Any, name: str) -> Any:
    return row.get(name) if isinstance(row, Mapping) else getattr(row, name, None)


def row_key(row: Any) -> str:
    """Normalized input text of a row ("" when it has none)."""
    messages = _get(row, "messages")
    if messages:
        turns = list(messages)
        while turns and turns[-1].get("role") == "assistant":  # the answer, in messages-only rows
            turns.pop()
        text = "\n".join(str(m.get("content") or "") for m in turns if m.get("role") != "system")
    else:
        prompt = _get(row, "prompt")
        if isinstance(prompt, list):  # conversational prompt/completion row
            return row_key({"messages": prompt})
        text = str(prompt or "")
    return normalize(text)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def row_id(row: Any, index: int) -> str:
    rid = _get(row, "id")
    return str(rid) if rid is not None else f"#{index}"


def train_index(rows: Iterable[Any]) -> dict[str, list[str]]:
    """key hash -> ids of the training rows with that key (rows without input text are skipped)."""
    index: dict[str, list[str]] = {}
    for i, row in enumerate(rows):
        key = row_key(row)
        if key:
            index.setdefault(key_hash(key), []).append(row_id(row, i))
    return index


def find_overlap(eval_rows: Iterable[Any], train: Iterable[Any] | Mapping[str, list[str]]) -> list[tuple[str, str]]:
    """(eval_id, train_id) for every eval row whose normalized input equals a training row's.

    `train` is training rows, or an index from `train_index` (e.g. from an adapter's provenance).
    """
    index = train if isinstance(train, Mapping) else train_index(train)
    pairs: list[tuple[str, str]] = []
    for i, row in enumerate(eval_rows):
        key = row_key(row)
        for train_id in index.get(key_hash(key), ()) if key else ():
            pairs.append((row_id(row, i), train_id))
    return pairs


def adapter_overlap(eval_rows: Iterable[Any], provenance: Mapping[str, Any] | None) -> list[tuple[str, str]] | None:
    """Overlap with the training data recorded in an adapter's provenance (`evalkit_train.json`,
    `data.train_index`); None when it carries no index made with this normalization."""
    data = (provenance or {}).get("data") or {}
    index = data.get("train_index")
    if data.get("train_index_normalization") != NORMALIZATION or not isinstance(index, Mapping):
        return None
    return find_overlap(eval_rows, index)

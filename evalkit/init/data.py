"""What `evalkit init` reads and infers: the rows, what their answers look like, the split, and the base.

Every row is read as evaluation and training read it (`evalkit.rows.parse_row`); what the rows are
made of (chats or prompt text; a target, a completion or a final assistant turn) and what their
answers look like (JSON, short labels, free text) choose the scorers. Without a test file the rows
are split, with a seed, keeping rows with the same input on one side (so the split leaks nothing).
The base's tokenizer is read as the run reads it (resolved once, then cached).
"""
from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from evalkit.errors import ConfigError, ModelError
from evalkit.fileio import read_jsonl
from evalkit.models.base import BaseSpec
from evalkit.rows import Row, answer_text, parse_row
from evalkit.scorers.text import strip_punctuation

SEED = 0
TEST_SHARE, TEST_FLOOR, TEST_CAP = 0.2, 10, 200  # the split's test share, at least / at most this many rows
HELD_OUT_MIN, HELD_OUT_ROWS = 20, 8  # train rows below which none are held out; held-out rows aimed at
LABEL_CHARS, LABEL_WORDS, LABEL_KINDS = 40, 4, 20  # a short label: at most this long; labels: at most this many

AnswerKind = Literal["json", "labels", "short", "text"]
ANSWER_SOURCES = ("target", "completion", "final assistant turn")


@dataclass(frozen=True)
class DataRow:
    line: int
    text: bytes  # the line as written, for a verbatim split
    row: Row
    source: str  # where its answer came from: one of ANSWER_SOURCES


@dataclass(frozen=True)
class Answers:
    """What a file's answers look like, and the exact_match normalization that fits them."""

    kind: AnswerKind
    distinct: tuple[str, ...]
    json_text: bool = False  # JSON given as text: exact_match needs `json: true` to compare it as JSON
    ignore_case: bool = False
    remove_punctuation: bool = False

    @property
    def main_metric(self) -> str:
        return "rouge_l" if self.kind == "text" else "exact_match"

    def scorers(self) -> list[str | dict[str, Any]]:
        if self.kind == "json":
            return [{"exact_match": {"json": True}} if self.json_text else "exact_match", "json_valid"]
        if self.kind == "text":
            return ["rouge_l", "f1"]
        params = {k: True for k in ("ignore_case", "remove_punctuation") if getattr(self, k)}
        exact: str | dict[str, Any] = {"exact_match": params} if params else "exact_match"
        return [exact, "f1"] if self.kind == "short" else [exact]



# ---------------------------------------------------------------- reading the rows

def read_rows(path: Path) -> list[DataRow]:
    """Every row of a data file as evaluation and training read it; a row that either would refuse,
    or one without an answer (training needs it), is a ConfigError at its FILE:LINE."""
    lines = _raw_lines(path)
    out: list[DataRow] = []
    seen: dict[str, int] = {}
    for lineno, raw in read_jsonl(path):
        try:
            row = parse_row(raw)
        except ConfigError as e:
            raise ConfigError(e.message, file=path, line=lineno, hint=e.hint) from None
        if row.answer is None:
            raise ConfigError("no answer: training needs one (`target`, `completion`, or a final assistant turn "
                              "in `messages`)", file=path, line=lineno)
        if row.id is not None:
            if row.id in seen:
                raise ConfigError(f"duplicate id '{row.id}' (first at line {seen[row.id]})", file=path, line=lineno)
            seen[row.id] = lineno
        source = ("target" if raw.get("target") is not None else "completion" if "completion" in raw
                  else "final assistant turn")
        out.append(DataRow(lineno, lines[lineno - 1], row, source))
    if not out:
        raise ConfigError("no rows", file=path)
    return out


def _raw_lines(path: Path) -> list[bytes]:
    """The file's lines as bytes, numbered as `read_jsonl` numbers them (a BOM dropped, line ends kept out)."""
    try:
        data = path.read_bytes()
    except OSError:
        return []  # read_jsonl names what is wrong with the file
    return [line.rstrip(b"\r") for line in data.removeprefix(b"\xef\xbb\xbf").split(b"\n")]


def shape_text(rows: Sequence[DataRow]) -> str:
    """The rows' shape in words: `prompt` text with `target` answers, ..."""
    inputs = Counter("prompt" if r.row.prompt is not None else "messages" for r in rows)
    sources = Counter(r.source for r in rows)

    def part(counts: Counter[str], fmt: Callable[[str], str]) -> str:
        if len(counts) == 1:
            return fmt(next(iter(counts)))
        return " / ".join(f"{fmt(k)} ({n})" for k, n in counts.most_common())

    def answer(source: str) -> str:
        return "a final assistant turn" if source == "final assistant turn" else f"`{source}` answers"

    def given(kind: str) -> str:
        return "`prompt` text" if kind == "prompt" else "`messages` chats"

    return f"{part(inputs, given)} with {part(sources, answer)}"


def classify_answers(answers: Sequence[Any]) -> Answers:
    """JSON (objects or arrays, or text that parses as one) -> JSON-aware exact match; a few short
    labels, or short answers -> normalized exact match; anything else -> free text."""
    if all(isinstance(a, dict | list) or (isinstance(a, str) and _json_text(a)) for a in answers):
        return Answers("json", (), json_text=any(isinstance(a, str) for a in answers))
    texts = [answer_text(a).strip() for a in answers]
    distinct = tuple(sorted(set(texts)))
    if not all(len(t) <= LABEL_CHARS and len(t.split()) <= LABEL_WORDS for t in texts):
        return Answers("text", distinct)
    labels = len(distinct) <= LABEL_KINDS and len(distinct) <= max(2, len(texts) // 2)
    # a normalization that would merge two of the answers would score a wrong answer as right
    folded = len({t.casefold() for t in distinct}) == len(distinct)
    bare = {strip_punctuation(t).strip() for t in distinct}
    unpunctuated = (len(bare) == len(distinct) and "" not in bare
                    and not any(ch.isdigit() for t in distinct for ch in t))  # -3 is not 3, 3.5 not 35
    return Answers("labels" if labels else "short", distinct, ignore_case=folded, remove_punctuation=unpunctuated)


def _json_text(text: str) -> bool:
    if not text.strip().startswith(("{", "[")):
        return False
    try:
        return isinstance(json.loads(text), dict | list)
    except ValueError:
        return False


# ---------------------------------------------------------------- the base

def parse_base(ref: str, cwd: Path) -> BaseSpec:
    """A command-line base as `evalkit serve --base` reads it: a .gguf file or `pkg:` resource, a
    local model folder, else a hub id. A relative file or folder is made absolute from `cwd`."""
    if ref.startswith("pkg:"):
        return BaseSpec.of("gguf", ref)
    local = (cwd / Path(ref).expanduser()).resolve()
    if ref.lower().endswith(".gguf"):
        return BaseSpec.of("gguf", str(local))
    if local.is_dir():
        return BaseSpec.of("path", str(local))
    if ref.startswith((".", "/", "~")):  # a path, not a hub id (org/name)
        raise ConfigError(f"--base {ref}: no such model folder ({local})",
                          hint="a local model folder, a .gguf file, pkg:PACKAGE/FILE.gguf, or a hub id org/name")
    return BaseSpec.of("id", ref)


@dataclass(frozen=True)
class Tokens:
    """What init needs from the base's tokenizer."""

    chat_template: bool
    count: Callable[[str], int]  # tokens in a text
    prompt_tokens: Callable[[Row, bool], int]  # tokens of a row's input as rendered (chat: True)


def read_tokenizer(spec: BaseSpec) -> Tokens:
    """The base's tokenizer, as the run loads it (a GGUF is converted once and cached)."""
    from evalkit.models.base import load_tokenizer, resolve_base

    try:
        tok = load_tokenizer(resolve_base(spec))
    except ModelError as e:  # the run would fail the same way: say so now, about the flag
        raise ConfigError(f"--base {spec.ref}: {e}", hint="init reads the base's tokenizer (its chat template, the "
                          "answers' lengths): give a local model folder or a .gguf file when offline") from None
    has_template = bool(getattr(tok, "chat_template", None))

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    def prompt_tokens(row: Row, chat: bool) -> int:
        if chat and has_template:
            messages = list(row.messages or ({"role": "user", "content": row.prompt or ""},))
            return count(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        return count(row.prompt or "")

    return Tokens(has_template, count, prompt_tokens)


# ---------------------------------------------------------------- the split and the plan

def rows_for_test(n: int) -> int:
    """Rows held out for the test: TEST_SHARE of them, at least TEST_FLOOR (never more than half), at
    most TEST_CAP."""
    return min(TEST_CAP, max(min(TEST_FLOOR, n // 2), round(n * TEST_SHARE)))


def split(rows: Sequence[DataRow], n_test: int, seed: int = SEED) -> tuple[list[DataRow], list[DataRow]]:
    """(train, test), each in file order: whole groups of rows with the same input are drawn, seeded,
    until the test has n_test rows, so no test input is also trained on."""
    groups: dict[str, list[DataRow]] = {}
    for r in rows:
        groups.setdefault(_input_key(r.row), []).append(r)
    order = list(groups)
    random.Random(seed).shuffle(order)
    test: set[int] = set()
    for key in order:
        if len(test) >= n_test:
            break
        test.update(r.line for r in groups[key])
    return [r for r in rows if r.line not in test], [r for r in rows if r.line in test]


def _input_key(row: Row) -> str:
    text = row.prompt if row.prompt is not None else json.dumps(row.messages, sort_keys=True)
    return " ".join(text.split()).casefold()


def held_out_fraction(n_train: int) -> float:
    """The recipe's eval_fraction: about HELD_OUT_ROWS rows (5-20% of the file), none for a tiny file."""
    if n_train < HELD_OUT_MIN:
        return 0.0
    return min(0.2, max(0.05, math.ceil(100 * HELD_OUT_ROWS / n_train) / 100))


def held_out_rows(n_train: int, fraction: float) -> int:
    """As trainers.data.split_rows holds them out."""
    return 0 if fraction <= 0 or n_train < 2 else min(n_train - 1, max(1, round(n_train * fraction)))


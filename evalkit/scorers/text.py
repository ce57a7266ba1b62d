"""Text scorers: exact match (of strings or of JSON values), substring, regex, token F1, ROUGE-L.

A case without a target gets an invalid score (`value=None`): a data problem, never a pass.
"""
from __future__ import annotations

import functools
import json as jsonlib  # `json` is exact_match's parameter name
import re
import string
import unicodedata
from collections import Counter
from typing import Any

from evalkit.errors import ConfigError
from evalkit.rows import answer_text
from evalkit.scorers.registry import register
from evalkit.scorers.structured import clip, parse_json_output
from evalkit.types import Case, Output, Score

_NO_TARGET = Score(None, "case has no target")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _as_text(target: Any) -> str | None:
    """The target as the text a model is trained to write (`evalkit.rows.answer_text`: anything but
    text as its JSON, so a boolean target is `true` in both places)."""
    return None if target is None else answer_text(target)


def strip_punctuation(text: str) -> str:
    """ASCII punctuation and symbols (as SQuAD's string.punctuation) plus Unicode punctuation."""
    return "".join(ch for ch in text
                   if ch not in string.punctuation and not unicodedata.category(ch).startswith("P"))


def _normalize(text: str, *, ignore_case: bool, strip: bool, normalize_whitespace: bool,
               remove_punctuation: bool) -> str:
    if remove_punctuation:
        text = strip_punctuation(text)
    if ignore_case:
        text = text.casefold()
    if normalize_whitespace:
        text = re.sub(r"\s+", " ", text)
    return text.strip() if strip else text


def _json_diff(want: Any, got: Any, path: str = "$") -> str | None:
    """First difference between two JSON values as `path: ...`, None when equal.

    Stricter than Python's `==` where JSON is: `true` is not the number 1.
    """
    if isinstance(want, dict) and isinstance(got, dict):
        for key in [*want, *(k for k in got if k not in want)]:
            sub = f"{path}.{key}" if str(key).isidentifier() else f"{path}[{key!r}]"
            if key not in got:
                return f"{sub}: missing"
            if key not in want:
                return f"{sub}: unexpected"
            if diff := _json_diff(want[key], got[key], sub):
                return diff
        return None
    if isinstance(want, list) and isinstance(got, list):
        for i, (w, g) in enumerate(zip(want, got)):
            if diff := _json_diff(w, g, f"{path}[{i}]"):
                return diff
        if len(want) != len(got):
            return f"{path}: expected {len(want)} items, got {len(got)}"
        return None
    if isinstance(want, bool) != isinstance(got, bool) or want != got:
        dump = functools.partial(jsonlib.dumps, ensure_ascii=False)
        return f"{path}: expected {clip(dump(want), 60)}, got {clip(dump(got), 60)}"
    return None


def _json_mode(json: bool | str | None, target: Any) -> bool:
    if json is None or json == "auto":
        return isinstance(target, (dict, list))
    if isinstance(json, bool):
        return json
    raise ConfigError(f"exact_match: 'json' must be auto, true or false, got {json!r}")


@register("exact_match", needs_target=True)
def exact_match(case: Case, output: Output, *, ignore_case: bool = False, strip: bool = True,
                normalize_whitespace: bool = True, remove_punctuation: bool = False,
                json: bool | str | None = None) -> Score:
    """Normalized string equality; or, for a dict/list target (or `json: true`), equality of the
    parsed JSON values, so key order and formatting do not matter. String options do not apply
    to JSON values."""
    if case.target is None:
        return _NO_TARGET
    if _json_mode(json, case.target):
        want, err = (parse_json_output(case.target) if isinstance(case.target, str)
                     else (case.target, None))
        if err:
            return Score(None, f"target is not JSON: {err}")
        got, err = parse_json_output(output.text)
        if err:
            return Score(0.0, f"not JSON: {err}")
        diff = _json_diff(want, got)
        return Score(0.0, diff) if diff else Score(1.0)
    norm = functools.partial(_normalize, ignore_case=ignore_case, strip=strip,
                             normalize_whitespace=normalize_whitespace,
                             remove_punctuation=remove_punctuation)
    target = _as_text(case.target)
    assert target is not None  # None returned above
    want, got = norm(target), norm(output.text)
    if want == got:
        return Score(1.0)
    return Score(0.0, f"expected {clip(repr(want), 60)}, got {clip(repr(got), 60)}")


@register("contains", primary="text", needs_target=True, target_param="text")
def contains(case: Case, output: Output, *, text: str | None = None,
             ignore_case: bool = False) -> Score:
    """The output contains `text` (default: the case's target) as a substring."""
    needle = _as_text(case.target if text is None else text)
    if needle is None:
        return _NO_TARGET
    haystack = output.text
    if ignore_case:
        needle, haystack = needle.casefold(), haystack.casefold()
    return Score(1.0) if needle in haystack else Score(0.0, f"{clip(repr(needle), 60)} not found")


@functools.lru_cache(maxsize=128)
def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"regex: invalid pattern {pattern!r}: {e}") from None


@register("regex", primary="pattern")
def regex(case: Case, output: Output, *, pattern: str, fullmatch: bool = False) -> Score:
    """`pattern` matches anywhere in the stripped output (or all of it, with `fullmatch`).

    An invalid pattern raises ConfigError on first use (compiled once, cached).
    """
    if not isinstance(pattern, str):
        raise ConfigError(f"regex: 'pattern' must be a string, got {type(pattern).__name__}")
    rx, text = _compile(pattern), output.text.strip()
    if (rx.fullmatch if fullmatch else rx.search)(text):
        return Score(1.0)
    return Score(0.0, f"no {'full ' if fullmatch else ''}match for /{clip(pattern, 60)}/")


def _squad_tokens(text: str) -> list[str]:
    """SQuAD answer normalization: lowercase, drop punctuation and articles, split on whitespace."""
    return _ARTICLES.sub(" ", strip_punctuation(text.lower())).split()


def _f_measure(overlap: int, n_pred: int, n_gold: int) -> Score:
    """F1 from an overlap count; two empty texts agree (1.0), one empty text scores 0."""
    if not n_pred or not n_gold:
        return Score(float(n_pred == n_gold), "" if n_pred == n_gold else "empty text")
    if not overlap:
        return Score(0.0, "no overlap")
    p, r = overlap / n_pred, overlap / n_gold
    return Score(2 * p * r / (p + r), f"precision {p:.2f}, recall {r:.2f}")


@register("f1", binary=False, needs_target=True)
def f1(case: Case, output: Output) -> Score:
    """SQuAD-style token F1: multiset overlap of normalized tokens."""
    gold = _as_text(case.target)
    if gold is None:
        return _NO_TARGET
    pred_t, gold_t = _squad_tokens(output.text), _squad_tokens(gold)
    overlap = sum((Counter(pred_t) & Counter(gold_t)).values())
    return _f_measure(overlap, len(pred_t), len(gold_t))


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Longest common subsequence by dynamic programming, one row of the shorter sequence."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


@register("rouge_l", binary=False, needs_target=True)
def rouge_l(case: Case, output: Output) -> Score:
    """ROUGE-L F-measure (beta = 1) on lowercased whitespace tokens."""
    gold = _as_text(case.target)
    if gold is None:
        return _NO_TARGET
    pred_t, gold_t = output.text.lower().split(), gold.lower().split()
    return _f_measure(_lcs_length(pred_t, gold_t), len(pred_t), len(gold_t))

"""Judge prompts, JSON verdict schemas, parsing and the noise statistics: pure functions, no I/O.

A rubric verdict is `{"score": n, "reason": ...}` on a stated scale, or `{"verdict": "pass"|"fail",
"reason": ...}`; a pairwise verdict is `{"winner": "A"|"B"|"tie", "reason": ...}`. Every reply is
validated with jsonschema; anything else is invalid, and an invalid verdict is never a pass.
"""
from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from jsonschema import Draft202012Validator

from evalkit.formatting import plain_number
from evalkit.scorers.structured import clip, parse_json_output
from evalkit.types import Score

PASS_FAIL: Final = "pass_fail"
Scale = tuple[float, float] | Literal["pass_fail"]  # (min, max) or PASS_FAIL

SYSTEM_PROMPT = ("You are a careful, impartial evaluator of AI assistant responses. "
                 "Judge only by the rubric. Reply with one JSON object and nothing else.")
DEFAULT_PAIRWISE_RUBRIC = "- Helpful: answers what was asked.\n- Correct.\n- Clear and concise."


class VerdictError(ValueError):
    """The judge's reply is not a valid verdict (not JSON, or not matching the schema)."""


@dataclass(frozen=True)
class Verdict:
    """One judge sample after parsing (and re-asking): `data` is None when it stayed invalid."""

    data: Mapping[str, Any] | None
    raw: str = ""
    error: str = ""
    calls: int = 0  # completions made for it this run (re-asks included)
    cached: int = 0  # completions answered from the cache

    @property
    def valid(self) -> bool:
        return self.data is not None


# ---------------------------------------------------------------- schemas and prompts

# "one short sentence" is asked; the bound lets a server that enforces the schema (constrained
# decoding: vLLM, evalkit serve) end a rambling judge's reason instead of running to max_tokens
REASON: Final[dict[str, Any]] = {"type": "string", "maxLength": 300}


def rubric_schema(scale: Scale) -> dict[str, Any]:
    if scale == PASS_FAIL:
        field: dict[str, Any] = {"verdict": {"enum": ["pass", "fail"]}}
    else:
        lo, hi = scale
        field = {"score": {"type": "number", "minimum": lo, "maximum": hi}}
    return {"type": "object", "required": [*field, "reason"],
            "properties": {**field, "reason": REASON}}


def request_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The verdict schema as sent in response_format, tighter than the one replies are validated
    against, for servers that enforce it token by token (vLLM, evalkit serve): closed (no extra
    keys) and, on an integral scale, an integer score, as the prompt asks; otherwise a weak judge
    can wander into extra keys or endless decimals until max_tokens."""
    props = dict(schema["properties"])
    score = props.get("score")
    if score and float(score["minimum"]).is_integer() and float(score["maximum"]).is_integer():
        props["score"] = score | {"type": "integer"}
    return {**schema, "properties": props, "additionalProperties": False}


PAIRWISE_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["winner", "reason"],
    "properties": {"winner": {"enum": ["A", "B", "tie"]}, "reason": REASON},
}


def transcript(messages: Sequence[Mapping[str, str]] | None, prompt: str | None) -> str:
    """The conversation the response answers, as plain text for the judge."""
    if messages:
        return "\n\n".join(f"[{m.get('role', 'user')}]\n{m.get('content', '')}" for m in messages)
    return prompt or ""


def _reference_block(reference: Any) -> str:
    if reference is None:
        return ""
    text = reference if isinstance(reference, str) else json.dumps(reference, ensure_ascii=False)
    return f"# Reference answer (for guidance)\n{text}\n\n"


def rubric_messages(rubric: str, conversation: str, response: str, scale: Scale,
                    reference: Any = None) -> list[dict[str, str]]:
    if scale == PASS_FAIL:
        ask = ('Does the response pass the rubric? Reply with JSON only, exactly in this form: '
               '{"verdict": "pass" or "fail", "reason": "<one short sentence>"}')
    else:
        lo, hi = (plain_number(v) for v in scale)
        ask = (f"Grade the response from {lo} (worst) to {hi} (best). Reply with JSON only, exactly in this form: "
               f'{{"score": <integer from {lo} to {hi}>, "reason": "<one short sentence>"}}')
    user = (f"# Rubric\n{rubric.strip()}\n\n# Conversation\n{conversation}\n\n{_reference_block(reference)}"
            f"# Response to grade\n{response}\n\n{ask}")
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def pairwise_messages(rubric: str, conversation: str, response_a: str, response_b: str,
                      reference: Any = None) -> list[dict[str, str]]:
    ask = ('Which response is better by the rubric? Reply with JSON only, exactly in this form: '
           '{"winner": "A" or "B" or "tie", "reason": "<one short sentence>"}')
    user = (f"# Rubric\n{rubric.strip()}\n\n# Conversation\n{conversation}\n\n{_reference_block(reference)}"
            f"# Response A\n{response_a}\n\n# Response B\n{response_b}\n\n{ask}")
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def reask_messages(messages: Sequence[Mapping[str, str]], bad_reply: str, error: str) -> list[dict[str, str]]:
    """Follow-up after an unparseable verdict: show the judge its reply and the problem, so a
    deterministic (temperature 0) judge does not just repeat itself."""
    return [*map(dict, messages), {"role": "assistant", "content": bad_reply},
            {"role": "user", "content": f"That reply is not a valid verdict ({error}). "
                                        "Reply again with only the JSON object, in the form asked."}]


# ---------------------------------------------------------------- parsing

def _first_object(text: str) -> Any:
    """The reply as JSON (a ```json fence allowed), else the first JSON object embedded in prose."""
    value, err = parse_json_output(text)
    if err is None:
        return value
    decoder = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch == "{":
            try:
                return decoder.raw_decode(text, i)[0]
            except json.JSONDecodeError:
                continue
    raise VerdictError(f"no JSON object in reply: {clip(text)!r}")


def _coerce(obj: dict[str, Any], schema: Mapping[str, Any]) -> dict[str, Any]:
    """Forgive what a small judge often gets cosmetically wrong: "4" for 4, "Tie" for "tie"."""
    out = dict(obj)
    for name, prop in schema.get("properties", {}).items():
        value = out.get(name)
        if not isinstance(value, str):
            continue
        if prop.get("type") == "number":
            with contextlib.suppress(ValueError):
                out[name] = float(value.strip())
        elif "enum" in prop:
            match = [e for e in prop["enum"] if e.lower() == value.strip().lower()]
            if match:
                out[name] = match[0]
    return out


def parse_verdict(text: str, schema: Mapping[str, Any]) -> dict[str, Any]:
    """The validated verdict object, or VerdictError saying what is wrong."""
    obj = _first_object(text)
    if not isinstance(obj, dict):
        raise VerdictError(f"expected a JSON object, got {type(obj).__name__}")
    obj = _coerce(obj, schema)
    error = next(iter(Draft202012Validator(schema).iter_errors(obj)), None)
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path) or "verdict"
        raise VerdictError(f"{where}: {error.message}")
    return obj


# ---------------------------------------------------------------- aggregation and noise

def majority(values: Sequence[float]) -> float:
    """Most common value; a tie goes to the lowest tied value (the conservative side: for
    pass/fail that is fail, for pairwise a loss). Values must be orderable."""
    counts = Counter(values)
    top = max(counts.values())
    return min(v for v, c in counts.items() if c == top)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def aggregate(values: Sequence[float], how: str) -> float:
    if how == "majority":
        return majority(values)
    if how == "mean":
        return mean(values)
    raise ValueError(f"unknown aggregate '{how}'")


def flipped(values: Sequence[Any]) -> bool:
    """The k samples on one item did not all agree."""
    return len(set(values)) > 1


def rate(flags: Sequence[bool]) -> float | None:
    """Fraction of True; None when there is nothing to measure."""
    return sum(flags) / len(flags) if flags else None


def rubric_value(data: Mapping[str, Any], scale: Scale) -> float:
    """A verdict's raw score: 1/0 for pass/fail, the number on the scale otherwise."""
    if scale == PASS_FAIL:
        return 1.0 if data["verdict"] == "pass" else 0.0
    return float(data["score"])


def normalize(raw: float, scale: Scale) -> float:
    """Raw score -> [0, 1]."""
    if scale == PASS_FAIL:
        return raw
    lo, hi = scale
    return (raw - lo) / (hi - lo)


def pairwise_value(winner: str, candidate_first: bool) -> float:
    """The candidate's outcome from one ordering: 1 win, 0.5 tie, 0 loss."""
    if winner == "tie":
        return 0.5
    return 1.0 if (winner == "A") == candidate_first else 0.0


def combine_orders(first: float, second: float, how: str) -> tuple[float, bool]:
    """Both orderings' outcomes -> (value, disagree). Under majority an inconsistent pair is a
    tie (position bias cancelled, as MT-Bench does); under mean the two are averaged."""
    disagree = first != second
    if not disagree:
        return first, False
    return (0.5 if how == "majority" else (first + second) / 2), True


def outcome_label(value: float) -> str:
    return "win" if value > 0.5 else "loss" if value < 0.5 else "tie"


# ---------------------------------------------------------------- agreement with human labels

def accuracy(judge: Sequence[Hashable], human: Sequence[Hashable]) -> float | None:
    if len(judge) != len(human):
        raise ValueError("label lists differ in length")
    return rate([j == h for j, h in zip(judge, human)])


def cohens_kappa(judge: Sequence[Hashable], human: Sequence[Hashable]) -> float | None:
    """Unweighted Cohen's kappa: (p_o - p_e) / (1 - p_e). None when undefined (no items, or both
    raters used one and the same label throughout, p_e = 1)."""
    n = len(judge)
    if n != len(human):
        raise ValueError("label lists differ in length")
    if n == 0:
        return None
    p_o = sum(j == h for j, h in zip(judge, human)) / n
    cj, ch = Counter(judge), Counter(human)
    p_e = sum(cj[label] * ch[label] for label in cj) / (n * n)
    if p_e == 1:
        return None
    return (p_o - p_e) / (1 - p_e)


# ---------------------------------------------------------------- verdicts -> one Score per item

def _first_error(verdicts: Sequence[Verdict]) -> str:
    return next((v.error for v in verdicts if not v.valid), "no verdict")


def score_rubric(verdicts: Sequence[Verdict], scale: Scale, how: str) -> Score:
    """k rubric verdicts on one item -> Score in [0, 1] (raw score, samples and flip kept in meta)."""
    samples = [rubric_value(v.data, scale) if v.data is not None else None for v in verdicts]
    values = [s for s in samples if s is not None]
    meta: dict[str, Any] = {"samples": samples, "n_invalid": len(samples) - len(values)}
    if not values:
        return Score(None, f"invalid: {_first_error(verdicts)}", meta)
    raw = aggregate(values, how)
    # the reason of the sample closest to the aggregate explains it best
    best = min((v.data for v in verdicts if v.data is not None), key=lambda d: abs(rubric_value(d, scale) - raw))
    return Score(normalize(raw, scale), str(best.get("reason", "")),
                 {**meta, "raw": raw, "flip": flipped(values)})


def score_pairwise(candidate_first: Sequence[Verdict], reference_first: Sequence[Verdict], how: str) -> Score:
    """k verdicts per ordering -> the candidate's outcome (1 win, 0.5 tie, 0 loss). Both orderings
    must have a valid verdict, else position bias could not be cancelled and the item is invalid."""
    orders = {"candidate_first": (candidate_first, True), "reference_first": (reference_first, False)}
    values = {name: [pairwise_value(v.data["winner"], first) for v in vs if v.data is not None]
              for name, (vs, first) in orders.items()}
    meta: dict[str, Any] = {"samples": values,
                            "n_invalid": sum(not v.valid for vs, _ in orders.values() for v in vs)}
    for name, (vs, _) in orders.items():
        if not values[name]:
            return Score(None, f"invalid: {name.replace('_', ' ')}: {_first_error(vs)}", meta)
    first = aggregate(values["candidate_first"], how)
    second = aggregate(values["reference_first"], how)
    value, disagree = combine_orders(first, second, how)
    reasons = [next(str(v.data.get("reason", "")) for v in vs if v.data is not None) for vs, _ in orders.values()]
    reason = (f"{outcome_label(value)}; candidate shown first: {outcome_label(first)} ({reasons[0]}); "
              f"reference shown first: {outcome_label(second)} ({reasons[1]})")
    return Score(value, reason, {**meta, "order_disagree": disagree,
                                 "orders": {"candidate_first": first, "reference_first": second},
                                 "flip": flipped(values["candidate_first"]) or flipped(values["reference_first"])})


def judge_label(score: Score, mode: str, scale: Scale) -> Hashable:
    """The judge's categorical label for agreement with a human label."""
    if score.value is None:
        return "invalid"
    if mode == "pairwise":
        return outcome_label(score.value)
    return round(score.meta["raw"])


def human_label(label: Any, mode: str, scale: Scale) -> Hashable:
    """A human label as written in an anchors file, on the same categories as judge_label."""
    if mode == "pairwise":
        mapped = {"a": "win", "b": "loss", "tie": "tie", "win": "win", "loss": "loss"}.get(str(label).lower())
        if mapped is None:
            raise ValueError(f"pairwise label must be A, B or tie, not {label!r}")
        return mapped
    if scale == PASS_FAIL:
        if isinstance(label, bool) or str(label).lower() in ("pass", "fail"):
            return int(label is True or str(label).lower() == "pass")
        raise ValueError(f"pass_fail label must be pass or fail, not {label!r}")
    if isinstance(label, bool) or not isinstance(label, (int, float)) or not scale[0] <= label <= scale[1]:
        raise ValueError(f"label must be a number from {plain_number(scale[0])} to {plain_number(scale[1])}, not {label!r}")
    return round(label)

"""Structured-output scorers: is the output JSON, and does it match a JSON Schema.

`parse_json_output` is the one place that decides what counts as "the output is JSON"; the
text scorers reuse it so every scorer agrees.
"""
from __future__ import annotations

import functools
import json
import re
from typing import Any

import jsonschema
from jsonschema.exceptions import best_match
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for

from evalkit.errors import ConfigError
from evalkit.scorers.registry import register
from evalkit.types import Case, Output, Score

# The whole output may be one fenced block (```json ... ``` or bare ```), as chat models like to
# answer; JSON embedded in prose is deliberately NOT accepted: "reply with JSON only" is the task.
_FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL | re.IGNORECASE)


def parse_json_output(text: str) -> tuple[Any, str | None]:
    """`(value, None)` when `text` is JSON (surrounding whitespace or one ```json fence allowed),
    else `(None, "<json error> at line L col C")`. Check the error, not the value: `null` is JSON."""
    body = text.strip()
    if fenced := _FENCE.fullmatch(body):
        body = fenced.group(1)
    try:
        return json.loads(body), None
    except json.JSONDecodeError as e:
        return None, f"{e.msg} at line {e.lineno} col {e.colno}"


def clip(text: str, limit: int = 80) -> str:
    """Reasons are kept per sample: long model output must not bloat the run record."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


@register("json_valid")
def json_valid(case: Case, output: Output) -> Score:
    _, err = parse_json_output(output.text)
    return Score(0.0, f"not JSON: {err}") if err else Score(1.0)


@functools.lru_cache(maxsize=32)
def _validator(schema_json: str) -> Validator:
    """Checked and built once per distinct schema (keyed by its canonical JSON), not per sample."""
    schema = json.loads(schema_json)
    cls = validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise ConfigError(f"invalid JSON Schema at {e.json_path}: {e.message}") from None
    return cls(schema)


@register("json_schema", primary="schema", path_params=("schema",))
def json_schema(case: Case, output: Output, *, schema: dict[str, Any]) -> Score:
    """Output parses as JSON and validates; the reason names the failing field as a JSON path.

    Draft 2020-12 unless the schema's `$schema` says otherwise; `format` is an annotation (the
    spec default), so results do not depend on which optional format checkers are installed.
    """
    if not isinstance(schema, (dict, bool)):
        raise ConfigError(f"json_schema: 'schema' must be a JSON Schema object or a path to one, "
                          f"got {type(schema).__name__}")
    validator = _validator(json.dumps(schema, sort_keys=True))  # first: a broken schema fails the dry run
    value, err = parse_json_output(output.text)
    if err:
        return Score(0.0, f"not JSON: {err}")
    error = best_match(validator.iter_errors(value))
    if error is None:
        return Score(1.0)
    return Score(0.0, f"{error.json_path}: {clip(error.message, 160)}",
                 meta={"path": error.json_path, "validator": error.validator})

"""Built-in scorers, one hand-made case each, and the registry's build() checks."""
from __future__ import annotations

import json

import pytest

from evalkit.errors import ConfigError
from evalkit.scorers import REGISTRY, build, get
from evalkit.scorers.structured import parse_json_output
from evalkit.types import Case, Output

PERSON = {"name": "Ada", "age": 36, "city": "London"}
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def score(name: str, target, text: str, /, **params):
    return build(name, params)(Case("c1", prompt="q", target=target), Output(text))


@pytest.mark.parametrize("text, value, error", [
    (' {"a": 1}\n', {"a": 1}, None),
    ('```json\n{"a": [1, 2]}\n```', {"a": [1, 2]}, None),
    ("```\nnull\n```", None, None),
    ('Sure! {"a": 1}', None, "Expecting value at line 1 col 1"),
    ('{"a": 1,}', None, "Expecting property name enclosed in double quotes at line 1 col 9"),
])
def test_parse_json_output(text, value, error):
    assert parse_json_output(text) == (value, error)


@pytest.mark.parametrize("target, text, params, value, reason", [
    ("Paris", "  Paris \n", {}, 1.0, ""),
    ("New  York", "new york", {"ignore_case": True}, 1.0, ""),
    ("Paris", "Paris.", {}, 0.0, "expected 'Paris', got 'Paris.'"),
    ("Paris", "Paris.", {"remove_punctuation": True}, 1.0, ""),
    (42, " 42", {}, 1.0, ""),
    (PERSON, '```json\n{"city": "London", "age": 36, "name": "Ada"}\n```', {}, 1.0, ""),
    (PERSON, '{"name": "Ada", "age": 35, "city": "London"}', {}, 0.0, "$.age: expected 36, got 35"),
    (PERSON, '{"name": "Ada", "age": 36}', {}, 0.0, "$.city: missing"),
    ({"ok": 1}, '{"ok": true}', {}, 0.0, "$.ok: expected 1, got true"),
    (PERSON, 'Here you go: {"name": "Ada"}', {}, 0.0, "not JSON: Expecting value at line 1 col 1"),
    ('{"a": [1, 2]}', '{"a": [1, 2, 3]}', {"json": True}, 0.0, "$.a: expected 2 items, got 3"),
    (None, "anything", {}, None, "case has no target"),
])
def test_exact_match(target, text, params, value, reason):
    s = score("exact_match", target, text, **params)
    assert (s.value, s.reason) == (value, reason)


def test_exact_match_rejects_bad_json_option():
    with pytest.raises(ConfigError, match="'json' must be auto, true or false"):
        score("exact_match", "x", "x", json="yes")


def test_contains():
    assert score("contains", "Paris", "The capital is Paris.").value == 1.0
    assert score("contains", None, "The capital is PARIS.", text="paris", ignore_case=True).value == 1.0
    s = score("contains", "Paris", "The capital is Lyon.")
    assert (s.value, s.reason) == (0.0, "'Paris' not found")


def test_regex():
    assert score("regex", None, "Answer: 42\n", pattern=r"\d+").value == 1.0
    assert score("regex", None, "Answer: 42\n", pattern=r"Answer: \d+", fullmatch=True).value == 1.0
    s = score("regex", None, "Answer: 42", pattern=r"\d+", fullmatch=True)
    assert (s.value, s.reason) == (0.0, r"no full match for /\d+/")
    with pytest.raises(ConfigError, match="invalid pattern"):
        score("regex", None, "x", pattern="(unclosed")


def test_f1_squad_style():
    # articles and punctuation dropped: pred {cat, sat, on, mat, today}, gold {cat, sat, on, mat}
    s = score("f1", "The cat sat on the mat.", "A cat sat on a mat today!")
    assert s.value == pytest.approx(2 * 0.8 * 1.0 / 1.8)
    assert s.reason == "precision 0.80, recall 1.00"
    assert score("f1", "Paris", "London").value == 0.0
    assert get("f1").binary is False


def test_rouge_l():
    # LCS of "the cat sat on the mat" and "the cat was on a mat": the cat on mat -> 4 of 6 each way
    s = score("rouge_l", "The cat sat on the mat", "the cat was on a mat")
    assert s.value == pytest.approx(4 / 6)
    assert score("rouge_l", "a b c", "c b a").value == pytest.approx(1 / 3)
    assert get("rouge_l").binary is False


def test_json_valid():
    assert score("json_valid", None, '```json\n[1, 2]\n```').value == 1.0
    s = score("json_valid", None, '{"a": 1')
    assert (s.value, s.reason) == (0.0, "not JSON: Expecting ',' delimiter at line 1 col 8")


@pytest.mark.parametrize("text, value, reason", [
    ('{"name": "Ada", "age": 36}', 1.0, ""),
    ('{"name": "Ada", "age": "abc"}', 0.0, "$.age: 'abc' is not of type 'integer'"),
    ('{"name": "Ada"}', 0.0, "$: 'age' is a required property"),
    ("Ada, 36", 0.0, "not JSON: Expecting value at line 1 col 1"),
])
def test_json_schema(text, value, reason):
    s = score("json_schema", None, text, schema=SCHEMA)
    assert (s.value, s.reason) == (value, reason)


def test_json_schema_loads_path_param(tmp_path):
    (tmp_path / "person.schema.json").write_text(json.dumps(SCHEMA))
    scorer = build("json_schema", {"schema": "person.schema.json"}, base_dir=tmp_path)
    assert scorer(Case("c1", prompt="q"), Output('{"name": "Ada", "age": 36}')).value == 1.0
    with pytest.raises(ConfigError, match="file not found"):
        build("json_schema", {"schema": "missing.json"}, base_dir=tmp_path)


def test_json_schema_invalid_schema_is_a_config_error():
    with pytest.raises(ConfigError, match="invalid JSON Schema"):
        score("json_schema", None, "{}", schema={"type": "no-such-type"})


def test_build_unknown_scorer_suggests_name():
    with pytest.raises(ConfigError, match="unknown scorer 'exact_mach'; did you mean 'exact_match'"):
        build("exact_mach", {})


def test_build_rejects_unknown_and_missing_params():
    with pytest.raises(ConfigError, match="has no parameter 'ignorecase'; did you mean 'ignore_case'"):
        build("contains", {"ignorecase": True})
    with pytest.raises(ConfigError, match="needs parameter"):
        build("regex", {})


def test_registry_declarations():
    assert {"exact_match", "contains", "regex", "f1", "rouge_l", "json_valid", "json_schema"} <= set(REGISTRY)
    assert get("regex").primary == "pattern" and get("json_schema").primary == "schema"
    assert get("json_schema").path_params == {"schema"}

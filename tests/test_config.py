"""Every user mistake in a suite: exit 4, `FILE:LINE PATH: message`, no traceback."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import EXTRACT_ROWS, make_adapter, write_jsonl

from evalkit.cli import main
from evalkit.config import load_suite
from evalkit.errors import ConfigError

SUITE = """\
name: cfg
base: {{path: {base}}}
variants:
  - {{name: base}}
  - {{name: lora, adapter: {adapter}}}
tasks:
  - name: extract
    data: data.jsonl
    scorers: [exact_match, json_valid]
    max_new_tokens: 8
gates:
  - {{metric: extract.exact_match, min: 0.0}}
"""


@pytest.fixture
def suite_dir(tmp_path, tiny_model_dir, tiny_adapter):
    write_jsonl(tmp_path / "data.jsonl", EXTRACT_ROWS[:2])
    return tmp_path


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory, tiny_model_dir):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("ad") / "lora")


def write(suite_dir: Path, text: str) -> Path:
    p = suite_dir / "suite.yml"
    p.write_text(text)
    return p


def run_cli(capsys, path: Path, *extra: str) -> tuple[int, str]:
    code = main(["validate", str(path), *extra])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_valid_suite_loads(suite_dir, tiny_model_dir, tiny_adapter):
    suite = load_suite(write(suite_dir, SUITE.format(base=tiny_model_dir, adapter=tiny_adapter)))
    assert [v.name for v in suite.variants] == ["base", "lora"]
    assert suite.tasks[0].data == (suite_dir / "data.jsonl").resolve()  # relative to the suite file
    assert suite.gates[0].metric == "extract.exact_match" and suite.reference == "base"


@pytest.mark.parametrize("edit, expected", [
    (lambda s: s.replace("    max_new_tokens: 8", "    max_new_tokenz: 8"),
     "suite.yml:10 tasks[0].max_new_tokenz: unknown key 'max_new_tokenz'; did you mean 'max_new_tokens'?"),
    (lambda s: s.replace("[exact_match, json_valid]", "[exact_match, json_vald]"),
     "suite.yml:9 tasks[0].scorers[1]: unknown scorer 'json_vald'; did you mean 'json_valid'?"),
    (lambda s: s.replace("data: data.jsonl", "data: nope.jsonl"), "suite.yml:8 tasks[0].data: data file not found"),
    (lambda s: s.replace("{name: lora, adapter: ", "{name: lora, adapter: /nonexistent"),
     "suite.yml:5 variants[1].adapter: adapter folder not found"),
    (lambda s: s.replace("variants:\n", "variants:\n  - {name: base\n"), "suite.yml:5: invalid YAML"),
    (lambda s: s.replace("extract.exact_match", "extract.exact_mach"),
     "suite.yml:12 gates[0].metric: task 'extract' has no metric 'exact_mach'; did you mean 'exact_match'?"),
    (lambda s: s.replace("name: cfg", "name: cfg\nvariantz: []"),
     "suite.yml:2 variantz: unknown key 'variantz'; did you mean 'variants'?"),
    (lambda s: s.replace("min: 0.0", "mni: 0.0"), "suite.yml:12 gates[0].mni: unknown key 'mni'; did you mean 'min'?"),
    (lambda s: s.replace("min: 0.0", "min: 0.0, confidence: 0.5"), "suite.yml:12 gates[0].confidence: "),
    (lambda s: s.replace("min: 0.0", "max_drop: 2, min: 0.5"),
     "suite.yml:12 gates[0].max_drop: `max_drop` is a gate of its own: give it without other thresholds"),
    (lambda s: s.replace("max_new_tokens: 8", "max_new_tokens: 8\n    invalid: ignore"), "suite.yml:11 tasks[0].invalid: "),
])
def test_user_mistakes_exit_4_with_location(capsys, suite_dir, tiny_model_dir, tiny_adapter, edit, expected):
    path = write(suite_dir, edit(SUITE.format(base=tiny_model_dir, adapter=tiny_adapter)))
    code, text = run_cli(capsys, path)
    assert code == 4
    assert expected in text
    assert "Traceback" not in text


def test_missing_suite_file(capsys, tmp_path):
    code, text = run_cli(capsys, tmp_path / "absent.yml")
    assert code == 4 and "file not found" in text and "Traceback" not in text


def test_bad_jsonl_row_names_file_and_line(tmp_path):
    from evalkit.tasks.generation import load_cases

    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "target": "b"}\n{"prompt": "a", target}\n')
    with pytest.raises(ConfigError, match=r"d.jsonl:2: invalid JSON"):
        load_cases(p)


def test_scorer_file_params_resolve_against_suite(suite_dir, tiny_model_dir, tiny_adapter):
    (suite_dir / "s.json").write_text(json.dumps({"type": "object", "required": ["n"]}))
    text = SUITE.format(base=tiny_model_dir, adapter=tiny_adapter).replace(
        "[exact_match, json_valid]", "[exact_match, {json_schema: s.json}]")
    suite = load_suite(write(suite_dir, text))
    assert suite.tasks[0].scorers[1].name == "json_schema"


def test_bad_regex_is_a_located_config_error(capsys, suite_dir, tiny_model_dir, tiny_adapter):
    text = SUITE.format(base=tiny_model_dir, adapter=tiny_adapter).replace(
        "[exact_match, json_valid]", "[exact_match, {regex: '([a-z'}]")
    code, out = run_cli(capsys, write(suite_dir, text))
    assert code == 4 and "suite.yml:9 tasks[0].scorers[1]:" in out and "Traceback" not in out


def test_gate_ids_are_distinct(suite_dir, tiny_model_dir, tiny_adapter):
    text = SUITE.format(base=tiny_model_dir, adapter=tiny_adapter) + (
        "  - {metric: extract.exact_match, min: 0.5}\n"
        "  - {metric: extract.exact_match, max_drop: 1}\n")
    suite = load_suite(write(suite_dir, text))
    assert [g.id for g in suite.gates] == ["extract.exact_match", "extract.exact_match#2",
                                           "extract.exact_match-vs-base", "stops_generating", "no_leakage"]  # on by default


def test_gates_on_different_variants_keep_their_ids(suite_dir, tiny_model_dir, tiny_adapter):
    text = SUITE.format(base=tiny_model_dir, adapter=tiny_adapter) + (
        "  - {check: adapter_active, variant: lora}\n"
        "  - {check: adapter_active, variant: base}\n"
        "  - {check: adapter_active}\n")
    suite = load_suite(write(suite_dir, text))
    assert [g.id for g in suite.gates][1:-2] == ["adapter_active", "adapter_active", "adapter_active#3"]


@pytest.mark.parametrize("name", ["demo.yml", "judge-demo.yml", "matrix.yml"])
def test_bundled_suites_validate(capsys, name):
    from conftest import REPO

    code = main(["validate", str(REPO / "suites" / name)])
    assert code == 0, capsys.readouterr().err

"""The second batch of user mistakes (issue 25), each through the CLI: `evalkit run` and `evalkit
validate` refuse it with exit 4 at its FILE:LINE PATH, before any model loads, never a traceback;
and a gate that gates nothing cannot pass."""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import EXTRACT_ROWS, cli, write_jsonl

from evalkit.cli import main
from evalkit.console_summary import verdict_line
from evalkit.errors import ExitCode

REPO = Path(__file__).resolve().parents[1]
RECIPE = "method: lora\nbase: {path: ./model}\ndata: {train: train.jsonl}\noutput: out\n"


@pytest.fixture
def workdir(tmp_path) -> Path:
    write_jsonl(tmp_path / "data.jsonl", EXTRACT_ROWS)
    write_jsonl(tmp_path / "train.jsonl", EXTRACT_ROWS)
    (tmp_path / "model").mkdir()
    (tmp_path / "adapter").mkdir()
    return tmp_path


def suite(workdir: Path, *, variants=None, tasks=None, gates=()) -> str:
    """One list item per line: with two variants and one task, variants[1] is on line 5, tasks[0]
    on line 7 and gates[0] on line 9."""
    variants = variants or [{"name": "base"}, {"name": "lora", "adapter": "adapter"}]
    tasks = tasks or [{"name": "t", "data": "data.jsonl", "scorers": ["exact_match"]}]
    text = "name: s\nbase: {path: model}\n"
    for key, items in (("variants", variants), ("tasks", tasks), ("gates", gates)):
        text += f"{key}:\n" + "".join(f"  - {json.dumps(item)}\n" for item in items) if items else f"{key}: []\n"
    (workdir / "s.yml").write_text(text)
    return str(workdir / "s.yml")


def refused(capsys, path: str, where: str, message: str) -> str:
    """Both commands refuse the suite the same way, with exit 4 and the place."""
    for command in ("validate", "run"):
        code, text = cli(capsys, command, path)
        assert code == ExitCode.USAGE_ERROR, text
        assert re.search(rf"{re.escape(where)}: .*{re.escape(message)}", text), text
    return text


def test_a_gate_that_applies_to_no_variant_is_refused_never_passed(capsys, workdir):
    # a served model without an adapter is a base: a gate "on every adapter" would gate nothing
    path = suite(workdir, variants=[{"name": "base"}, {"name": "served"}],
                 gates=[{"metric": "t.exact_match", "max_drop": 2, "vs": "base", "confidence": 0.95}])
    text = refused(capsys, path, "s.yml:9 gates[0]", "this gate applies to no variant")
    assert "e.g. `variant: served` (variants: base, served)" in text
    path = suite(workdir, gates=[{"check": "merge_equivalence"}])
    refused(capsys, path, "s.yml:9 gates[0]", "it covers merged variants (`merge: true`), and the suite has none")


def test_the_verdict_line_counts_gates_per_variant_and_never_passes_on_nothing():
    def record(*gates):
        return SimpleNamespace(verdict="pass", gates=[SimpleNamespace(passed=p, skipped=s, variant=v)
                                                      for v, p, s in gates])
    assert verdict_line(record(("lora", True, None), ("dora", True, None), ("lora", True, None))) == \
        "PASS: 3 passed, 0 failed (lora 2, dora 1)"
    assert verdict_line(record()).startswith("NO GATES: nothing was checked")
    assert verdict_line(record(("lora", True, "no provenance"))) == "NOTHING CHECKED: all 1 gates were skipped"
    trials = [(f"lora[r={r}]", True, None) for r in (2, 4, 8, 16, 32) for _ in range(3)]  # a sweep: counted, not listed
    assert verdict_line(record(*trials)) == "PASS: 15 passed, 0 failed (3 on each of 5 variants)"


def test_a_json_schema_that_is_not_a_schema(capsys, workdir):
    (workdir / "bad.schema.json").write_text('{"type": "strnig"}')
    path = suite(workdir, tasks=[{"name": "t", "data": "data.jsonl",
                                  "scorers": ["json_valid", {"json_schema": "bad.schema.json"}]}])
    refused(capsys, path, "s.yml:7 tasks[0].scorers[1]", "invalid JSON Schema at $.type: 'strnig' is not valid")


@pytest.mark.parametrize("gate, where, message, hint", [
    ({"metric": "t.exact_match", "min": 80}, "gates[0].min", "min: 80 is outside [0, 1], the range of t.exact_match",
     "did you mean min: 0.8?"),
    ({"metric": "t.exact_match", "max": -1}, "gates[0].max", "max: -1 is outside [0, 1]", None),
    ({"metric": "t.exact_match", "max_drop": 150}, "gates[0].max_drop", "150 points is more than", None),
])
def test_a_threshold_on_the_wrong_scale(capsys, workdir, gate, where, message, hint):
    text = refused(capsys, suite(workdir, gates=[gate]), f"s.yml:9 {where}", message)
    assert hint is None or f"hint: {hint}" in text


def test_a_threshold_on_an_unbounded_metric_is_not_a_scale_error(capsys, workdir):
    path = suite(workdir, tasks=[{"name": "d", "kind": "drift", "data": "data.jsonl"}],
                 gates=[{"metric": "d.kl", "max": 5}, {"metric": "d.ppl_ratio", "max": 1.5}])
    assert main(["validate", path]) != ExitCode.INTERNAL_ERROR  # kl, ppl_ratio: [0, inf)
    assert "outside" not in capsys.readouterr().err


@pytest.mark.parametrize("recipe, where, message", [
    (RECIPE + "training:\n  learnin_rate: 1.0e-3\n", "r.yml:6 training.learnin_rate",
     "unknown key 'learnin_rate'; did you mean 'learning_rate'?"),
    (RECIPE + "lora:\n  r: 0\n", "r.yml:6 lora.r", "must be >= 1"),
    ("extends: r.yml\n" + RECIPE, "r.yml:1 extends", "`extends:` makes a cycle: r.yml -> r.yml"),
])
def test_validate_reads_the_recipes_a_suite_trains_from(capsys, workdir, recipe, where, message):
    (workdir / "r.yml").write_text(recipe)
    path = suite(workdir, variants=[{"name": "base"}, {"name": "lora", "train": "r.yml"}])
    text = refused(capsys, path, where, message)
    assert "hint: from s.yml:5 variants[1].train" in text  # the suite's line that led there


def test_a_recipe_key_that_is_not_a_name_is_refused_in_an_extended_recipe(capsys, workdir):
    """Found by the fuzzer: `3:` (a YAML int) at the top of a recipe another one extends crashed the
    merge of the two; it is refused at its line like any unknown key."""
    (workdir / "base.yml").write_text(RECIPE + "3: {variant: x}\n")
    (workdir / "r.yml").write_text("extends: base.yml\n")
    path = suite(workdir, variants=[{"name": "base"}, {"name": "lora", "train": "r.yml"}])
    refused(capsys, path, "base.yml:5 3", "a recipe's keys are field names, not 3")


def test_validate_reads_the_training_rows(capsys, workdir):
    (workdir / "r.yml").write_text(RECIPE)
    write_jsonl(workdir / "train.jsonl", [*EXTRACT_ROWS[:2], {"prompt": "only a prompt"}])
    path = suite(workdir, variants=[{"name": "base"}, {"name": "lora", "train": "r.yml"}])
    refused(capsys, path, "train.jsonl:3", "a training row needs its answer: `target` or `completion`")


@pytest.mark.parametrize("lines, where, message", [
    ([], "data.jsonl", "no cases: the file has no rows"),
    (["", "  "], "data.jsonl", "no cases: the file has no rows"),
    ([EXTRACT_ROWS[0], EXTRACT_ROWS[1], EXTRACT_ROWS[0]], "data.jsonl:3", "duplicate case id 'c0' (first at line 1)"),
    ([{"id": "x", "prompt": "hi"}], "data.jsonl:1", "no `target` (or `completion`): scorer 'exact_match' compares"),
    ([{"id": "x", "prompt": 5, "target": "a"}], "data.jsonl:1", "`prompt` must be text"),
    ([{"id": "x", "messages": [{"role": "user"}], "target": "a"}], "data.jsonl:1", "`messages` must be a non-empty list"),
    ([{"id": ["x"], "prompt": "hi", "target": "a"}], "data.jsonl:1", "`id` must be a string or an integer"),
    ([EXTRACT_ROWS[0], "{not json"], "data.jsonl:2", "invalid JSON"),
])
def test_data_files_are_read_whole_before_anything_runs(capsys, workdir, lines, where, message):
    (workdir / "data.jsonl").write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    text = refused(capsys, suite(workdir), where, message)
    assert "hint: from s.yml:" in text or where == "data.jsonl"


def test_a_rubric_that_is_empty_or_not_text(capsys, workdir):
    judge = {"base_url": "http://127.0.0.1:9/v1", "model": "j"}
    path = suite(workdir, tasks=[{"name": "j", "kind": "judge", "data": "data.jsonl", "rubric": "rubric.md",
                                  "judge": judge}])
    (workdir / "rubric.md").write_text("\n")
    refused(capsys, path, "rubric.md", "the rubric file is empty")
    (workdir / "rubric.md").write_bytes(b"grade \xff it")
    refused(capsys, path, "rubric.md:1", "not UTF-8 text")


def test_validate_says_what_it_checked_for_every_shipped_suite(capsys):
    suites = sorted(str(p) for p in (REPO / "suites").glob("*.yml"))
    code, text = cli(capsys, "validate", *suites)
    assert code == 0, text
    for name in ("demo", "candidate", "judge-demo", "matrix", "pitfalls"):
        assert f"{name}.yml: ok" in text
    for line in ("checked recipe", "trainers/recipes/lora.yml (lora): 400 training rows", "leakage checked against",
                 "checked task extract: 50 cases", "(target checked for exact_match)",
                 "json_schema file", "extract.schema.json (read and checked)", "rubric", "helpful.md", "anchors",
                 "MMLU slice of 114 questions", "drift: 32 passages", "baseline store"):
        assert line in text, line


def test_validate_goes_on_past_a_bad_suite_and_exits_with_the_worst(capsys, workdir):
    good = suite(workdir)
    bad = workdir / "bad.yml"
    bad.write_text("name: [\n")
    code, text = cli(capsys, "validate", str(bad), good)
    assert code == ExitCode.USAGE_ERROR and "bad.yml:" in text and "s.yml: ok" in text


@pytest.mark.parametrize("text, where, message", [
    ("name: a\nbase: {path: model}\nname: b\n", "s.yml:3 name", "duplicate key 'name' (first at line 1)"),
    ("name: &r [*r]\n", "s.yml:1 name[0]", "a recursive alias"),
    ("name: " + "[" * 3000 + "]" * 3000 + "\n", "s.yml", "nested too deeply"),
    ("name: s\n[a, b]: 1\n", "s.yml:2", "invalid YAML"),
])
def test_yaml_that_cannot_mean_what_it_says(capsys, workdir, text, where, message):
    (workdir / "s.yml").write_text(text)
    refused(capsys, str(workdir / "s.yml"), where, message)

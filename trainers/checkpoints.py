"""Intermediate checkpoints of a training run (issue 27, checkpoints as variants): with
`checkpoint_every=N` the adapter at every N-th optimizer step below the last is kept in
`<adapter>/checkpoints/step-<S>/` (weights, tokenizer and chat template, and an `evalkit_train.json`
of its own), so each can be evaluated as a variant of the same run (`lora@step30`).

Keeping checkpoints leaves training untouched, so the final adapter (and its fingerprint) is the same
with or without them (tests/test_checkpoints.py compares the tensors): the callback only saves and
logs the train loss at those steps; the held-out loss of a checkpoint whose step had no scheduled
evaluation is measured after training, on its saved weights. An evaluation forced mid-training would
draw from torch's global RNG (each DataLoader iterator draws its base seed), which changes the dropout
masks of every later step, and with early stopping it would count towards patience and could make a
step without a saved checkpoint the "best" one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainers.provenance import PROVENANCE_FILE, fingerprint, read_provenance, write_provenance

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", PROVENANCE_FILE)
CHECKPOINTS_DIR = "checkpoints"


@dataclass(frozen=True)
class Checkpoint:
    """The adapter at `step` of a run, kept beside its final adapter, with its own provenance."""

    step: int
    adapter_dir: Path
    provenance: dict[str, Any]


@dataclass(frozen=True)
class Mark:
    """When training reached a checkpoint's step: seconds since training began, and the clock then."""

    step: int
    train_s: float
    clock: float  # time.perf_counter()


def checkpoint_dir(adapter_dir: Path, step: int) -> Path:
    return adapter_dir / CHECKPOINTS_DIR / f"step-{step}"


def check_every(every: int | None) -> None:
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"checkpoint_every takes a number of optimizer steps (1 or more), got {every!r}")


def checkpoint_fingerprint(parts: dict[str, str], step: int) -> tuple[dict[str, str], str]:
    """(parts, fingerprint) of the checkpoint at `step`: the run's parts plus the step, so it never
    collides with the final adapter's or another step's."""
    own = {**parts, "checkpoint": f"step-{step}"}
    return own, fingerprint(own)


# ----------------------------------------------------------------------------------------------
# during and right after training


@dataclass
class Keeper:
    """Saves the adapter at every `every`-th step during training (a TrainerCallback made by `callback`)."""

    every: int
    out_dir: Path
    marks: list[Mark] = field(default_factory=list)

    def callback(self, trainer, tok) -> Any:
        from transformers import TrainerCallback

        keeper = self

        class KeepCheckpoints(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                self.started = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                step = state.global_step
                if step % keeper.every or step >= state.max_steps:  # the last step is the final adapter
                    return
                now = time.perf_counter()
                control.should_log = True  # the train loss at this step (logging changes no weight)
                if state.is_world_process_zero:
                    folder = checkpoint_dir(keeper.out_dir, step)
                    trainer.model.save_pretrained(folder)
                    tok.save_pretrained(folder)  # chat_template.jinja: what evaluation's template parity reads
                keeper.marks.append(Mark(step, now - self.started, now))

        return KeepCheckpoints()

    def evaluate(self, trainer) -> None:
        """The held-out loss of each checkpoint whose step had none, on its saved weights, logged at its
        step; then the final adapter's weights (saved in `out_dir` before this) are put back."""
        if trainer.eval_dataset is None:
            return
        evaluated = {h.get("step") for h in trainer.state.log_history if "eval_loss" in h}
        todo = [m.step for m in self.marks if m.step not in evaluated]
        if not todo:
            return
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        trainer.accelerator.wait_for_everyone()  # the main process wrote the files
        state, at = trainer.state, trainer.state.global_step
        try:
            for step in todo:
                set_peft_model_state_dict(trainer.model, load_file(checkpoint_dir(self.out_dir, step) / ADAPTER_FILES[0]))
                state.global_step = step  # Trainer.log stamps the entry (and the log line) with it
                trainer.evaluate()
        finally:
            state.global_step = at
            set_peft_model_state_dict(trainer.model, load_file(self.out_dir / ADAPTER_FILES[0]))

    def record(self) -> dict[str, Any]:
        """For train_adapter's run record: `checkpoints` (kept in provenance) and `checkpoint_marks`
        (popped by ensure_adapter to time each checkpoint)."""
        return {"checkpoints": {"every": self.every, "steps": [m.step for m in self.marks]},
                "checkpoint_marks": list(self.marks)}


# ----------------------------------------------------------------------------------------------
# provenance


def checkpoint_provenance(run: dict[str, Any], mark: Mark, wall_s: float) -> dict[str, Any]:
    """The run's provenance as of `mark.step`: its log up to there, its losses there, its own times
    and fingerprint. Tokens, tokens/s, CPU time and peak memory stay the whole run's."""
    step = mark.step
    log = [e for e in run.get("log") or [] if e["step"] <= step]
    at: dict[str, Any] = next((e for e in log if e["step"] == step), {})
    parts, fp = checkpoint_fingerprint(run["fingerprint_parts"], step)
    rest = {k: v for k, v in run.items() if k != "checkpoints"}
    return rest | {
        "fingerprint": fp, "fingerprint_parts": parts, "steps": step,
        "epochs": round(at.get("epoch", run.get("epochs", 0)), 3),
        "train_time_s": round(mark.train_s, 2), "wall_time_s": round(wall_s, 2),
        "final_train_loss": at.get("loss"), "final_eval_loss": at.get("eval_loss"),
        "early_stopping": None,  # the run's record is about its final adapter (training_health reads it)
        "log": log,
        "checkpoint": {"step": step, "every": run["checkpoints"]["every"], "of_steps": run["steps"],
                       "train_loss": at.get("loss"), "eval_loss": at.get("eval_loss")},
    }


def write_checkpoints(tmp: Path, out: Path, run: dict[str, Any], marks: list[Mark], t0: float) -> tuple[Checkpoint, ...]:
    """Each checkpoint's `evalkit_train.json`, written in the temp folder; the Checkpoints name
    where they will be once it is moved to `out`."""
    kept = []
    for mark in marks:
        provenance = checkpoint_provenance(run, mark, mark.clock - t0)
        write_provenance(checkpoint_dir(tmp, mark.step), provenance)
        kept.append(Checkpoint(mark.step, checkpoint_dir(out, mark.step), provenance))
    return tuple(kept)


def kept_checkpoints(out: Path, run: dict[str, Any], every: int | None) -> tuple[tuple[Checkpoint, ...], str | None]:
    """(the checkpoints kept beside the adapter at `out`, why they do not serve a run asking for
    checkpoints every `every` steps: None when they do). Asked for none, whatever is kept whole is given."""
    record = run.get("checkpoints")
    if not isinstance(record, dict):
        return (), None if every is None else f"checkpoints every {every} not kept (trained without checkpoints)"
    if every is not None and record.get("every") != every:
        return (), f"checkpoints every {every} not kept (kept every {record.get('every')})"
    found = []
    for step in record.get("steps") or []:
        folder = checkpoint_dir(out, step)
        provenance = read_provenance(folder) if all((folder / f).is_file() for f in ADAPTER_FILES) else None
        if provenance is None or provenance.get("fingerprint") != checkpoint_fingerprint(run["fingerprint_parts"], step)[1]:
            return (), None if every is None else f"checkpoints every {every} not kept (step-{step} missing or incomplete)"
        found.append(Checkpoint(step, folder, provenance))
    return tuple(found), None


"""Running a sweep from one command: `parallel:` local worker processes (each `evalkit sweep SUITE
--worker`, as another machine would run it, pinned to one GPU or a share of the CPU threads), or
the trials in this process when `parallel: 1`; then every trial of the sweep, as trained.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from evalkit.config.suite import Suite
from evalkit.config.sweep import checkpoint_name
from evalkit.config.variant import Variant
from evalkit.errors import ModelError
from evalkit.record.types import TrialRecord
from trainers.sft import TrainResult, ensure_adapter
from trainers.sweep import Log, Objective, SweepPlan, enqueue_grid, import_optuna, open_study, spec_of, work
from trainers.trials import Trial


@dataclass(frozen=True)
class TrialResult:
    trial: Trial
    result: TrainResult
    trained_now: bool  # trained by this sweep (here or by a worker), not reused from before


def run_sweep(suite: Suite, variant: Variant, *, log: Log, objective: Objective | None = None) -> list[TrialResult]:
    """Train the variant's sweep (what is not trained yet) and return its trials in sweep order."""
    plan = SweepPlan.of(suite, variant)
    sweep = plan.sweep
    log(f"sweep {variant.name}: {sweep.size} trials ({sweep.sampler_name}), {sweep.parallel} at a time; "
        f"study {plan.study_name} in {plan.storage_shown}")
    started = datetime.now(UTC).isoformat(timespec="seconds")
    if sweep.parallel == 1:
        work(plan, log=log, objective=objective)
    elif todo := _to_train(plan):
        _run_workers(plan, min(sweep.parallel, todo), log)
    return [TrialResult(t, r, r.provenance.get("started_at", "") >= started) for t, r in _collect(plan, log)]


def as_variants(v: Variant, name: str, result: TrainResult, params: Mapping[str, Any] | None = None) -> list[Variant]:
    """The variants one training gives (a sweep's trial with its `params`, or a `train:` variant):
    its kept checkpoints by step (`lora@step30`), then the final adapter."""
    def trial(step: int | None) -> TrialRecord | None:
        return TrialRecord(of=v.name, params=dict(params or {}), step=step) if params or result.checkpoints else None

    if params and v.quantize is None and result.provenance.get("method") == "qlora":
        v = v.model_copy(update={"quantize": "nf4"})  # a sweep over `method`: a QLoRA trial is scored on its 4-bit base

    return [*(v.trained(checkpoint_name(name, c.step), c.adapter_dir, trial(c.step)) for c in result.checkpoints),
            v.trained(name, Path(result.adapter_dir), trial(None))]


def _collect(plan: SweepPlan, log: Log) -> list[tuple[Trial, TrainResult]]:
    """Every trial of the sweep with its adapter: a grid's points in order, a search's finished
    trials by number. A trial the workers left untrained (its adapter deleted since) trains here."""
    if plan.sweep.is_grid:
        trials = plan.grid()
    else:
        optuna = import_optuna()
        study = open_study(plan).study
        finished = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        found = [spec_of(t.params, t.number, plan) for t in sorted(finished, key=lambda t: t.number)]
        trials = [t for t in found if t is not None][:plan.sweep.size]
    every = plan.variant.checkpoint_every
    return [(t, ensure_adapter(t.recipe(plan.recipe_file, plan.suite.dir), log=log, checkpoint_every=every))
            for t in trials]


def _to_train(plan: SweepPlan) -> int:
    """Trials the study still has to give out: no worker is started for nothing."""
    State = import_optuna().trial.TrialState
    study = open_study(plan).study
    if plan.sweep.is_grid:
        enqueue_grid(study, plan)
    waiting = len(study.get_trials(deepcopy=False, states=(State.WAITING, State.RUNNING)))
    live = len(study.get_trials(deepcopy=False, states=(State.COMPLETE, State.RUNNING, State.WAITING)))
    return waiting if plan.sweep.is_grid else waiting + max(0, plan.sweep.size - live)


def _run_workers(plan: SweepPlan, n: int, log: Log) -> None:
    """`n` workers on this machine, each its own process; their lines are logged as they come."""
    with _workers(plan, n) as procs:
        readers = [threading.Thread(target=_relay, args=(p, i + 1, log), daemon=True) for i, p in enumerate(procs)]
        for r in readers:
            r.start()
        codes = [p.wait() for p in procs]
        for r in readers:
            r.join()
    failed = [(i + 1, c) for i, c in enumerate(codes) if c != 0]
    if failed:
        raise ModelError(f"sweep {plan.variant.name}: worker(s) {', '.join(f'{i} (exit {c})' for i, c in failed)} "
                         "failed; their messages are above. Trained trials are kept: rerun to go on")


@contextlib.contextmanager
def _workers(plan: SweepPlan, n: int) -> Iterator[list[subprocess.Popen[str]]]:
    """Start the workers; on any way out (Ctrl-C included) stop those still running."""
    devices = _gpus()
    threads = max(1, (os.cpu_count() or 1) // n)
    procs: list[subprocess.Popen[str]] = []
    try:
        for i in range(n):
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            if devices:
                env["CUDA_VISIBLE_DEVICES"] = devices[i % len(devices)]
            else:
                env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
            command = [sys.executable, "-m", "evalkit.cli", "sweep", str(plan.suite.path), "--worker",
                       "--variant", plan.variant.name]
            procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True, start_new_session=True))
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _relay(proc: subprocess.Popen[str], number: int, log: Log) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        log(f"[worker {number}] {line.rstrip().removeprefix('evalkit: ')}")


def _gpus() -> list[str]:
    """The GPUs workers may use: CUDA_VISIBLE_DEVICES' list when set, else every device torch sees."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [d for d in given.split(",") if d.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


def trial_table(trials: list[TrialResult]) -> list[str]:
    """The sweep's trials, one line each: what each cost to train and where its loss ended."""
    def cell(value, fmt: str) -> str:
        return format(value, fmt) if isinstance(value, int | float) else "-"

    rows = [("trial", "trainable", "train s", "peak MB", "train loss", "eval loss", "")]
    for t in trials:
        p = t.result.provenance
        rows.append((t.trial.name, cell(p.get("trainable_params"), ","), cell(p.get("train_time_s"), ".0f"),
                     cell(p.get("peak_memory_mb"), ".0f"), cell(p.get("final_train_loss"), ".3f"),
                     cell(p.get("final_eval_loss"), ".3f"),
                     "trained" if t.trained_now else "reused"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]

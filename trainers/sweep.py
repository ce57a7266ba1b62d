"""A sweep's trials trained by workers that share an optuna study: on one machine (`parallel:`
worker processes) or many (`evalkit sweep SUITE --worker` on each, one storage URL).

The study is the queue and the ledger: a grid's points are enqueued once (a point already queued,
running or finished is not queued again); a search asks optuna's sampler for each new trial. A
worker takes the oldest waiting trial (optuna's atomic WAITING -> RUNNING), trains it through
`ensure_adapter` (so a finished trial's adapter is reused, never retrained), beats a heartbeat
while it trains, and tells the study the trial's objective. A worker that dies stops beating:
another one fails its trial (optuna's fail_stale_trials) and optuna's retry callback queues it
again. Two copies of one point (two machines that queued the grid at the same instant) never
both train: the later-numbered copy yields to a running or finished one.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evalkit.config.suite import Suite
from evalkit.config.sweep import Range, Sweep, label
from evalkit.config.variant import Variant
from evalkit.errors import ConfigError, missing_extra
from evalkit.models.base import file_sha256
from evalkit.types import stable_hash
from trainers.recipe import load_recipe
from trainers.sft import TrainResult, ensure_adapter
from trainers.trials import Trial, grid_trials, make_trial, trials_dir

Log = Callable[[str], Any]
# a trial's objective, evaluated (the runner's `sweep_objective`): the trial as a variant, and the metric
Objective = Callable[[Variant, str], float]
STUDY_FILE = "sweep.sqlite3"
MAX_RETRIES = 2  # a trial whose worker died is queued again at most this many times


@dataclass(frozen=True)
class SweepPlan:
    """One swept variant of a suite, as the workers and the run see it."""

    suite: Suite
    variant: Variant
    recipe_file: Path
    trials_dir: Path

    @classmethod
    def of(cls, suite: Suite, variant: Variant) -> SweepPlan:
        assert variant.sweep is not None and variant.train is not None
        return cls(suite, variant, variant.train, trials_dir(load_recipe(variant.train)))

    @property
    def sweep(self) -> Sweep:
        assert self.variant.sweep is not None
        return self.variant.sweep

    @property
    def storage_url(self) -> str:
        """The sweep's `storage:` (a relative SQLite path is the suite folder's), else a SQLite file
        beside the trials."""
        url = self.sweep.storage or f"sqlite:///{self.trials_dir / STUDY_FILE}"
        path = url.removeprefix("sqlite:///")
        if url.startswith("sqlite:///") and not Path(path).is_absolute():
            return f"sqlite:///{self.suite.dir / path}"
        return url

    @property
    def storage_shown(self) -> str:
        """The storage URL as logs and errors show it: without a database password."""
        from sqlalchemy.engine import make_url

        try:
            return make_url(self.storage_url).render_as_string(hide_password=True)
        except Exception:  # not a URL sqlalchemy can read: said so when it is opened
            return self.storage_url.split("@")[-1]

    @functools.cached_property
    def study_name(self) -> str:
        """`suite.variant.HASH`: another recipe (or training file) is another study, whose points all
        train again; a grid's study is its queue whatever its values (adding one queues one more),
        while a search over other ranges is another study."""
        recipe = load_recipe(self.recipe_file)
        trained = {k: v for k, v in recipe.to_dict().items() if k not in ("name", "output", "source", "base_dir")}
        key: list[Any] = [trained, file_sha256(recipe.data.train)]
        if not self.sweep.is_grid:
            key += [{k: v.model_dump() if isinstance(v, Range) else [label(x) for x in v]
                     for k, v in self.sweep.params.items()}, self.sweep.sampler_name, self.seed]
        return f"{self.suite.name}.{self.variant.name}.{stable_hash(key)[:8]}"

    @property
    def seed(self) -> int:
        return self.sweep.seed if self.sweep.seed is not None else self.suite.seed

    @property
    def direction(self) -> str:
        objective = self.sweep.objective
        return objective.direction if objective else "minimize"  # default: the held-out loss

    def grid(self) -> list[Trial]:
        return grid_trials(self.variant.name, self.sweep, self.trials_dir)


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise missing_extra("optuna", "sweep") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # heartbeats and their retry callback are marked experimental since optuna 2.8: a notice for its developers
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # workers beat heartbeats themselves (`_heartbeat`), outside Study.optimize, which optuna does not expect
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    return optuna


@dataclass(frozen=True)
class Study:
    """The optuna study and the storage it lives in (whose heartbeats the workers beat)."""

    study: Any  # optuna.Study
    storage: Any  # optuna.storages.RDBStorage

    def trial_id(self, number: int) -> int:
        return int(self.storage.get_trial_id_from_study_id_trial_number(
            self.storage.get_study_id_from_name(self.study.study_name), number))


def open_study(plan: SweepPlan) -> Study:
    """The plan's optuna study (created on first use), with heartbeats and retries of dead workers' trials."""
    optuna = import_optuna()
    url = plan.storage_url
    beat = plan.sweep.heartbeat
    sampler = (optuna.samplers.TPESampler(seed=plan.seed) if plan.sweep.sampler_name == "tpe"
               else optuna.samplers.RandomSampler(seed=plan.seed))
    with _creating(url):
        try:
            storage = optuna.storages.RDBStorage(
                url, heartbeat_interval=beat, grace_period=2 * beat,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES),
                engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None)
            return Study(optuna.create_study(study_name=plan.study_name, storage=storage, sampler=sampler,
                                             direction=plan.direction, load_if_exists=True), storage)
        except Exception as e:  # a malformed URL, a driver not installed, a database that refuses us
            raise ConfigError(f"`storage:` {plan.storage_shown}: {str(e).splitlines()[0]}") from None


@contextlib.contextmanager
def _creating(url: str) -> Iterator[None]:
    """Workers starting together would create a SQLite file's tables at once (and collide): one at
    a time, under a lock file beside it. A server database serializes this itself."""
    if not url.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = Path(url.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _key(params: Mapping[str, Any]) -> str:
    return json.dumps({k: params[k] for k in sorted(params)}, sort_keys=True)


def enqueue_grid(study, plan: SweepPlan) -> int:
    """Queue every grid point no trial holds yet (one that failed is queued again); how many. A
    point is kept as the trial's `point` user attribute: not as optuna parameters, whose categorical
    choices may not change within a study, and a grid grows by adding values."""
    optuna = import_optuna()
    live = (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.COMPLETE)
    held = {_key(_point(t)) for t in study.get_trials(deepcopy=False, states=live)}
    added = 0
    for trial in plan.grid():
        point = _labels(trial.params)
        if _key(point) not in held:
            study.enqueue_trial({}, user_attrs={"point": point, "name": trial.name})
            added += 1
    return added


def _point(trial) -> dict[str, Any]:
    """A trial's values as optuna holds them: a grid point's, or a search trial's parameters."""
    return dict(trial.user_attrs.get("point") or trial.params)


def _labels(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _label(v) for k, v in params.items()}


def _label(value: Any) -> Any:
    """A value as optuna holds it: a number as it is, anything else (a module list) by its label."""
    return value if isinstance(value, int | float) and not isinstance(value, bool) else label(value)


# ---------------------------------------------------------------- a worker


def work(plan: SweepPlan, *, log: Log, objective: Objective | None = None, worker: str | None = None,
         poll: float = 1.0) -> int:
    """Train trials of the study until none is left to take and none runs elsewhere (a trial
    running elsewhere may still die and come back to the queue); how many this worker finished."""
    optuna = import_optuna()
    State = optuna.trial.TrialState
    worker = worker or f"{socket.gethostname()}:{os.getpid()}"
    opened = open_study(plan)
    study = opened.study
    if plan.sweep.is_grid:
        enqueue_grid(study, plan)
    done = 0
    while True:
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial fails, and is queued again
        trial = _take(study, plan)
        if trial is None:
            if study.get_trials(deepcopy=False, states=(State.RUNNING, State.WAITING)):
                time.sleep(poll)
                continue
            break
        # beating from the moment it is taken: a worker that dies now is seen
        with _heartbeat(opened, trial.number, plan.sweep.heartbeat):
            spec = _spec(trial, plan)
            if spec is None:
                continue
            log(f"trial {spec.name}: started by {worker}{_where()}")
            t0 = time.perf_counter()
            try:
                result = ensure_adapter(spec.recipe(plan.recipe_file, plan.suite.dir), log=log,
                                        checkpoint_every=plan.variant.checkpoint_every)
                value = _objective(plan, spec, result, objective)
            except BaseException:
                study.tell(trial, state=State.FAIL)  # a grid queues it again at the next start
                raise
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("adapter", str(result.adapter_dir))
        study.tell(trial, _finite(value, plan.direction))
        done += 1
        log(f"trial {spec.name}: {'reused' if result.reused else 'trained'} in {time.perf_counter() - t0:.0f}s by {worker}"
            f"{_losses(result.provenance)} · {_progress(study, plan)}")
    return done


def _take(study, plan: SweepPlan):
    """The oldest waiting trial (a grid point, or a dead worker's trial queued again: optuna's ask
    takes it atomically, one worker wins), else for a search with trials to go a new one from the
    sampler; None when there is nothing to take."""
    State = import_optuna().trial.TrialState
    waiting = study.get_trials(deepcopy=False, states=(State.WAITING,))
    live = study.get_trials(deepcopy=False, states=(State.COMPLETE, State.RUNNING, State.WAITING))
    if not waiting and (plan.sweep.is_grid or len(live) >= plan.sweep.size):
        return None
    trial = study.ask()
    if plan.sweep.is_grid and not trial.user_attrs.get("point"):
        study.tell(trial, state=State.PRUNED)  # another worker took the last point first: ask made a new trial
        return None
    earlier = [t for t in study.get_trials(deepcopy=False, states=(State.COMPLETE, State.RUNNING, State.WAITING))
               if t.number < trial.number]
    if not plan.sweep.is_grid and len(earlier) >= plan.sweep.size:
        study.tell(trial, state=State.PRUNED)  # another worker asked for the last one at the same time
        return None
    return trial


def _spec(trial, plan: SweepPlan) -> Trial | None:
    """The trial's recipe values: a grid point's, or suggested by optuna's sampler (a dead worker's
    trial queued again keeps its values); None when it must not train: a copy of a point that runs
    or finished elsewhere, or a point no longer in the grid (both pruned, which no count includes)."""
    State = import_optuna().trial.TrialState
    params = _point(trial) if plan.sweep.is_grid else _suggest(trial, plan.sweep)
    if set(params) != set(plan.sweep.params) or values(params, plan) is None:
        trial.study.tell(trial, state=State.PRUNED)
        return None
    key = _key(params)
    for other in trial.study.get_trials(deepcopy=False, states=(State.RUNNING, State.COMPLETE)):
        if other.number == trial.number or _key(_point(other)) != key:
            continue
        if other.state == State.COMPLETE or other.number < trial.number:
            trial.study.tell(trial, state=State.PRUNED)
            return None
    return spec_of(params, trial.number, plan)


def _suggest(trial, sweep: Sweep) -> dict[str, Any]:
    """A search trial's values from optuna's sampler (labels for lists)."""
    params: dict[str, Any] = {}
    for k, dim in sweep.params.items():
        if isinstance(dim, Range):
            suggest = trial.suggest_int if dim.integer else trial.suggest_float
            params[k] = suggest(k, dim.low, dim.high, log=dim.log, **({"step": dim.step} if dim.step else {}))
        else:
            params[k] = trial.suggest_categorical(k, [_label(v) for v in dim])
    return params


def values(params: Mapping[str, Any], plan: SweepPlan) -> dict[str, Any] | None:
    """Optuna's parameters (labels for lists) as recipe values; None when one is not in the sweep."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        dim = plan.sweep.params.get(k)
        if isinstance(dim, Range):
            out[k] = v
            continue
        match = [x for x in dim or () if _label(x) == v]
        if not match:
            return None
        out[k] = list(match[0]) if isinstance(match[0], tuple) else match[0]
    return out


def spec_of(params: Mapping[str, Any], number: int, plan: SweepPlan) -> Trial | None:
    """The trial optuna's `params` (as `_spec` suggested them) describe; a search's carries its number."""
    recipe_values = values(params, plan)
    if recipe_values is None:
        return None
    ordered = {k: recipe_values[k] for k in plan.sweep.params if k in recipe_values}
    return make_trial(plan.variant.name, ordered, plan.trials_dir, None if plan.sweep.is_grid else number)


def _objective(plan: SweepPlan, spec: Trial, result: TrainResult, evaluate: Objective | None) -> float:
    """What the sampler learns from: the sweep's objective metric, evaluated; else the held-out loss."""
    if plan.sweep.objective is None:
        return held_out_loss(result)
    if evaluate is None:
        raise ConfigError("this sweep's `objective:` is evaluated: run it with `evalkit run` or `evalkit sweep`")
    variant = plan.variant.model_copy(update={"name": spec.name, "adapter": result.adapter_dir, "sweep": None,
                                              "checkpoints": None})
    return evaluate(variant, plan.sweep.objective.metric)


def held_out_loss(result: TrainResult) -> float:
    """The default objective: the final held-out loss, else the final train loss."""
    p = result.provenance
    value = p.get("final_eval_loss") if p.get("final_eval_loss") is not None else p.get("final_train_loss")
    return float(value) if value is not None else math.nan


def _finite(value: float, direction: str) -> float:
    """A diverged trial (NaN loss) finished: the worst value, not a failure optuna would retry."""
    if math.isfinite(value):
        return value
    return math.inf if direction == "minimize" else -math.inf


@contextlib.contextmanager
def _heartbeat(opened: Study, number: int, interval: int) -> Iterator[None]:
    """Beat the trial's heartbeat while it trains (optuna only beats inside study.optimize)."""
    storage, trial_id, stop = opened.storage, opened.trial_id(number), threading.Event()
    storage.record_heartbeat(trial_id)  # at once: a trial without a heartbeat is never seen stale

    def beat() -> None:
        while not stop.wait(interval):
            with contextlib.suppress(Exception):  # a storage hiccup: the next beat may get through
                storage.record_heartbeat(trial_id)

    thread = threading.Thread(target=beat, name="evalkit-sweep-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _where() -> str:
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    if devices:
        return f" (GPU {devices})"
    threads = os.environ.get("OMP_NUM_THREADS")
    return f" (CPU, {threads} thread{'s' if threads != '1' else ''})" if threads else " (CPU)"


def _losses(provenance: Mapping[str, Any]) -> str:
    shown = [f"{name} {provenance[key]:.3f}" for key, name in (("final_train_loss", "train loss"),
                                                                ("final_eval_loss", "eval loss"))
             if isinstance(provenance.get(key), int | float)]
    return f", {', '.join(shown)}" if shown else ""


def _progress(study, plan: SweepPlan, width: int = 20) -> str:
    """`sweep lora [########------------] 3/8 done, 2 running`: the whole sweep, from the study."""
    optuna = import_optuna()
    State = optuna.trial.TrialState
    finished = len(study.get_trials(deepcopy=False, states=(State.COMPLETE,)))
    running = len(study.get_trials(deepcopy=False, states=(State.RUNNING,)))
    total = max(plan.sweep.size, finished)
    filled = round(width * min(finished, total) / total)
    return (f"sweep {plan.variant.name} [{'#' * filled}{'-' * (width - filled)}] {min(finished, total)}/{total} done"
            + (f", {running} running" if running else ""))

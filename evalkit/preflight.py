"""What can be checked without a model, checked before anything runs: `evalkit run` and
`evalkit validate` alike. The suite's shapes, scorers and JSON Schemas are checked as it loads;
here, every file it names (recipes and their training data, task data, rubrics, anchors, drift
passages), the canaries' lm-eval tasks and MMLU slices, and the baseline store. Each check says
what it looked at (`evalkit validate` prints it); a mistake is a ConfigError at its FILE:LINE.
"""
from __future__ import annotations

from pathlib import Path

from evalkit import scorers
from evalkit.config.canary import DriftTask, LmEvalTask, MmluTask
from evalkit.config.suite import Suite
from evalkit.config.sweep import Range
from evalkit.config.task import CasesTask, JudgeTask, Task
from evalkit.config.variant import Variant
from evalkit.errors import ConfigError

# `prompt` text under `template: auto`: fine for a base model, poor for an instruct one (which the run
# tells from the tokenizer, and warns about)
RAW_NOTE = "; `prompt` text, sent raw (a chat model wants `template: chat`)"


def check_inputs(suite: Suite, *, baseline: bool = True) -> list[str]:
    """One line per thing checked. `baseline`: also open the baseline store, when it exists yet (the
    run opens it itself, and refuses a missing one)."""
    checked = []
    recipes: set[Path] = set()
    for v in suite.variants:
        if v.train is not None and v.train not in recipes:  # variants may share a recipe
            recipes.add(v.train)
            with suite.locating(("variants", suite.variants.index(v), "train")):
                checked.append(_recipe(v.train))
        if v.sweep is not None:
            checked.append(_sweep(suite, v))
    for task in suite.tasks:
        with suite.locating(("tasks", task._index)):
            checked += _task(suite, task)
    if baseline and suite.baseline is not None:
        checked.append(_baseline(suite))
    return checked


def shown_path(path: Path) -> str:
    """A path as the user would type it from here."""
    path = path.resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def _recipe(path: Path) -> str:
    from evalkit.tasks.generation import load_cases
    from trainers.data import load_training_rows
    from trainers.recipe import load_recipe

    recipe = load_recipe(path)
    rows = load_training_rows(recipe.data.train, recipe.data.template)
    against = [f"{len(load_cases(p))} cases in {shown_path(p)}" for p in recipe.data.check_against]
    return (f"recipe {shown_path(path)} ({recipe.method}): {len(rows)} training rows in {shown_path(recipe.data.train)}"
            + (f"; leakage checked against {', '.join(against)}" if against else "")
            + (RAW_NOTE if recipe.data.template == "auto" and isinstance(rows[0]["prompt"], str) else ""))


def _sweep(suite: Suite, v: Variant) -> str:
    """Every swept key is a recipe field, and every trial's recipe validates (a search: each range
    at its ends), before any training; a mistake is reported at its `sweep:` key, with the trial."""
    from trainers.recipe import load_recipe
    from trainers.trials import check_keys, check_storage, grid_trials, make_trial, trials_dir

    assert v.sweep is not None and v.train is not None
    sweep, at = v.sweep, ("variants", v._index, "sweep")
    with suite.locating(("variants", v._index, "train")):
        folder = trials_dir(load_recipe(v.train))
    if sweep.is_grid:
        trials = grid_trials(v.name, sweep, folder)
    else:
        first = {k: d[0] if isinstance(d, tuple) else d.low for k, d in sweep.params.items()}
        ends = [first] + [{**first, k: d.high} for k, d in sweep.params.items() if isinstance(d, Range)]
        trials = [make_trial(v.name, {k: list(x) if isinstance(x, tuple) else x for k, x in p.items()}, folder)
                  for p in ends]
    try:
        check_keys(sweep)
        if sweep.storage is not None:
            check_storage(sweep.storage)
        for trial in trials:
            trial.recipe(v.train, suite.dir)
    except ConfigError as e:
        raise suite.error((*at, e.path) if e.path else at, e.message, e.hint) from None
    return (f"sweep {v.name}: {sweep.size} trials ({sweep.sampler_name}) of {shown_path(v.train)} over "
            f"{', '.join(sweep.params)}, trained into {shown_path(folder)}")


def _task(suite: Suite, task: Task) -> list[str]:
    out = []
    if isinstance(task, CasesTask):
        from evalkit.tasks.generation import task_cases

        cases = task_cases(task, limit=None)  # every row: a broken one past `limit` is still a mistake
        out.append(f"task {task.name}: {len(cases)} cases in {shown_path(task.data)}"
                   + (f" (target checked for {task.target_scorer})" if task.target_scorer else "")
                   + (RAW_NOTE if task.template == "auto" and any(c.messages is None for c in cases) else ""))
        for spec in task.scorers:  # their files were read and checked as the suite loaded
            files = scorers.get(spec.name).path_params
            out += [f"task {task.name}: {spec.name} file {shown_path(suite.dir / v)} (read and checked)"
                    for k, v in spec.params.items() if k in files and isinstance(v, str)]
    if isinstance(task, JudgeTask):
        from evalkit.tasks.judge import prepare

        jt = prepare(task)
        if task.rubric is not None:
            out.append(f"task {task.name}: rubric {shown_path(task.rubric)} ({len(jt.rubric.split())} words)")
        if task.anchors is not None:
            out.append(f"task {task.name}: {len(jt.anchors)} anchors in {shown_path(task.anchors)}")
        out.append(f"task {task.name}: judge endpoint {task.judge.base_url} not contacted (a run asks it first)")
    elif isinstance(task, DriftTask):
        from evalkit.tasks.drift import passages

        got, source = passages(task, suite.seed)
        out.append(f"task {task.name}: {len(got)} passages from {shown_path(task.data) if task.data else source.split(' (')[0]}")
    elif isinstance(task, MmluTask) and task.source != "hub":  # the hub needs a network: checked when it runs
        from evalkit.tasks.mmlu import plan

        sl, source = plan(task, suite.seed, suite.dir)
        out.append(f"task {task.name}: MMLU slice of {len(sl.ids)} questions from {source.split(' (')[0]}")
    elif isinstance(task, LmEvalTask):
        from evalkit.tasks.harness import check_tasks

        out.append(f"task {task.name}: lm-eval tasks {', '.join(check_tasks(task))} exist")
    return out


def _baseline(suite: Suite) -> str:
    from evalkit.baseline.pairing import Baseline

    assert suite.baseline is not None  # a suite with a baseline
    store = suite.baseline.store
    if not store.exists():
        return f"baseline store {shown_path(store)}: not there yet (the run reads it when it starts)"
    with suite.locating(("baseline",)):
        b = Baseline.open(suite, lambda _: None)
    assert b is not None  # a suite with a baseline
    return (f"baseline store {shown_path(store)}: bundle {b.bundle.promotion.bundle} verified against its "
            "manifest, task settings compared")

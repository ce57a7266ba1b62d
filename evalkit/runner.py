"""Orchestration: evaluate(suite) -> RunResult. The same path serves the CLI and the library API.

Flow: load suite -> preflight tasks (judge endpoints, canary parameters) -> open the promoted
baseline's bundle, if any (verified; settings compared) -> train stale adapters
-> check adapter files -> variants keyed by content -> checks (template parity, adapter active,
training health, length match) -> tasks -> checks on the outputs (leakage, merges, stopping) -> the
baseline's cases joined where they pair -> metrics with intervals -> paired comparisons vs the
reference (and the baseline) -> gates -> run folder. Variants run on a backend
(`evalkit.backends`); the in-process one loads the base ONCE, with adapters attached by name, at
the first result the cache cannot answer (never, on a rerun).
"""
from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from evalkit.assemble import assemble
from evalkit.backends.hf import HFBackend
from evalkit.backends.remote import OpenAIBackend
from evalkit.backends.vllm import VllmBackend, VllmServer, adapter_rank, unservable
from evalkit.baseline.pairing import Baseline
from evalkit.cache import Cache
from evalkit.config import load_suite
from evalkit.config.suite import Suite
from evalkit.config.task import CasesTask, Task
from evalkit.config.variant import BackendConfig, Variant
from evalkit.context import RunContext, RunVariant, served_fingerprint, template_hash, variant_fingerprint
from evalkit.errors import ExitCode, NothingToEvaluate
from evalkit.models.adapters import AdapterInfo, inspect_adapter
from evalkit.models.base import ResolvedBase, cache_root, load_tokenizer, resolve_base
from evalkit.preflight import check_inputs
from evalkit.record.types import (
    CheckRecord,
    Rendering,
    RunRecord,
)
from evalkit.runlog import RunResult, write_run
from evalkit.tasks.base import TaskResult

Log = Callable[[str], None]


def default_run_dir(suite: Suite) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("reports") / f"{suite.name}-{stamp}"


def evaluate(suite_path: str | Path, *, out: Path | None = None, use_cache: bool = True,
             cache_path: Path | None = None, progress: bool = True, log: Log = print,
             baseline: Path | None = None) -> RunResult:
    """`baseline`: a baseline store to compare with, in place of the suite's `baseline:` store."""
    started = time.time()
    suite = load_suite(suite_path, baseline=baseline)
    if not suite.tasks:
        raise NothingToEvaluate(f"{suite.path.name}: the suite has no tasks")
    check_inputs(suite, baseline=False)  # fail in seconds, before any training or model load
    for task in suite.tasks:
        preflight = getattr(_task_kind(task), "preflight", None)  # a judge's endpoint
        if preflight is not None:
            with suite.locating(("tasks", task._index)):
                preflight(task)
    with suite.locating(("baseline",)):  # a missing, changed or mismatched bundle fails before training
        promoted = Baseline.open(suite, log)
    cache_file = (cache_path or cache_root() / "results.sqlite") if use_cache else None
    suite = _train_adapters(suite, log, cache_file)
    infos = {}
    for v in suite.variants:
        if v.adapter:
            with suite.locating(suite.variant_path(v.name)):
                infos[v.name] = inspect_adapter(v.adapter, allow_pickle=v.allow_pickle)
    with suite.locating(("base",)):
        resolved = resolve_base(suite.base, suite.dir)
    if promoted is not None:
        promoted.check_base(resolved.sha256)
    cache = Cache(cache_file)
    ctx: RunContext | None = None
    try:
        ctx = _load_variants(suite, resolved, infos, cache, log, progress)
        renderings = _renderings(suite, ctx.tokenizer, log)
        checks = _pre_checks(ctx, infos, log)
        results: dict[str, TaskResult] = {}
        for task in suite.tasks:
            log(f"task {task.name} ({task.kind})")
            with suite.locating(("tasks", task._index)):
                results[task.name] = _task_kind(task).run(ctx, task)
        checks += _post_checks(ctx, results, log)
        joined = promoted.join(results, [lv.name for lv in ctx.variants]) if promoted else None
        record, samples = assemble(suite, ctx, infos, results, checks, started, renderings, joined)
    finally:
        for backend in ctx.backends if ctx is not None else ():
            backend.close()  # a server evalkit started stops here, however the run ended
        cache.close()
    run_dir = Path(out) if out else default_run_dir(suite)
    record = RunRecord.from_json(record.to_json())  # as results.json holds it (NaN as null): what a later read sees
    write_run(run_dir, record, samples)
    _write_reports(run_dir, record, log)
    code = ExitCode.OK if record.verdict == "pass" else ExitCode.GATE_FAILED
    if record.gates and all(g.skipped for g in record.gates):
        code = ExitCode.NOTHING_TO_EVALUATE  # every gate was skipped: nothing was checked, so no pass
    return RunResult(record=record, run_dir=run_dir, exit_code=int(code))


def _write_reports(run_dir: Path, record: RunRecord, log: Log) -> None:
    try:
        from evalkit.report import write_all
    except ImportError:
        return
    write_all(run_dir, record)


def _train_adapters(suite: Suite, log: Log, cache_file: Path | None) -> Suite:
    """`train: RECIPE` variants get their adapter from the bundled trainers (reused when fresh); a
    sweep becomes one variant per trial, and kept checkpoints one variant each (`lora@step30`)."""
    if not any(v.train for v in suite.variants):
        return suite
    import trainers
    from trainers.pool import as_variants, run_sweep, trial_table

    variants: list[Variant] = []
    for v in suite.variants:
        if v.sweep:
            with suite.locating(("variants", v._index, "sweep")):
                objective = sweep_objective(suite, log, cache_file) if v.sweep.objective else None
                trials = run_sweep(suite, v, log=log, objective=objective)
            for line in trial_table(trials):
                log(line)
            variants += [w for t in trials for w in as_variants(v, t.trial.name, t.result, t.trial.params)]
        elif v.train:
            with suite.locating(suite.variant_path(v.name)):
                result = trainers.ensure_adapter(v.train, log=log, checkpoint_every=v.checkpoint_every)
                variants += as_variants(v, v.name, result)
        else:
            variants.append(v)
    return suite.model_copy(update={"variants": tuple(variants)})


def _load_variants(suite: Suite, resolved: ResolvedBase, infos: dict[str, AdapterInfo], cache: Cache,
                   log: Log, progress: bool) -> RunContext:
    """The run's variants with their fingerprints (content addresses) and backends. In-process
    models load on the first request the cache cannot answer, so an unchanged rerun that the cache
    answers whole never loads one; the tokenizer is enough to render prompts and key the cache. A
    server is asked what it serves (GET /models and a probe) before any work."""
    with suite.locating(("base",)):
        tokenizer = load_tokenizer(resolved)
    hf = HFBackend(resolved, tokenizer, log=log,
                   locate=lambda name: suite.locating(("base",) if name is None else suite.variant_path(name)))
    ctx = RunContext(suite=suite, base=resolved, tokenizer=tokenizer, variants=[], cache=cache, log=log,
                     progress=progress, hf=hf)
    template = template_hash(tokenizer)
    remote = _remote_backends(suite, resolved, tokenizer, infos, hf, log)
    for v in suite.variants:
        info = infos.get(v.name)
        backend = remote.get(v.name)
        if backend is None:
            hf.add(v, info)
            ctx.variants.append(RunVariant(v, info, variant_fingerprint(resolved, v, info, template), hf))
            continue
        served = backend.identity(v.name)  # asked by its check, before any work
        log(f"variant {v.name}: served as '{backend.served[v.name]}' by {', '.join(backend.cfg.urls)}")
        ctx.variants.append(RunVariant(v, info, served_fingerprint(resolved, served, template), backend))
    return ctx


def _remote_backends(suite: Suite, resolved: ResolvedBase, tokenizer: Any, infos: dict[str, AdapterInfo],
                     hf: HFBackend, log: Log) -> dict[str, OpenAIBackend]:
    """One server backend per distinct backend config, serving its variants under their served
    names, checked (started, for `vllm`) before any work. A variant vLLM cannot serve is refused
    here, before anything starts, or left to `hf` under `fallback: hf`."""
    groups: dict[str, tuple[BackendConfig, list[Variant]]] = {}
    for v in suite.variants:
        cfg = suite.backend_of(v)
        if cfg.kind == "hf":
            continue
        if cfg.kind == "vllm" and (reason := unservable(v, infos.get(v.name))):
            if cfg.fallback != "hf":
                raise suite.error(suite.variant_path(v.name) if not v.is_base else ("variants", suite.variants.index(v)),
                                  f"variant '{v.name}' cannot run on vLLM: {reason}",
                                  hint="set `fallback: hf` on the backend to run such variants in process")
            log(f"variant {v.name}: runs in process (fallback: hf): {reason}")
            hf.fallbacks[v.name] = f"vllm: {reason}"
            continue
        groups.setdefault(cfg.model_dump_json(), (cfg, []))[1].append(v)
    out: dict[str, OpenAIBackend] = {}
    try:
        for cfg, variants in groups.values():
            served = {v.name: v.served_name or v.name for v in variants}
            with suite.locating(suite.backend_path(variants[0])):
                backend = _server_backend(cfg, served, variants, resolved, tokenizer, infos, log)
                out.update(dict.fromkeys(served, backend))  # closed below if a later check fails
                backend.check()
    except BaseException:
        for backend in {id(b): b for b in out.values()}.values():
            backend.close()
        raise
    return out


def _server_backend(cfg: BackendConfig, served: dict[str, str], variants: list[Variant], resolved: ResolvedBase,
                    tokenizer: Any, infos: dict[str, AdapterInfo], log: Log) -> OpenAIBackend:
    if cfg.kind == "openai":
        return OpenAIBackend(cfg, served, tokenizer, log=log)
    server = None
    if cfg.launches:
        adapters = {served[v.name]: infos[v.name].path for v in variants if v.name in infos}
        server = VllmServer(cfg, resolved.path, [served[v.name] for v in variants if v.name not in infos], adapters,
                            [adapter_rank(infos[v.name]) for v in variants if v.name in infos],
                            cache_root() / "logs", log=log)
    return VllmBackend(cfg, served, tokenizer, server=server, log=log)


def _renderings(suite: Suite, tokenizer: Any, log: Log) -> dict[str, Rendering]:
    """How each task's cases reach the model (the record says it). `prompt` text sent raw to a base
    that has a chat template is warned about: an instruct model answers raw text poorly, and
    nothing else would say so."""
    from evalkit.rows import raw_prompt_hint
    from evalkit.tasks.generation import rendering, task_cases

    out = {}
    for task in suite.tasks:
        if not isinstance(task, CasesTask):
            continue
        cases = task_cases(task)
        out[task.name] = rendering(cases)
        raw = sum(c.messages is None for c in cases)
        if raw and task.template == "auto" and getattr(tokenizer, "chat_template", None):
            warning = suite.error(
                ("tasks", task._index, "data"), f"{raw} of {len(cases)} cases are `prompt` text, sent raw, but the base has a "
                                    "chat template: an instruct model answers raw text poorly",
                hint=raw_prompt_hint("template"))
            log(f"WARNING: {warning}")
    return out


def _pre_checks(ctx: RunContext, infos: dict[str, AdapterInfo], log: Log) -> list[CheckRecord]:
    checks = []
    for lv in ctx.variants:
        if lv.info is None:
            continue
        checks.append(_template_parity(ctx, lv, log))
    from evalkit.checks import models, training

    return (checks + models.adapter_active(ctx, log) + models.backend_parity(ctx, log)
            + training.training_health(ctx, log) + training.length_match(ctx, log))


def _template_parity(ctx: RunContext, lv: RunVariant, log: Log) -> CheckRecord:
    """The chat template an adapter was trained with must be the one it is evaluated with."""
    assert lv.info is not None  # adapter variants only
    saved = lv.info.path / "chat_template.jinja"
    if not saved.is_file():
        return CheckRecord(name="template_parity", variant=lv.name, passed=True,
                           message="adapter ships no chat template; nothing to compare")
    trained = saved.read_text()
    current = getattr(ctx.tokenizer, "chat_template", None) or ""
    if trained.strip() == current.strip():
        return CheckRecord(name="template_parity", variant=lv.name, passed=True, message="same chat template")
    msg = (f"variant '{lv.name}': adapter was trained with another chat template than the base tokenizer's "
           f"({saved})")
    if not lv.variant.allow_template_mismatch:
        raise ctx.suite.error(ctx.suite.variant_path(lv.name),
                              msg + "; set `allow_template_mismatch: true` on the variant to evaluate anyway")
    log(f"WARNING: {msg} (acknowledged by allow_template_mismatch)")
    return CheckRecord(name="template_parity", variant=lv.name, passed=False, message=msg + " (acknowledged)")


def _post_checks(ctx: RunContext, results: dict[str, TaskResult], log: Log) -> list[CheckRecord]:
    from evalkit.checks import merge, stopping, training

    return (training.leakage(ctx, log) + merge.merge_equivalence(ctx, results, log)
            + stopping.stops_generating(ctx, results, log))


# each task kind's module: `run(ctx, task)`, and `preflight(task)` when it can check something
# before any training or model load (a judge endpoint, lm-eval task names)
TASK_KINDS = {"generate": "generation", "mmlu": "mmlu", "lm_eval": "harness", "drift": "drift", "judge": "judge"}


def sweep_objective(suite: Suite, log: Log, cache_file: Path | None) -> Callable[[Variant, str], float]:
    """A search's objective for each trial (`sweep: {objective: task.metric}`): the mean of the
    metric on that task (the suite checked it names one), scored as the run scores it, into the
    results cache the run then reads."""
    with suite.locating(("base",)):
        resolved = resolve_base(suite.base, suite.dir)

    def score(variant: Variant, metric: str) -> float:
        name, key = metric.split(".", 1)
        task = next(t for t in suite.tasks if t.name == name)
        assert variant.adapter is not None  # a trained trial
        one = suite.model_copy(update={"variants": (variant,), "tasks": (task,), "gates": (), "reference": variant.name})
        cache = Cache(cache_file)
        ctx = _load_variants(one, resolved, {variant.name: inspect_adapter(variant.adapter)}, cache, log, False)
        try:
            samples = _task_kind(task).run(ctx, task).samples
        finally:
            for backend in ctx.backends:
                backend.close()
            cache.close()
        values = [s.scores[key].value for s in samples if key in s.scores and s.scores[key].value is not None]
        if not values:
            raise suite.error(("variants", variant._index, "sweep", "objective"),
                              f"objective {metric}: task '{name}' gave no valid '{key}' score",
                              hint=f"its metrics: {', '.join(sorted({k for s in samples for k in s.scores}))}")
        log(f"trial {variant.name}: {metric} {sum(values) / len(values):.3f} (objective, {len(values)} cases)")
        return sum(values) / len(values)

    return score


def _task_kind(task: Task) -> ModuleType:
    """The module that runs this kind of task, imported on demand (lm-eval, openai stay unloaded
    until a suite needs them)."""
    return importlib.import_module(f"evalkit.tasks.{TASK_KINDS[task.kind]}")

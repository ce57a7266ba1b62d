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
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from evalkit import __version__
from evalkit.backends.hf import HFBackend
from evalkit.backends.remote import OpenAIBackend
from evalkit.backends.vllm import VllmBackend, VllmServer, adapter_rank, unservable
from evalkit.baseline import Baseline, Joined
from evalkit.cache import Cache
from evalkit.config import load_suite
from evalkit.config.suite import BackendConfig, CasesTask, Suite, Task, Variant
from evalkit.context import RunContext, RunVariant, served_fingerprint, template_hash, variant_fingerprint
from evalkit.errors import ExitCode, NothingToEvaluate
from evalkit.gates import Scores, evaluate_gates, gate_targets
from evalkit.models.adapters import AdapterInfo, inspect_adapter
from evalkit.models.base import ResolvedBase, cache_root, file_sha256, load_tokenizer, resolve_base
from evalkit.preflight import check_inputs
from evalkit.record import (
    SCHEMA_VERSION,
    BaseRecord,
    CacheStats,
    CheckRecord,
    ComparisonRecord,
    Cost,
    MetricRecord,
    Rendering,
    RunRecord,
    SuiteRecord,
    TaskRecord,
    VariantRecord,
)
from evalkit.runlog import RunResult, environment, write_run
from evalkit.stats import PairedComparison, holm, metric_interval, paired_compare
from evalkit.tasks.base import SampleResult, TaskResult

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
    suite = _train_adapters(suite, log)
    infos = {}
    for v in suite.variants:
        if v.adapter:
            with suite.locating(suite.variant_path(v.name)):
                infos[v.name] = inspect_adapter(v.adapter, allow_pickle=v.allow_pickle)
    with suite.locating(("base",)):
        resolved = resolve_base(suite.base, suite.dir)
    if promoted is not None:
        promoted.check_base(resolved.sha256)
    cache = Cache((cache_path or cache_root() / "results.sqlite") if use_cache else None)
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
        record, samples = _assemble(suite, ctx, infos, results, checks, started, renderings, joined)
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


def _train_adapters(suite: Suite, log: Log) -> Suite:
    """`train: RECIPE` variants get their adapter from the bundled trainers (reused when fresh)."""
    if not any(v.train for v in suite.variants):
        return suite
    import trainers

    variants = []
    for v in suite.variants:
        if v.train:
            with suite.locating(suite.variant_path(v.name)):
                result = trainers.ensure_adapter(v.train, log=log)
            v = v.model_copy(update={"adapter": Path(result.adapter_dir)})
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
    from evalkit.checks import adapter_active, backend_parity, length_match, training_health

    return (checks + adapter_active(ctx, log) + backend_parity(ctx, log) + training_health(ctx, log)
            + length_match(ctx, log))


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
    from evalkit.checks import leakage, merge_equivalence, stops_generating

    return leakage(ctx, log) + merge_equivalence(ctx, results, log) + stops_generating(ctx, results, log)


# each task kind's module: `run(ctx, task)`, and `preflight(task)` when it can check something
# before any training or model load (a judge endpoint, lm-eval task names)
TASK_KINDS = {"generate": "generation", "mmlu": "mmlu", "lm_eval": "harness", "drift": "drift", "judge": "judge"}


def _task_kind(task: Task) -> ModuleType:
    """The module that runs this kind of task, imported on demand (lm-eval, openai stay unloaded
    until a suite needs them)."""
    return importlib.import_module(f"evalkit.tasks.{TASK_KINDS[task.kind]}")


def _assemble(suite: Suite, ctx: RunContext, infos: dict[str, AdapterInfo], results: dict[str, TaskResult],
              checks: list[CheckRecord], started: float, renderings: dict[str, Rendering], joined: Joined | None = None
              ) -> tuple[RunRecord, list[dict[str, Any]]]:
    values: dict[tuple[str, str, str], dict[str, float | None]] = defaultdict(dict)  # (task, metric, variant) -> case -> v
    samples: list[dict[str, Any]] = []
    for tname, tr in results.items():
        for s in tr.samples:
            for metric, score in s.scores.items():
                v = score.value
                values[(tname, metric, s.variant)][s.case_id] = None if v is None or v != v else v  # NaN is invalid
            samples.append(_sample_record(s))
    scores = {k: Scores(tuple(per_case.values()), results[k[0]].binary.get(k[1], False))
              for k, per_case in values.items()}
    metrics = []
    for (tname, metric, variant), sc in scores.items():
        iv = metric_interval(sc.valid, binary=sc.binary)
        metrics.append(MetricRecord(task=tname, metric=metric, variant=variant, value=iv.value, low=iv.low,
                                    high=iv.high, n=iv.n, n_invalid=sc.n_invalid, method=iv.method,
                                    confidence=iv.confidence))
    comparisons = _comparisons(suite, results, values)
    gates = evaluate_gates(suite, scores, comparisons, checks)
    if joined is not None and suite.baseline_mismatch == "intersect":
        gates = [joined.with_counts(g) for g in gates]
    assert suite.reference is not None  # set by validator
    record = RunRecord(
        schema_version=SCHEMA_VERSION, evalkit_version=__version__,
        run_id=f"{suite.name}-{datetime.fromtimestamp(started).strftime('%Y%m%d-%H%M%S')}",
        started_at=datetime.fromtimestamp(started, UTC).isoformat(),
        finished_at=datetime.now(UTC).isoformat(), duration_s=round(time.time() - started, 3),
        status="complete",
        suite=SuiteRecord(name=suite.name, path=str(suite.path), sha256=file_sha256(suite.path)),
        config=dict(suite.raw), environment=environment(ctx.device),
        base=BaseRecord(ref=suite.base.ref, kind=suite.base.kind, sha256=ctx.base.sha256),
        reference=suite.reference,
        variants=tuple(_variant_record(lv, ctx) for lv in ctx.variants) + ((joined.variant,) if joined else ()),
        tasks=tuple(TaskRecord(name=t, kind=suite_task(suite, t).kind, n_cases=len({s.case_id for s in tr.samples}),
                               binary=tr.binary, invalid=suite_task(suite, t).invalid, extras=tr.extras,
                               settings=suite_task(suite, t).settings(), rendering=renderings.get(t))
                    for t, tr in results.items()),
        metrics=tuple(metrics),
        comparisons=tuple(_comparison_records(suite, comparisons)),
        gates=tuple(gates), checks=tuple(checks), verdict="pass" if all(g.passed for g in gates) else "fail",
        cache=CacheStats(hits=ctx.cache.hits, misses=ctx.cache.misses,
                         path=str(ctx.cache.path) if ctx.cache.path else None),
        baseline=joined.record if joined else None,
    )
    return record, samples


def suite_task(suite: Suite, name: str) -> Task:
    return next(t for t in suite.tasks if t.name == name)


def _comparisons(suite: Suite, results: dict[str, TaskResult], values) -> dict[tuple[str, str, str, str], Any]:
    """Paired comparisons of every variant against the reference, and for every `vs:` a gate names,
    over the cases both sides have; a candidate's invalid score is a loss unless `invalid: drop`."""
    reference = suite.reference
    assert reference is not None  # set by validator
    pairs = {(v.name, reference) for v in suite.variants if v.name != reference}
    if suite.baseline is not None:  # every candidate against what is in production
        pairs |= {(v.name, suite.baseline.name) for v in suite.variants if not v.is_base}
    pairs |= {(var, g.vs) for g in suite.gates if g.vs for var in gate_targets(g, suite) if var != g.vs}
    out = {}
    for (tname, metric, variant), cand in values.items():
        for cv, ref_name in pairs:
            if cv != variant or (tname, metric, ref_name) not in values:
                continue
            ref = values[(tname, metric, ref_name)]
            ids = [i for i in cand if i in ref]
            out[(tname, metric, variant, ref_name)] = paired_compare(
                [ref[i] for i in ids], [cand[i] for i in ids], binary=results[tname].binary.get(metric, False),
                invalid_as_loss=suite_task(suite, tname).invalid == "loss")
    return out


def _comparison_records(suite: Suite, comparisons: dict[tuple[str, str, str, str], PairedComparison]
                        ) -> list[ComparisonRecord]:
    """Each comparison with its Holm-adjusted p (across every comparison of the run: the report's
    significance markers) and the drop it rules out, at the level of the gate on it (else 95%)."""
    adjusted = holm([c.p_value for c in comparisons.values()])
    levels = {(g.metric, v, g.vs): g.confidence for g in suite.gates if g.max_drop is not None and g.confidence
              for v in gate_targets(g, suite)}
    out = []
    for ((task, metric, variant, vs), c), p_holm in zip(comparisons.items(), adjusted):
        level = levels.get((f"{task}.{metric}", variant, vs), 0.95)
        out.append(ComparisonRecord(
            task=task, metric=metric, variant=variant, vs=vs, delta=c.delta, low=c.low, high=c.high,
            p_value=c.p_value, p_holm=p_holm, p_exact=c.p_exact, test=c.test, method=c.method, n=c.n,
            n_ref_only=_count(c.n_ref_only), n_cand_only=_count(c.n_cand_only), n_nonzero=c.n_nonzero,
            n_invalid=c.n_invalid, n_invalid_as_loss=c.n_invalid_as_loss, confidence=c.confidence,
            significant=bool(c.n and p_holm < 1 - c.confidence),
            excludes_drop=c.upper_drop(level) if c.n else None, excludes_level=level))
    return out


def _count(x: float | None) -> int | None:
    """A pair count the statistics keep as a float (a sum of 0/1 differences)."""
    return None if x is None else round(x)


def _variant_record(lv: RunVariant, ctx: RunContext) -> VariantRecord:
    v = lv.variant
    return VariantRecord(name=v.name, adapter=str(v.adapter) if v.adapter else None,
                         adapter_sha256=lv.info.sha256 if lv.info else None, quantize=v.quantize, merge=v.merge,
                         merge_into=v.merge_target, is_dora=bool(lv.info and lv.info.is_dora),
                         fingerprint=lv.fingerprint, provenance=lv.info.provenance if lv.info else None,
                         cost=Cost.from_counters(ctx.counters(lv)), backend=lv.backend.record(lv.name))


def _sample_record(s: SampleResult) -> dict[str, Any]:
    return {"task": s.task, "variant": s.variant, "case_id": s.case_id, "prompt": s.prompt, "output": s.output,
            "target": s.target, "scores": {k: {"value": v.value, "reason": v.reason} for k, v in s.scores.items()},
            "cached": s.cached, "meta": dict(s.meta)}

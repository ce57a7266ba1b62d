"""Task kind `lm_eval`: any lm-eval task as a forgetting canary, run through evalkit's backends.

lm-eval builds the requests and computes each document's metrics, from its registry, a task YAML
or a generated config (the `mmlu` kind is a preset of this one). The model side is `BackendLM`,
an lm-eval `LM` over a run variant: loglikelihood requests and greedy generations go through the
run context, so they are cached one by one (an interrupted canary resumes, a second run reuses the
base's answers and loads no model) and run wherever the variant runs (in process or on a server).
Each document becomes one evalkit sample whose scores are lm-eval's per-sample metrics, so
variants are compared per document with evalkit's paired statistics; lm-eval's own aggregate
numbers are recorded beside them.
"""
from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evalkit import compat
from evalkit.backends.base import Backend, Prompt
from evalkit.config.suite import GenerationConfig, LmEvalTask
from evalkit.errors import ConfigError, missing_extra
from evalkit.tasks.base import SampleResult, TaskResult
from evalkit.types import Score

if TYPE_CHECKING:
    from evalkit.context import Requests, RunContext, RunVariant


def lm_eval_module():
    try:
        import lm_eval
    except ImportError:
        raise missing_extra("lm-eval", "mmlu") from None
    import lm_eval.evaluator
    import lm_eval.tasks

    return lm_eval


# ---------------------------------------------------------------- the LM on evalkit's backends

@functools.cache
def _backend_lm_class() -> type:
    """lm-eval's `TemplateLM` (its tokenization: `_encode_pair`, empty contexts) over a run
    variant, defined on first use so that importing this module does not import lm-eval."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import has_bos_prefix, normalize_gen_kwargs, postprocess_generated_text

    class BackendLM(TemplateLM):
        """An lm-eval `LM` answering for one run variant through the run context (cached, then its
        backend). Tokenization is HFLM's (`tok_encode` mirrors it: the tokenizer's own special
        tokens, none when the text already starts with BOS), so per-document answers match
        `simple_evaluate(model="hf")`; generation is greedy, cut at the task's `until` strings and
        EOS as HFLM cuts it. `computed` collects the (task, doc_id) of every request the cache
        could not answer."""

        def __init__(self, requests: Requests, lv: RunVariant, tokenizer: Any, *, batch_size: int = 8,
                     desc: str = "canary"):
            super().__init__()
            self.requests, self.lv, self.tokenizer = requests, lv, tokenizer
            self.batch_size, self.desc = batch_size, desc
            self.computed: set[tuple[str, int]] = set()
            self._docs: list[tuple[str, int]] | None = None  # per request being scored: (task, doc_id)

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            bos = self.tokenizer.bos_token_id
            return bos if bos is not None else self.tokenizer.eos_token_id

        @property
        def max_length(self) -> int:
            return self.lv.backend.max_length

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
            special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
            if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
                special = {"add_special_tokens": False}
            return self.tokenizer.encode(string, **special)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            # TemplateLM tokenizes `requests` in order, so index i below is requests[i]
            self._docs = [(r.task_name, r.doc_id) for r in requests]
            try:
                return super().loglikelihood(requests, disable_tqdm=True)
            finally:
                self._docs = None

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any):
            """((context, continuation), context tokens, continuation tokens) per request ->
            (loglikelihood, is_greedy) per request."""
            results = self.requests.loglikelihood(self.lv, [(r[1], r[2]) for r in requests], batch_size=self.batch_size,
                                             desc=self.desc)
            if self._docs is not None:
                self.computed.update(self._docs[i] for i, (_, cached) in enumerate(results) if not cached)
            return [score for score, _ in results]

        def generate_until(self, requests, disable_tqdm: bool = False):
            out: list[str | None] = [None] * len(requests)
            groups: dict[str, list[int]] = {}  # requests sharing their generation kwargs run together
            for i, r in enumerate(requests):
                groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
            eos = self.tokenizer.decode([self.eot_token_id])
            for indices in groups.values():
                kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], 256)
                refuse_sampling(requests[indices[0]].task_name, kwargs)
                until = list(kwargs["until"] or [])
                if eos not in until:
                    until.append(eos)
                max_gen = int(kwargs["max_gen_toks"])
                room = max(self.max_length - max_gen, 1)  # HFLM's left truncation of the context
                prompts = [Prompt(requests[i].args[0], tuple(self.tok_encode(requests[i].args[0])[-room:]))
                           for i in indices]
                gen = GenerationConfig(max_new_tokens=max_gen, stop=tuple(u for u in until if u),
                                       batch_size=self.batch_size)
                results = self.requests.generate_prompts([self.lv], prompts, gen, desc=self.desc)[self.lv.name]
                for i, (output, cached) in zip(indices, results):
                    out[i] = postprocess_generated_text(generation=output.text, stop=until, think_end_token=None)
                    if not cached:
                        self.computed.add((requests[i].task_name, requests[i].doc_id))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise ConfigError("perplexity tasks (loglikelihood_rolling) are not a canary evalkit runs",
                              hint="`kind: drift` measures how far a variant's next-token distributions move")

    return BackendLM


def backend_lm(ctx: RunContext, lv: RunVariant, *, batch_size: int = 8, desc: str = "canary"):
    """An lm-eval `LM` answering as `lv`, through the run context's cache and `lv`'s backend."""
    lm_eval_module()
    return _backend_lm_class()(ctx, lv, ctx.tokenizer, batch_size=batch_size, desc=desc)


def standalone_lm(backend: Backend, tokenizer: Any, variant: str = "base", *, batch_size: int = 8):
    """An lm-eval `LM` answering as one of `backend`'s variants, outside a run (no cache): for
    comparing with lm-eval's own backends in tests and benches."""
    from evalkit.cache import Cache
    from evalkit.config.suite import Variant
    from evalkit.context import Requests, RunVariant

    lm_eval_module()
    lv = RunVariant(Variant(name=variant), None, f"standalone:{variant}", backend)
    return _backend_lm_class()(Requests(cache=Cache(None), progress=False, log=lambda _: None), lv, tokenizer,
                               batch_size=batch_size, desc=variant)


def simple_evaluate(model: Any, tasks: Sequence[Any], task_manager: Any = None, **kwargs: Any) -> dict[str, Any]:
    """`lm_eval.simple_evaluate`: per-document samples kept, no bootstrap of lm-eval's own stderr
    (evalkit's paired statistics replace it), the process-wide random seeds left alone, and no
    scan of lm-eval's task folder (~15 s) unless a registry task needs it."""
    lm_eval = lm_eval_module()
    args = dict(tasks=list(tasks), task_manager=task_manager or lm_eval.tasks.TaskManager(include_defaults=False),
                log_samples=True, bootstrap_iters=0, random_seed=None, numpy_random_seed=None,
                torch_random_seed=None)
    args.update(kwargs)
    return _quiet(lm_eval.simple_evaluate)(model=model, **args)


def _quiet(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run fn without lm-eval's per-task noise: its info/warning lines and the "Building contexts"
    progress bar it draws per task (57 of each for the MMLU preset)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        logger = logging.getLogger("lm_eval")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            with compat.lm_eval_task_progress_off():
                return fn(*args, **kwargs)
        finally:
            logger.setLevel(level)
    return wrapper


# ---------------------------------------------------------------- lm-eval's documents -> samples

@dataclass(frozen=True)
class Document:
    """One document as lm-eval scored it for one variant: its metrics and what the model said."""

    task: str
    doc_id: int
    prompt: str
    output: str  # generation: the raw text; multiple choice: the chosen continuation
    target: Any
    metrics: dict[str, float]  # lm-eval's per-sample metrics; `metric.filter` for filters other than "none"
    doc: Mapping[str, Any] = field(default_factory=dict)
    loglikelihoods: tuple[float, ...] | None = None  # multiple choice: one per choice
    filtered: dict[str, Any] = field(default_factory=dict)  # filter -> the response after it

    @property
    def case_id(self) -> str:
        return f"{self.task}/{self.doc_id}"

    @property
    def choice(self) -> int | None:
        lls = self.loglikelihoods
        return None if lls is None else max(range(len(lls)), key=lls.__getitem__)  # first maximum, as argmax


def _scalar(value: Any) -> float | None:
    if isinstance(value, bool | int | float) and not (isinstance(value, float) and math.isinf(value)):
        return float(value)
    return None


def documents(results: Mapping[str, Any]) -> list[Document]:
    """One Document per (task, doc_id) from lm-eval's logged samples; a document scored under
    several filters (gsm8k's strict-match, flexible-extract) carries each filter's metrics.
    Non-scalar per-sample values (corpus-level BLEU's pairs, IFEval's per-instruction lists) stay
    in lm-eval's own aggregate numbers only."""
    out: dict[tuple[str, int], Document] = {}
    for task, samples in results["samples"].items():
        for s in samples:
            key = (task, int(s["doc_id"]))
            suffix = "" if s["filter"] == "none" else f".{s['filter']}"
            metrics = {f"{m}{suffix}": v for m in s["metrics"] if (v := _scalar(s.get(m))) is not None}
            doc = out.get(key)
            if doc is None:
                args = [list(a) for a in s["arguments"]]
                resps = s["filtered_resps"]
                multiple_choice = bool(resps) and all(isinstance(r, list | tuple) and len(r) == 2
                                                      and isinstance(r[0], float) for r in resps)
                lls = tuple(float(r[0]) for r in resps) if multiple_choice else None
                target = s["target"]
                if lls is not None:
                    choice = max(range(len(lls)), key=lls.__getitem__)
                    output = str(args[choice][1]).strip()
                    if isinstance(target, int) and 0 <= target < len(args):
                        target = str(args[target][1]).strip()
                else:
                    raw = s["resps"][0][0] if s["resps"] and s["resps"][0] else ""
                    output = str(raw)
                doc = out[key] = Document(task, key[1], str(args[0][0]) if args else "", output, target, {},
                                          s.get("doc") or {}, lls)
            doc.metrics.update(metrics)
            if doc.loglikelihoods is None:
                doc.filtered[s["filter"]] = s["filtered_resps"][0] if s["filtered_resps"] else None
    return list(out.values())


def aggregate_numbers(results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """lm-eval's own numbers per task and group (`acc,none` ...), stderr left out (not computed)."""
    out: dict[str, dict[str, float]] = {}
    for section in ("results", "groups"):
        for task, values in (results.get(section) or {}).items():
            nums = {k: float(v) for k, v in values.items()
                    if "_stderr" not in k and k != "alias" and _scalar(v) is not None}
            if nums:
                out.setdefault(task, {}).update(nums)
    return out


# ---------------------------------------------------------------- loading and slicing lm-eval tasks

def task_manager(specs: Sequence[str]) -> Any:
    """lm-eval's TaskManager: registry names need its task folder indexed (~15 s); paths (task
    YAML files, folders of them) are indexed alone."""
    folders = tuple(s for s in specs if Path(s).is_dir())
    edits = tuple((str(f), f.stat().st_mtime_ns) for d in folders for f in sorted(Path(d).rglob("*.y*ml")))
    return _task_manager(folders, any(not Path(s).exists() for s in specs), edits)


@functools.lru_cache(maxsize=4)  # preflight and run index once (again when a folder's YAML changed)
def _task_manager(folders: tuple[str, ...], registry: bool, edits: tuple[tuple[str, int], ...]) -> Any:
    return lm_eval_module().tasks.TaskManager(include_path=list(folders) or None, include_defaults=registry)


def resolve_specs(specs: Sequence[str], tm: Any, where: str = "tasks") -> list[str]:
    """What lm-eval loads for each entry: a registry name or YAML path as given; a folder stands
    for every task defined in it."""
    from evalkit.errors import did_you_mean

    out: list[str] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            inside = sorted(name for name, e in tm.task_index.items()
                            if e.yaml_path is not None and path.resolve() in Path(e.yaml_path).resolve().parents
                            and str(e.kind).lower().endswith("task"))
            if not inside:
                raise ConfigError(f"no lm-eval task YAML (with a `task:` key) under {path}", path=where)
            out += inside
        elif path.exists() or spec in tm.task_index:
            out.append(spec)
        else:
            raise ConfigError(f"unknown lm-eval task '{spec}'{did_you_mean(spec, tm.all_tasks)}", path=where,
                              hint="a registry name (`lm-eval ls tasks`), or the path of a task YAML or folder")
    return out


def load_tasks(specs: Sequence[Any], tm: Any, where: str = "tasks") -> dict[str, Any]:
    """{task name: lm-eval Task} for the specs (names, paths or config dicts), with data a task
    cannot load (the Hugging Face hub out of reach) turned into an error naming its dataset."""
    loaded: dict[str, Any] = {}
    for spec in specs:
        try:
            loaded.update(_quiet(tm.load)([spec])["tasks"])
        except ConfigError:
            raise
        except Exception as e:
            raise _data_error(spec, tm, e, where) from None
    return loaded


def _data_error(spec: Any, tm: Any, e: Exception, where: str) -> ConfigError:
    """A task that failed to build: when its data is on the hub and out of reach, the error names
    the dataset and how to use local files instead."""
    entry = tm.task_index.get(spec) if isinstance(spec, str) else None
    cfg = (entry.cfg if entry is not None else None) or (spec if isinstance(spec, Mapping) else {})
    task = spec if isinstance(spec, str) else cfg.get("task")
    first = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    dataset = cfg.get("dataset_path")
    hub = (dataset not in (None, "json", "csv", "parquet", "text", "arrow")
           and (isinstance(e, OSError) or any(w in type(e).__name__ for w in ("NotFound", "Offline", "Connection"))))
    if not hub:
        return ConfigError(f"lm-eval task '{task}' could not be built: {first}", path=where)
    name = f" ({cfg['dataset_name']})" if cfg.get("dataset_name") else ""
    return ConfigError(
        f"lm-eval task '{task}' could not load dataset '{dataset}'{name} from the Hugging Face hub: {first}",
        path=where,
        hint="offline, point the task at local files: copy its YAML, set `dataset_path: json` (or csv, parquet) "
             "and `dataset_kwargs: {data_files: {test: /abs/path/test.jsonl}}`, and list the YAML's path under "
             "`tasks:`")


def _sizes(task: LmEvalTask, docs: Mapping[str, int], seed: int,
           log: Callable[[str], None]) -> tuple[dict[str, int], dict[str, Any]]:
    """Documents per lm-eval task: `limit` each, the sample size `detect_drop` asks for spread over
    the tasks (as the MMLU canary spreads it over subjects), or all of them."""
    from evalkit.tasks.mmlu_data import can_clear, size_for_drop

    info: dict[str, Any] = {"seed": seed}
    if task.detect_drop is not None:
        counts, notes, sizing = size_for_drop(task.detect_drop, docs, task.confidence, task.power, task.discordance,
                                              unit="documents")
        info.update(sizing)
    else:
        counts = {t: min(task.limit, n) if task.limit else n for t, n in docs.items()}
        words, margin = can_clear(sum(counts.values()), task.discordance, task.confidence, task.power)
        notes = [f"{sum(counts.values())} documents: {words}"]
        info.update(limit=task.limit, confidence=task.confidence, power=task.power, discordance=task.discordance,
                    clears_max_drop=margin)
    total = sum(counts.values())
    info.update(n=total, power_note="; ".join(notes))
    log(f"{task.name}: {total} documents over {len(counts)} lm-eval task(s) (seed {seed}); {info['power_note']}")
    return counts, info


def seeded_indices(n_docs: int, take: int, seed: int, task: str) -> list[int]:
    """The first `take` of a seeded order of a task's documents, in document order."""
    from evalkit.tasks.mmlu_data import seeded_order

    return sorted(seeded_order(range(n_docs), f"evalkit-lm-eval:{seed}:{task}")[:take])


# ---------------------------------------------------------------- running a canary for every variant

@dataclass
class Canary:
    """What a canary found: per variant, its documents and lm-eval's own numbers."""

    documents: dict[str, list[Document]] = field(default_factory=dict)
    lm_eval: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    computed: dict[str, set[str]] = field(default_factory=dict)  # variant -> case ids the cache could not answer
    seconds: dict[str, float] = field(default_factory=dict)


def run_canary(ctx: RunContext, name: str, build: Callable[[], list[Any]], *, batch_size: int,
               task_manager: Any = None, samples: Mapping[str, list[int]] | None = None,
               unit: str = "documents", **evaluate_args: Any) -> Canary:
    """Every variant through lm-eval on the tasks `build()` makes (fresh per variant: lm-eval keeps
    per-run state on its Task objects), on the documents `samples` picks (default: all)."""
    out = Canary()
    for lv in ctx.variants:
        lm = backend_lm(ctx, lv, batch_size=batch_size, desc=name)
        t0 = time.perf_counter()
        results = simple_evaluate(lm, build(), task_manager, samples=dict(samples) if samples else None,
                                  **evaluate_args)
        wall = time.perf_counter() - t0
        docs = documents(results)
        # lm-eval numbers a sliced task's requests by position in the slice, its samples by document
        computed = {f"{t}/{samples[t][i] if samples else i}" for t, i in lm.computed}
        out.documents[lv.name], out.lm_eval[lv.name] = docs, aggregate_numbers(results)
        out.computed[lv.name] = {d.case_id for d in docs} & computed
        out.seconds[lv.name] = wall
        if computed:
            n = len(out.computed[lv.name])
            ctx.count(lv.name, cases=n)
            ctx.log(f"{name} [{lv.name}]: {n} {unit} through lm-eval in {wall:.1f} s ({wall / n:.3f} s each)"
                    + (f", {len(docs) - n} reused from cache" if len(docs) > n else ""))
        else:
            ctx.log(f"{name}: {lv.name} answers reused from cache ({len(docs)} {unit})")
    return out


def check_tasks(task: LmEvalTask) -> list[str]:
    """Before any training or model load: every listed task exists (data is loaded by `run`)."""
    return resolve_specs(task.tasks, task_manager(task.tasks), task.where("tasks"))


def run(ctx: RunContext, task: LmEvalTask) -> TaskResult:
    """`kind: lm_eval`: the tasks' seeded slice, scored by every variant, one sample per document."""
    seed = ctx.suite.seed if task.seed is None else task.seed
    tm = task_manager(task.tasks)
    specs = resolve_specs(task.tasks, tm, task.where("tasks"))
    loaded = load_tasks(specs, tm, task.where("tasks"))
    for name, t in loaded.items():
        if t.config.output_type == "generate_until":
            refuse_sampling(name, t.config.generation_kwargs, task.where("tasks"))
    counts, slice_info = _sizes(task, {n: len(t.eval_docs) for n, t in loaded.items()}, seed, ctx.log)
    samples = {n: seeded_indices(len(loaded[n].eval_docs), k, seed, n) for n, k in counts.items()}
    canary = run_canary(ctx, task.name, lambda: list(load_tasks(specs, tm, task.where("tasks")).values()),
                        batch_size=task.batch_size, task_manager=tm, samples=samples, fewshot_random_seed=seed,
                        num_fewshot=task.num_fewshot)
    result_samples = [_sample(task.name, v, d, d.case_id not in canary.computed[v])
                      for v, docs in canary.documents.items() for d in docs]
    return TaskResult(samples=result_samples, binary=_binary(result_samples), extras={
        "lm_eval_tasks": sorted(counts), "per_task": {v: _per_task(docs) for v, docs in canary.documents.items()},
        "lm_eval": canary.lm_eval, "computed": {v: len(c) for v, c in canary.computed.items()},
        "seconds": canary.seconds, "slice": slice_info, "num_fewshot": task.num_fewshot})


def refuse_sampling(task: str, generation_kwargs: Mapping[str, Any] | None, where: str = "") -> None:
    """Greedy only: sampled answers would not pair document by document across variants."""
    kwargs = generation_kwargs or {}
    if kwargs.get("do_sample") or (kwargs.get("temperature") or 0) > 0:
        raise ConfigError(f"lm-eval task '{task}' asks for sampled generation; evalkit decodes greedily so that "
                          "variants compare per document", path=where,
                          hint="set `generation_kwargs: {do_sample: false, temperature: 0}` in the task's YAML")


def _sample(task: str, variant: str, d: Document, cached: bool) -> SampleResult:
    meta: dict[str, Any] = {"lm_eval_task": d.task, "doc_id": d.doc_id}
    if d.loglikelihoods is not None:
        meta["loglikelihoods"] = list(d.loglikelihoods)
    if d.filtered:
        meta["filtered"] = {k: str(v) for k, v in d.filtered.items()}
    return SampleResult(task=task, variant=variant, case_id=d.case_id, prompt=d.prompt, output=d.output,
                        target=d.target, scores={m: Score(v) for m, v in d.metrics.items()}, cached=cached, meta=meta)


def _binary(samples: Sequence[SampleResult]) -> dict[str, bool]:
    """A metric is 0/1 when every document's value is (acc, exact_match), graded otherwise."""
    out: dict[str, bool] = {}
    for s in samples:
        for m, score in s.scores.items():
            out[m] = out.get(m, True) and score.value in (0.0, 1.0)
    return out


def _per_task(docs: Sequence[Document]) -> dict[str, dict[str, Any]]:
    """{lm-eval task: {n, metric, value, metrics}} for one variant (the breakdown the console shows
    where it changed and the report draws whole); `metric` is the task's first, its headline."""
    sums: dict[str, dict[str, list[float]]] = {}
    for d in docs:
        for m, v in d.metrics.items():
            sums.setdefault(d.task, {}).setdefault(m, []).append(v)
    out: dict[str, dict[str, Any]] = {}
    for t, metrics in sums.items():
        means = {m: sum(v) / len(v) for m, v in metrics.items()}
        headline = next(iter(means))
        out[t] = {"n": len(metrics[headline]), "metric": headline, "value": means[headline], "metrics": means}
    return out

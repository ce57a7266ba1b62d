"""Task kind `mmlu`: the catastrophic-forgetting canary, an MMLU slice run through EleutherAI's lm-eval.

lm-eval builds the prompts and scores the answers from task configs generated here (lm-eval's
own MMLU template, one task per subject as lm-eval's `mmlu` group has, data passed in memory:
nothing is written to lm-eval's task folder and nothing is downloaded). The model side is the
variant's backend, wrapped as an lm-eval `LM` with HFLM's tokenization: in process, the four
" A"/" B"/" C"/" D" requests of a question share ONE forward pass computing only the last
position's logits; on a server, they are prompt logprobs of the token ids evalkit sends.

Per-question answers are cached (variant fingerprint, question id and content, n_shot, prompt
config), written as each batch finishes: a second run reuses the base's answers, and an
interrupted canary resumes.
"""
from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from evalkit import compat
from evalkit.backends.base import Backend
from evalkit.cache import canary_key
from evalkit.config.suite import MmluTask
from evalkit.errors import ConfigError, missing_extra
from evalkit.tasks.base import SampleResult, TaskResult
from evalkit.tasks.mmlu_data import LETTERS, CanarySlice, Question, load_questions, per_subject_accuracy, plan_slice
from evalkit.types import Score, stable_hash

# lm-eval's tasks/mmlu/default template, verbatim, so numbers compare with lm-eval's `mmlu`.
DOC_TO_TEXT = ("{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
               "D. {{choices[3]}}\nAnswer:")
TASK_PREFIX = "evalkit_mmlu_"


def plan(task: MmluTask, suite_seed: int = 0, base_dir: Path | None = None,
         log: Callable[[str], None] | None = None) -> tuple[CanarySlice, str]:
    """The questions this canary asks (and the few-shot pool), and where they came from."""
    source = task.source if isinstance(task.source, str) else task.source.model_dump(exclude_none=True)
    loaded = load_questions(source, base_dir)
    if loaded.skipped and log is not None:
        log(f"canary: skipped {loaded.skipped} malformed row(s) in {loaded.source}")
    sl = plan_slice(loaded, subjects=task.subjects, per_subject=task.per_subject, detect_drop=task.detect_drop,
                    n_shot=task.n_shot, seed=suite_seed if task.seed is None else task.seed,
                    confidence=task.confidence, power=task.power, discordance=task.discordance, log=log)
    return sl, loaded.source


# ---------------------------------------------------------------- lm-eval task configs

def _description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def _dataset(docs: list[dict[str, Any]], **_: Any):
    """lm-eval's `custom_dataset` hook: rows in memory (lm-eval passes its metadata as kwargs)."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def task_configs(questions: Sequence[Question], fewshot: Mapping[str, Sequence[Question]],
                 n_shot: int = 0) -> list[dict[str, Any]]:
    """One lm-eval task config per subject, mirroring lm-eval's mmlu default template; usable
    unchanged with `lm_eval.simple_evaluate(model="hf", tasks=...)` (the equality test does)."""
    by_subject: dict[str, list[Question]] = {}
    for q in questions:
        by_subject.setdefault(q.subject, []).append(q)
    configs = []
    for subject, qs in by_subject.items():
        cfg: dict[str, Any] = {
            "task": TASK_PREFIX + subject, "task_alias": subject,
            "custom_dataset": functools.partial(_dataset, [q.doc() for q in qs]), "test_split": "test",
            "output_type": "multiple_choice", "description": _description(subject),
            "doc_to_text": DOC_TO_TEXT, "doc_to_choice": list(LETTERS), "doc_to_target": "answer",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "num_fewshot": n_shot, "metadata": {"version": 1.0},
        }
        if n_shot:
            shots = list(fewshot.get(subject, ()))[:n_shot]
            if len(shots) < n_shot:
                raise ConfigError(f"subject {subject}: {len(shots)} few-shot examples for n_shot={n_shot}")
            cfg["fewshot_config"] = {"sampler": "first_n", "samples": [q.doc() for q in shots]}
        configs.append(cfg)
    return configs


def prompt_config_hash(subject: str, fewshot: Sequence[Question], n_shot: int) -> str:
    """Everything besides the question that shapes its prompt: part of every cache key."""
    return stable_hash({"template": DOC_TO_TEXT, "description": _description(subject), "n_shot": n_shot,
                        "fewshot": [q.content_hash for q in list(fewshot)[:n_shot]]})


# ---------------------------------------------------------------- the LM on evalkit's model

def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise missing_extra("lm-eval", "mmlu") from None
    import lm_eval.evaluator
    import lm_eval.tasks

    return lm_eval


OnQuestion = Callable[[dict[str, Any], str, list[float], float], None]  # doc, prompt, loglikelihoods, seconds


@functools.cache
def _backend_lm_class() -> type:
    """lm-eval's `TemplateLM` (its tokenization: `_encode_pair`, empty contexts) over an evalkit
    backend, defined on first use so that importing this module does not import lm-eval."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import has_bos_prefix

    class BackendLM(TemplateLM):
        """An lm-eval `LM` whose scoring is a backend's `loglikelihood`, for one variant.

        Tokenization is HFLM's (`tok_encode` below mirrors it: the tokenizer's own special
        tokens, none when the text already starts with BOS), so per-question answers match
        `simple_evaluate(model="hf")`; the scoring runs wherever the variant runs, and each
        question is handed to `on_question` as soon as all its choices are scored."""

        def __init__(self, backend: Backend, variant: str, tokenizer: Any, *, batch_size: int = 8,
                     on_question: OnQuestion | None = None, progress: bool = True, desc: str = "canary"):
            super().__init__()
            self.backend, self.variant, self.tokenizer = backend, variant, tokenizer
            self.batch_size, self.on_question, self.progress, self.desc = batch_size, on_question, progress, desc
            self._meta: list[tuple[dict, int, str]] | None = None  # per request: doc, choice index, context
            self._partial: dict[str, dict[int, float]] = {}

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            bos = self.tokenizer.bos_token_id
            return bos if bos is not None else self.tokenizer.eos_token_id

        @property
        def max_length(self) -> int:
            return self.backend.max_length

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
            special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
            if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
                special = {"add_special_tokens": False}
            return self.tokenizer.encode(string, **special)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            # TemplateLM tokenizes `requests` in order, so index i below is requests[i]
            self._meta = [(r.doc, r.idx, r.args[0]) for r in requests]
            self._partial = {}
            try:
                return super().loglikelihood(requests, disable_tqdm=True)
            finally:
                self._meta = None

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any):
            """((context, continuation), context tokens, continuation tokens) per request ->
            (loglikelihood, is_greedy) per request, scored by the backend."""
            from tqdm.auto import tqdm

            results: list[tuple[float, bool] | None] = [None] * len(requests)
            bar = tqdm(total=len(requests), desc=self.desc, unit="choice", disable=not self.progress, leave=False)
            t0 = time.perf_counter()

            def on_done(indices: list[int], scores: list[tuple[float, bool]]) -> None:
                nonlocal t0
                for i, r in zip(indices, scores):
                    results[i] = r
                now = time.perf_counter()
                self._report(indices, results, now - t0)
                t0 = now
                bar.update(len(indices))

            self.backend.loglikelihood(self.variant, [(r[1], r[2]) for r in requests], on_done,
                                       batch_size=self.batch_size)
            bar.close()
            return results

        def _report(self, indices: list[int], results: list, seconds: float) -> None:
            """Hand each question to `on_question` once all its choices are scored (for caching)."""
            if self.on_question is None or self._meta is None or not indices:
                return
            docs = {self._meta[i][0]["id"] for i in indices}
            for i in indices:
                doc, idx, context = self._meta[i]
                got = self._partial.setdefault(doc["id"], {})
                got[idx] = results[i][0]
                if len(got) == len(doc["choices"]):
                    self.on_question(doc, context, [got[k] for k in range(len(got))], seconds / len(docs))

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("evalkit's canary scores multiple-choice loglikelihoods only")

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("evalkit's canary scores multiple-choice loglikelihoods only")

    return BackendLM


def canary_lm(backend: Backend, variant: str, tokenizer: Any, *, batch_size: int = 8,
              on_question: OnQuestion | None = None, progress: bool = False, desc: str = "canary"):
    """An lm-eval `LM` scoring through `backend` as `variant`."""
    _lm_eval()
    return _backend_lm_class()(backend, variant, tokenizer, batch_size=batch_size, on_question=on_question,
                               progress=progress, desc=desc)


def simple_evaluate(model: Any, configs: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` on generated configs: offline (no task-folder scan, which also
    takes ~15 s), per-question samples kept, no bootstrap of lm-eval's own stderr (evalkit's
    paired statistics replace it), and the process-wide random seeds left alone."""
    lm_eval = _lm_eval()
    args = dict(tasks=configs, task_manager=lm_eval.tasks.TaskManager(include_defaults=False),
                log_samples=True, bootstrap_iters=0, random_seed=None, numpy_random_seed=None,
                torch_random_seed=None)
    args.update(kwargs)
    return _quiet(lm_eval.simple_evaluate)(model=model, **args)


def _quiet(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run fn without lm-eval's per-task noise: a warning (custom dataset) and a progress bar
    (request building) for each of up to 57 generated tasks."""
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


def records_from_results(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """question id -> {prompt, loglikelihoods, choice, correct}, read from lm-eval's logged samples."""
    out = {}
    for task_samples in results["samples"].values():
        for s in task_samples:
            lls = [float(r[0]) for r in s["filtered_resps"]]
            choice = max(range(len(lls)), key=lls.__getitem__)  # first maximum, as np.argmax
            out[s["doc"]["id"]] = {"prompt": s["arguments"][0][0], "loglikelihoods": lls, "choice": choice,
                                   "correct": bool(s["acc"])}
    return out


def _record(lls: Sequence[float], prompt: str, answer: int, seconds: float = 0.0) -> dict[str, Any]:
    choice = max(range(len(lls)), key=lls.__getitem__)
    return {"prompt": prompt, "loglikelihoods": list(lls), "choice": choice, "correct": choice == answer,
            "seconds": seconds}


# ---------------------------------------------------------------- the task kind

def run(ctx, task: MmluTask) -> TaskResult:
    """Every variant's answer to every question of the slice, joined by question id."""
    sl, source = plan(task, ctx.suite.seed, ctx.suite.dir, log=ctx.log)
    n_shot = task.n_shot
    prompt_hash = {s: prompt_config_hash(s, shots, n_shot) for s, shots in sl.fewshot.items()}
    samples: list[SampleResult] = []
    per_subject: dict[str, Any] = {}
    seconds_per_question: dict[str, float] = {}
    computed: dict[str, int] = {}
    for lv in ctx.variants:
        keys = {q.id: canary_key(lv.fingerprint, q.id, q.content_hash, n_shot, prompt_hash[q.subject])
                for q in sl.questions}
        records = {qid: r for qid, k in keys.items() if (r := ctx.cache.get(k)) is not None}
        cached = set(records)
        todo = [q for q in sl.questions if q.id not in cached]
        wall = 0.0
        if todo:
            def on_question(doc: dict, prompt: str, lls: list[float], seconds: float, keys=keys) -> None:
                ctx.cache.put(keys[doc["id"]], _record(lls, prompt, doc["answer"], seconds))

            t0 = time.perf_counter()
            lm = canary_lm(lv.backend, lv.name, ctx.tokenizer, batch_size=task.batch_size, on_question=on_question,
                           progress=ctx.progress, desc=f"{task.name} [{lv.name}]")
            fresh = records_from_results(simple_evaluate(lm, task_configs(todo, sl.fewshot, n_shot)))
            wall = time.perf_counter() - t0
            records.update(fresh)
            ctx.count(lv.name, cases=len(todo), seconds=wall)
            ctx.log(f"canary [{lv.name}]: {len(todo)} questions through lm-eval in {wall:.1f} s "
                    f"({wall / len(todo):.3f} s/question)"
                    + (f", {len(cached)} reused from cache" if cached else ""))
        else:
            ctx.log(f"canary: {lv.name} answers reused from cache ({len(cached)} questions)")
        computed[lv.name] = len(todo)
        seconds_per_question[lv.name] = wall / len(todo) if todo else 0.0
        for q in sl.questions:
            r = records[q.id]
            chosen, answer = LETTERS[r["choice"]], LETTERS[q.answer]
            samples.append(SampleResult(
                task=task.name, variant=lv.name, case_id=q.id, prompt=r["prompt"], output=chosen, target=answer,
                scores={"accuracy": Score(1.0 if r["correct"] else 0.0, reason=f"chose {chosen}, answer {answer}")},
                cached=q.id in cached, meta={"subject": q.subject, "loglikelihoods": r["loglikelihoods"]}))
        per_subject[lv.name] = per_subject_accuracy({q.id: records[q.id]["correct"] for q in sl.questions},
                                                    sl.questions)
    slice_info = {k: v for k, v in sl.info.items() if k in ("per_subject", "detect_drop", "seed", "power_note",
                                                             "n", "needed", "confidence", "power", "discordance",
                                                             "clears_max_drop")}
    result = TaskResult(samples=samples, binary={"accuracy": True}, extras={
        "question_ids": sl.ids, "per_subject": per_subject, "seconds_per_question": seconds_per_question,
        "computed": computed, "source": source, "n_shot": n_shot, "slice": slice_info})
    for line in summary_lines(result):
        ctx.log(line)
    return result


def summary_lines(result: TaskResult, *, confidence: float = 0.95) -> list[str]:
    """Log view of a canary: accuracy per variant with its exact interval. The comparisons with the
    reference, and the drop each rules out, follow the run (from the record: cli.print_summary)."""
    from evalkit.stats import clopper_pearson

    scores: dict[str, list[float | None]] = {}
    for s in result.samples:
        scores.setdefault(s.variant, []).append(s.scores["accuracy"].value)
    lines = []
    for variant, values in scores.items():
        valid = [v for v in values if v is not None and v == v]
        k, n = int(sum(valid)), len(valid)
        iv = clopper_pearson(k, n, confidence)
        lines.append(f"canary {variant}: accuracy {100 * iv.value:.1f}% [{100 * iv.low:.1f}, {100 * iv.high:.1f}] "
                     f"({k}/{n}" + (f", {len(values) - n} invalid)" if len(values) > n else ")"))
    return lines

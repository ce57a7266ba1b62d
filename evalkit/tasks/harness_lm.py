"""lm-eval as a library, with evalkit's backends as its model: `BackendLM`, an lm-eval `LM` over a run
variant, and lm-eval's evaluator called quietly.

Loglikelihood requests and greedy generations go through the run context, so they are cached one
by one (an interrupted canary resumes, a second run reuses the base's answers and loads no model)
and run wherever the variant runs (in process or on a server). lm-eval is imported on first use
only: importing this module does not import it.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn

from evalkit import compat
from evalkit.backends.base import Backend, Prompt
from evalkit.config.generation import GenerationConfig
from evalkit.errors import ConfigError, missing_extra

if TYPE_CHECKING:
    from evalkit.context import Requests, RunContext, RunVariant


def lm_eval_module() -> ModuleType:
    """lm-eval, with the submodules evalkit uses imported (a missing extra is a ConfigError saying which)."""
    try:
        import lm_eval
    except ImportError:
        raise missing_extra("lm-eval", "mmlu") from None
    import lm_eval.evaluator
    import lm_eval.tasks

    module: ModuleType = lm_eval  # untyped: its names are Any
    return module


# ---------------------------------------------------------------- the LM on evalkit's backends

@functools.cache
def _backend_lm_class() -> type:
    """lm-eval's `TemplateLM` (its tokenization: `_encode_pair`, empty contexts) over a run
    variant, defined on first use so that importing this module does not import lm-eval."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import has_bos_prefix, normalize_gen_kwargs, postprocess_generated_text

    class BackendLM(TemplateLM):  # type: ignore[misc]  # lm-eval has no type hints: TemplateLM is Any
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
            eos: int = self.tokenizer.eos_token_id
            return eos

        @property
        def prefix_token_id(self) -> int:
            bos: int | None = self.tokenizer.bos_token_id
            return bos if bos is not None else self.eot_token_id

        @property
        def max_length(self) -> int:
            return self.lv.backend.max_length

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
            special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
            if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
                special = {"add_special_tokens": False}
            ids: list[int] = self.tokenizer.encode(string, **special)
            return ids

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            # TemplateLM tokenizes `requests` in order, so index i below is requests[i]
            self._docs = [(r.task_name, r.doc_id) for r in requests]
            try:
                scores: list[tuple[float, bool]] = super().loglikelihood(requests, disable_tqdm=True)
                return scores
            finally:
                self._docs = None

        def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False,
                                  **kwargs: Any) -> list[tuple[float, bool]]:
            """((context, continuation), context tokens, continuation tokens) per request ->
            (loglikelihood, is_greedy) per request."""
            results = self.requests.loglikelihood(self.lv, [(r[1], r[2]) for r in requests], batch_size=self.batch_size,
                                             desc=self.desc)
            if self._docs is not None:
                self.computed.update(self._docs[i] for i, (_, cached) in enumerate(results) if not cached)
            return [score for score, _ in results]

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str | None]:
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

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> NoReturn:
            raise ConfigError("perplexity tasks (loglikelihood_rolling) are not a canary evalkit runs",
                              hint="`kind: drift` measures how far a variant's next-token distributions move")

    return BackendLM


def backend_lm(ctx: RunContext, lv: RunVariant, *, batch_size: int = 8, desc: str = "canary") -> Any:
    """An lm-eval `LM` answering as `lv`, through the run context's cache and `lv`'s backend."""
    lm_eval_module()
    return _backend_lm_class()(ctx, lv, ctx.tokenizer, batch_size=batch_size, desc=desc)


def standalone_lm(backend: Backend, tokenizer: Any, variant: str = "base", *, batch_size: int = 8) -> Any:
    """An lm-eval `LM` answering as one of `backend`'s variants, outside a run (no cache): for
    comparing with lm-eval's own backends in tests and benches."""
    from evalkit.cache import Cache
    from evalkit.config.variant import Variant
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
    results: dict[str, Any] = quiet(lm_eval.simple_evaluate)(model=model, **args)
    return results


def quiet(fn: Callable[..., Any]) -> Callable[..., Any]:
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


def refuse_sampling(task: str, generation_kwargs: Mapping[str, Any] | None, where: str = "") -> None:
    """Greedy only: sampled answers would not pair document by document across variants."""
    kwargs = generation_kwargs or {}
    if kwargs.get("do_sample") or (kwargs.get("temperature") or 0) > 0:
        raise ConfigError(f"lm-eval task '{task}' asks for sampled generation; evalkit decodes greedily so that "
                          "variants compare per document", path=where,
                          hint="set `generation_kwargs: {do_sample: false, temperature: 0}` in the task's YAML")

"""The `openai` backend: variants served by any OpenAI-compatible server (vLLM, SGLang, TGI,
evalkit serve), one or several replicas.

Prompts are rendered by evalkit and sent as token ids to `/v1/completions`, so the server runs
exactly the tokens the `hf` backend would. Generation is greedy (`temperature: 0`);
loglikelihood is the prompt's own logprobs (`echo` + `logprobs`, `max_tokens: 1`) sliced at the
continuation, so the MMLU canary runs remotely with the same per-question answers.

Work is a queue of (variant, prompt) jobs, sorted by variant so a server's LoRA slots stay warm,
pulled by `concurrency` workers per replica: a replica that answers faster takes more. Results
return to the calling thread (which owns the cache) as they finish; a replica that stops
answering hands its job back to the others, and when none is left the run stops with what
finished kept.
"""
from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from evalkit.backends.base import PROBES, Job, OnOutputs, OnScores, Prompt, TokenPair, token_ids, truncate_at_stop
from evalkit.config.generation import GenerationConfig
from evalkit.config.variant import BackendConfig
from evalkit.endpoint import Endpoint, served_identity
from evalkit.errors import ConfigError, EvalkitError, ExitCode
from evalkit.record.types import BackendRecord
from evalkit.types import Output, stable_hash

DEFAULT_MAX_LENGTH = 2048  # when the server's model entry gives no max_model_len
PROBE_TOKENS = 8


class EndpointFailed(EvalkitError):
    """Every replica failed a request after its retries; what finished is cached."""

    exit_code = ExitCode.INTERRUPTED


class OpenAIBackend:
    """Variants served by OpenAI-compatible servers: a `Backend`, and `Served` (`served`, `parent`,
    `probe_texts`, `prompt_logprobs`)."""

    engine = "openai"  # what results.json names

    def __init__(self, cfg: BackendConfig, served: Mapping[str, str], tokenizer: Any, *,
                 log: Callable[[str], None] = print, sleep: Callable[[float], None] = time.sleep):
        """`served`: variant name -> the model name the server lists it under."""
        self.cfg, self.served, self.tokenizer, self.log = cfg, dict(served), tokenizer, log
        self.stats: dict[str, dict[str, Any]] = {}
        self.endpoints = [Endpoint(url, cfg, what="backend endpoint", sleep=sleep) for url in cfg.urls]
        self._probe_prompts = token_ids(tokenizer, PROBES)
        self._identities: dict[str, dict[str, Any]] = {}
        self._answers: dict[tuple[str, str], list[tuple[str, list[float]]]] = {}  # (url, variant) -> alone
        self.isolated = False  # one variant's requests in flight at a time (the mixed-traffic probe failed)
        self.mixing: dict[str, Any] = {}

    # ---------------------------------------------------------- what is served

    def check(self) -> None:
        """Before any work: every replica reachable and listing every served name, what each name
        serves (`identity`), and whether the server keeps models apart under mixed traffic."""
        for ep in self.endpoints:
            ep.check_reachable()
            for variant, name in self.served.items():
                try:
                    ep.entry(name)
                except ConfigError as e:
                    e.message = f"variant '{variant}': {e.message}"
                    e.args = (e.format(),)
                    raise
        for variant in self.served:
            self.identity(variant)
        self._check_mixing()

    def identity(self, variant: str) -> dict[str, Any]:
        """The served model's GET /models entry (id, root, parent, fingerprint, as the server gives
        them: the same on every replica, or the run is refused) and a probe fingerprint: the greedy
        answers to fixed probe prompts, so other weights behind the same name get other keys."""
        if variant not in self._identities:
            name = self.served[variant]
            entries = [served_identity(ep.entry(name)) for ep in self.endpoints]
            if any(e != entries[0] for e in entries):
                raise ConfigError(f"variant '{variant}': the replicas serve different models under '{name}': "
                                  + "; ".join(f"{ep.base_url}: {e}" for ep, e in zip(self.endpoints, entries)))
            for ep in self.endpoints:
                self._answers[(ep.base_url, variant)] = [self._complete_probe(ep, name, ids)
                                                         for ids in self._probe_prompts]
            probes = [stable_hash([t for t, _ in self._answers[(ep.base_url, variant)]]) for ep in self.endpoints]
            if any(p != probes[0] for p in probes):
                raise ConfigError(f"variant '{variant}': the replicas answer the probe prompts differently under "
                                  f"'{name}' ({', '.join(ep.base_url for ep in self.endpoints)})")
            self._identities[variant] = {"served": entries[0], "probe": probes[0]}
        return self._identities[variant]

    def _check_mixing(self) -> None:
        """The mixed-traffic probe: every variant's probe prompts sent at once, as a run sends them,
        must get the answers each got alone. A server that lets one model's requests leak into
        another's batch (vLLM CPU has answered base requests with a LoRA applied) fails it; then
        only one variant's requests are ever in flight at a time."""
        if len(self.served) < 2:
            self.mixing = {"probe": "not needed: one model served", "isolated": False}
            return
        jobs = [(variant, k) for k in range(len(PROBES)) for variant in self.served]  # interleaved
        ids = self._probe_prompts
        differing, asked = [], 0
        for ep in self.endpoints:
            with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="mixing-probe") as pool:
                answers = list(pool.map(lambda job, ep=ep: self._complete_probe(ep, self.served[job[0]], ids[job[1]]),
                                        jobs))
            asked += len(jobs)
            differing += [(ep.base_url, job) for job, got in zip(jobs, answers)
                          if not _same_answer(got, self._answers[(ep.base_url, job[0])][job[1]])]
        self.isolated = bool(differing)
        self.mixing = {"probe": "failed" if differing else "passed", "differing": len(differing), "asked": asked,
                       "isolated": self.isolated}
        if differing:
            which = sorted({job[0] for _, job in differing})
            self.log(f"WARNING: backend {', '.join(self.cfg.urls)}: {len(differing)} of {asked} probe answers changed "
                     f"when the variants' requests were in flight together (variants {', '.join(which)}): the "
                     "server mixes models up under concurrent traffic; sending one variant at a time")

    def probe_texts(self, variant: str) -> list[str]:
        """The greedy continuations of the probes as the first replica gave them (`identity`)."""
        self.identity(variant)
        return [text for text, _ in self._answers[(self.endpoints[0].base_url, variant)]]

    def parent(self, variant: str) -> str | None:
        """The served name of the model an adapter sits on, as GET /models says (`parent`)."""
        parent = self.identity(variant)["served"].get("parent")
        return str(parent) if parent else None

    def prompt_logprobs(self, name: str, prompts: Sequence[Sequence[int]]) -> list[tuple[list[float], list[str]]]:
        """Per prompt, each token's logprob given those before it (from the second token on) and the
        top-1 token there, from the first replica serving `name`, one request at a time."""
        ep = self.endpoints[0]
        out = []
        for ids in prompts:
            response = ep.with_retries(functools.partial(ep.client.completions.create, model=name, prompt=list(ids),
                                                         max_tokens=1, temperature=0, echo=True, logprobs=1))
            lp = _one_choice(response, ep).logprobs
            n = len(ids)
            if lp is None or not lp.token_logprobs or len(lp.token_logprobs) < n or any(
                    x is None for x in lp.token_logprobs[1:n]):
                raise _no_prompt_logprobs(ep)
            tops = (lp.top_logprobs or [None] * n)[1:n]
            out.append(([float(x) for x in lp.token_logprobs[1:n]], [max(t, key=t.get) if t else "" for t in tops]))
        return out

    def record(self, variant: str) -> BackendRecord:
        return BackendRecord(engine=self.engine, endpoints=self.cfg.urls, served_name=self.served[variant],
                             served=self.identity(variant), server_version=self._server_version,
                             mixed_traffic=self.mixing or None)

    @functools.cached_property
    def _server_version(self) -> str | None:
        """GET /version, once per backend (not once per variant)."""
        return self.endpoints[0].server_version()

    def _complete_probe(self, ep: Endpoint, name: str, ids: list[int]) -> tuple[str, list[float]]:
        response = ep.with_retries(lambda: ep.client.completions.create(
            model=name, prompt=ids, max_tokens=PROBE_TOKENS, temperature=0, logprobs=1))
        choice = _one_choice(response, ep)
        logprobs = choice.logprobs.token_logprobs if choice.logprobs and choice.logprobs.token_logprobs else []
        return choice.text or "", [float(x) for x in logprobs if x is not None]

    @property
    def max_length(self) -> int:
        lengths = [e.get("max_model_len") for ep in self.endpoints for e in ep.models().values()]
        known = [int(n) for n in lengths if isinstance(n, int) and n > 0]
        return min(known) if known else DEFAULT_MAX_LENGTH

    # ---------------------------------------------------------- the protocol

    def generate(self, jobs: Sequence[Job], prompts: Sequence[Prompt], gen: GenerationConfig,
                 on_done: OnOutputs) -> None:
        def complete(ep: Endpoint, job: Job) -> Output:
            name, i = job
            t0 = time.perf_counter()
            response = ep.with_retries(lambda: ep.client.completions.create(
                model=self.served[name], prompt=list(prompts[i].ids), max_tokens=gen.max_new_tokens,
                temperature=0, **({"stop": list(gen.stop)} if gen.stop else {})))
            choice = _one_choice(response, ep)
            text, hit_stop = truncate_at_stop(choice.text or "", gen.stop)
            usage = response.usage
            return Output(text=text, prompt=prompts[i].text, n_prompt_tokens=len(prompts[i].ids),
                          n_output_tokens=usage.completion_tokens if usage else 0,
                          finish_reason="length" if choice.finish_reason == "length" and not hit_stop else "stop",
                          latency_s=time.perf_counter() - t0)

        ordered = sorted(jobs, key=lambda job: (job[0], job[1]))  # adapter-major: LoRA slots stay warm
        groups = [[j for j in ordered if j[0] == name] for name in dict.fromkeys(j[0] for j in ordered)]
        for group in groups if self.isolated else [ordered]:
            self._run(group, complete, lambda done: on_done([(job[0], job[1], out) for job, out in done]))

    def loglikelihood(self, variant: str, requests: Sequence[TokenPair], on_done: OnScores, *,
                      batch_size: int = 8) -> None:
        """One request per (context, continuation), left-truncated to leave room for the one
        generated token; the continuation's logprobs are the last ones of the echoed prompt. (One
        prompt per request: vLLM CPU's engine dies on several prompt-logprob sequences at once.)"""
        limit = self.max_length - 1

        def score(ep: Endpoint, i: int) -> tuple[float, bool]:
            sent = (list(requests[i][0]) + list(requests[i][1]))[-limit:]
            response = ep.with_retries(lambda: ep.client.completions.create(
                model=self.served[variant], prompt=sent, max_tokens=1, temperature=0, echo=True, logprobs=1))
            return _continuation_score(ep, _one_choice(response, ep), len(sent), len(requests[i][1]))

        self._run(list(range(len(requests))), score, lambda done: on_done([i for i, _ in done], [r for _, r in done]),
                  concurrency=self.cfg.loglikelihood_concurrency or self.cfg.concurrency)

    def _run(self, work: list[Any], call: Callable[[Endpoint, Any], Any],
             deliver: Callable[[list[tuple[Any, Any]]], None], *, concurrency: int | None = None) -> None:
        """Run `call(endpoint, item)` for every item on `concurrency` workers per replica; results
        are delivered on this thread as they finish. A replica whose request failed after its
        retries is retired and the item goes back to the queue; with none left, the workers
        stop taking new items, the ones in flight finish and are delivered, and the failure is
        raised. A refused key, a garbled answer or Ctrl-C stops at once (finished work kept)."""
        if not work:
            return
        todo: queue.Queue[Any] = queue.Queue()
        for item in work:
            todo.put(item)
        results: queue.Queue[tuple[str, Any, Any]] = queue.Queue()
        stop = threading.Event()
        alive = {id(ep) for ep in self.endpoints}
        lock = threading.Lock()

        def worker(ep: Endpoint) -> None:
            while not stop.is_set() and id(ep) in alive:
                try:
                    item = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    results.put(("ok", item, call(ep, item)))
                except EvalkitError as e:
                    results.put(("fatal", item, e))
                except Exception as e:  # the replica failed this request after its retries
                    with lock:
                        alive.discard(id(ep))
                        last = not alive
                    todo.put(item)
                    results.put(("retired", ep, e) if not last else ("failed", item, (ep, e)))
                    return

        threads = [threading.Thread(target=worker, args=(ep,), daemon=True, name=f"backend-{n}")
                   for ep in self.endpoints for n in range(concurrency or self.cfg.concurrency)]
        for t in threads:
            t.start()
        finished, error = 0, None
        try:
            while finished < len(work):
                try:
                    kind, item, value = results.get(timeout=0.5)
                except queue.Empty:
                    if not any(t.is_alive() for t in threads) and results.empty():
                        break
                    continue
                if kind == "ok":
                    finished += 1
                    deliver([(item, value)])
                elif kind == "retired":
                    self.log(f"WARNING: backend endpoint {item.base_url} retired after "
                             f"{item.describe_error(value)}; its work goes to the other replicas")
                else:
                    stop.set()
                    error = error or value
        finally:
            stop.set()
        if isinstance(error, EvalkitError):  # a refused key, a garbled answer: as it is
            raise error
        if error is not None or finished < len(work):
            ep, e = error or (self.endpoints[0], RuntimeError("the workers stopped early"))
            raise EndpointFailed(f"backend endpoint {ep.base_url} failed after {self.cfg.retries} retries "
                                 f"({ep.describe_error(e)}); {finished} of {len(work)} requests finished and are "
                                 "cached: rerun to resume")

    def close(self) -> None:
        for ep in self.endpoints:
            ep.client.close()


def _same_answer(a: tuple[str, list[float]], b: tuple[str, list[float]], tolerance: float = 1e-3) -> bool:
    """The same greedy text, and token logprobs within batch-composition noise (fp32: ~1e-5)."""
    return a[0] == b[0] and all(abs(x - y) <= tolerance for x, y in zip(a[1], b[1]))


def _no_prompt_logprobs(ep: Endpoint) -> ConfigError:
    return ConfigError(f"backend endpoint {ep.base_url} returned no prompt logprobs (`echo` with `logprobs`), which "
                       "loglikelihood tasks (the MMLU canary) and the backend checks need",
                       hint="vLLM, SGLang and evalkit serve return them; run such tasks on `backend: hf`")


def _garbage(ep: Endpoint, what: str) -> EvalkitError:
    return EndpointFailed(f"backend endpoint {ep.base_url} answered with an unusable completion: {what}")


def _one_choice(response: Any, ep: Endpoint) -> Any:
    choices = getattr(response, "choices", None)
    if not choices:
        raise _garbage(ep, "no choices")
    return choices[0]


def _continuation_score(ep: Endpoint, choice: Any, n_sent: int, n_cont: int) -> tuple[float, bool]:
    """(sum of the continuation's prompt logprobs, whether each was the top token) from an echo."""
    lp = choice.logprobs
    if lp is None or not lp.token_logprobs or len(lp.token_logprobs) < n_sent:
        raise _no_prompt_logprobs(ep)
    picked = lp.token_logprobs[n_sent - n_cont:n_sent]
    tops = (lp.top_logprobs or [None] * n_sent)[n_sent - n_cont:n_sent]
    if any(x is None for x in picked):
        raise _garbage(ep, "a continuation token without a logprob")
    greedy = all(not top or x >= max(top.values()) - 1e-6 for x, top in zip(picked, tops))
    return float(sum(picked)), greedy

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

import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from evalkit.backends.base import Capabilities, Job, OnOutputs, OnScores, Prompt, TokenPair
from evalkit.backends.hf import truncate_at_stop
from evalkit.config.suite import BackendConfig, GenerationConfig
from evalkit.endpoint import Endpoint, EndpointAuthError, served_identity
from evalkit.errors import ConfigError, EvalkitError, ExitCode
from evalkit.record import BackendRecord
from evalkit.types import Output, stable_hash

DEFAULT_MAX_LENGTH = 2048  # when the server's model entry gives no max_model_len
# fixed probes whose greedy tokens identify what is served (cache keys; parity checks)
PROBES = ("The capital of France is", "def fibonacci(n):", "Translate to German: good morning",
          "Q: What is 17 * 3?\nA:")
PROBE_TOKENS = 8


class EndpointFailed(EvalkitError):
    """Every replica failed a request after its retries; what finished is cached."""

    exit_code = ExitCode.INTERRUPTED


class OpenAIBackend:
    capabilities = Capabilities(engine="openai", full_logits=False)

    def __init__(self, cfg: BackendConfig, served: Mapping[str, str], tokenizer: Any, *,
                 log: Callable[[str], None] = print, sleep: Callable[[float], None] = time.sleep):
        """`served`: variant name -> the model name the server lists it under."""
        self.cfg, self.served, self.tokenizer, self.log = cfg, dict(served), tokenizer, log
        self.stats: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.counts = {"requests": 0, "retries": 0}
        self.endpoints = [Endpoint(url, cfg, what="backend endpoint", sleep=sleep, count=self._count)
                          for url in cfg.urls]
        self._identities: dict[str, dict[str, Any]] = {}

    def _count(self, **add: int) -> None:
        with self._lock:
            for k, v in add.items():
                self.counts[k] = self.counts.get(k, 0) + v

    # ---------------------------------------------------------- what is served

    def check(self) -> None:
        """Before any work: every replica reachable, and each lists every served name."""
        for ep in self.endpoints:
            ep.check_reachable()
            for variant, name in self.served.items():
                try:
                    ep.entry(name)
                except ConfigError as e:
                    e.message = f"variant '{variant}': {e.message}"
                    e.args = (e.format(),)
                    raise

    def identity(self, variant: str) -> dict[str, Any]:
        """The served model's GET /models entry (id, root, parent, fingerprint, as the server gives
        them: the same on every replica, or the run is refused) and a probe fingerprint: the greedy
        tokens of fixed probe prompts, so other weights behind the same name get other keys."""
        if variant not in self._identities:
            name = self.served[variant]
            entries = [served_identity(ep.entry(name)) for ep in self.endpoints]
            if any(e != entries[0] for e in entries):
                raise ConfigError(f"variant '{variant}': the replicas serve different models under '{name}': "
                                  + "; ".join(f"{ep.base_url}: {e}" for ep, e in zip(self.endpoints, entries)))
            probes = [self._probe(ep, name) for ep in self.endpoints]
            if any(p != probes[0] for p in probes):
                raise ConfigError(f"variant '{variant}': the replicas answer the probe prompts differently under "
                                  f"'{name}' ({', '.join(ep.base_url for ep in self.endpoints)})")
            self._identities[variant] = {"engine": "openai", "served": entries[0], "probe": probes[0]}
        return self._identities[variant]

    def record(self, variant: str) -> BackendRecord:
        return BackendRecord(engine="openai", endpoints=self.cfg.urls, served_name=self.served[variant],
                             served=self.identity(variant), server_version=self.endpoints[0].server_version())

    def _probe(self, ep: Endpoint, name: str) -> str:
        ids = [list(self.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in PROBES]
        response = ep.with_retries(lambda: ep.client.completions.create(
            model=name, prompt=ids, max_tokens=PROBE_TOKENS, temperature=0, echo=True, logprobs=1))
        picks = []
        for choice in sorted(response.choices, key=lambda c: c.index):
            tops = choice.logprobs.top_logprobs if choice.logprobs else None
            picks.append([choice.text, [max(t, key=t.get) if t else None for t in (tops or [])]])
        return stable_hash(picks)

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
        self._run(ordered, complete, lambda done: on_done([(job[0], job[1], out) for job, out in done]))

    def loglikelihood(self, variant: str, requests: Sequence[TokenPair], on_done: OnScores, *,
                      batch_size: int = 8) -> None:
        """Requests sharing a context (a question's choices) go in one request, as a batch of
        token-id prompts; each is left-truncated to leave room for the one generated token."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (context, _) in enumerate(requests):
            groups.setdefault(tuple(context), []).append(i)
        limit = self.max_length - 1

        def score(ep: Endpoint, job: tuple[tuple[int, ...], list[int]]) -> list[tuple[float, bool]]:
            _, members = job
            sent = [(list(requests[i][0]) + list(requests[i][1]))[-limit:] for i in members]
            response = ep.with_retries(lambda: ep.client.completions.create(
                model=self.served[variant], prompt=sent, max_tokens=1, temperature=0, echo=True, logprobs=1))
            choices = sorted(response.choices, key=lambda c: c.index)
            if len(choices) != len(sent):
                raise _garbage(ep, f"{len(choices)} choices for {len(sent)} prompts")
            return [_continuation_score(ep, c, len(s), len(requests[i][1]))
                    for c, s, i in zip(choices, sent, members)]

        def deliver(done: list[tuple[tuple[tuple[int, ...], list[int]], list[tuple[float, bool]]]]) -> None:
            for (_, members), scores in done:
                on_done(members, scores)

        self._run(list(groups.items()), score, deliver)

    def _run(self, work: list[Any], call: Callable[[Endpoint, Any], Any],
             deliver: Callable[[list[tuple[Any, Any]]], None]) -> None:
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
                   for ep in self.endpoints for n in range(self.cfg.concurrency)]
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
                    if error is None:
                        error = value
        except BaseException:
            stop.set()
            raise
        finally:
            stop.set()
        if error is None and finished < len(work):
            error = RuntimeError("workers stopped early")
        if error is not None:
            if isinstance(error, EvalkitError):
                raise error
            ep, e = error if isinstance(error, tuple) else (self.endpoints[0], error)
            if isinstance(e, EndpointAuthError):
                raise e
            raise EndpointFailed(f"backend endpoint {ep.base_url} failed after {self.cfg.retries} retries "
                                 f"({ep.describe_error(e)}); {finished} of {len(work)} requests finished and are "
                                 "cached: rerun to resume")

    def close(self) -> None:
        for ep in self.endpoints:
            ep.client.close()


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
        raise ConfigError(f"backend endpoint {ep.base_url} returned no prompt logprobs (`echo` with `logprobs`), "
                          "which loglikelihood tasks (the MMLU canary) need",
                          hint="vLLM, SGLang and evalkit serve return them; run such tasks on `backend: hf`")
    picked = lp.token_logprobs[n_sent - n_cont:n_sent]
    tops = (lp.top_logprobs or [None] * n_sent)[n_sent - n_cont:n_sent]
    if any(x is None for x in picked):
        raise _garbage(ep, "a continuation token without a logprob")
    greedy = all(not top or x >= max(top.values()) - 1e-6 for x, top in zip(picked, tops))
    return float(sum(picked)), greedy

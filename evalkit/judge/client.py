"""The judge endpoint: any OpenAI-compatible server, through the `openai` client.

The judge is treated as the noisy, failing, costly part it is:
- retries with backoff on 429, 5xx, timeouts and connection errors (`evalkit.endpoint`);
- bounded concurrency (a thread pool of `concurrency` workers);
- a verdict's completions are cached as soon as it is valid, keyed on the endpoint's identity
  (base URL plus what GET /models says it serves: id, root, parent, content fingerprint), the full
  messages and parameters, never the key: a rerun costs no calls, an interrupted run resumes, and
  other weights behind the same URL and name are asked afresh;
- an unparseable verdict is re-asked, then recorded as invalid and not cached: a rerun asks again;
- every request carries a seed derived from the request itself, so a seed-honouring endpoint gives
  the same verdicts on any machine at temperature > 0 (a three-call probe says whether it does).
The API key is handled as `evalkit.endpoint` says: read from the environment, never written.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from evalkit.cache import Cache, cached, judge_key, seed_probe_key
from evalkit.config.judge import JudgeConfig
from evalkit.endpoint import Endpoint, EndpointAuthError, endpoint_identity
from evalkit.judge.verdicts import Verdict, VerdictError, parse_verdict, reask_messages, request_schema
from evalkit.types import stable_hash

SEED_POLICY = ("per request: sha256(messages, sample, attempt, model, temperature, "
               "max_tokens, response_format), first 8 hex digits masked to 31 bits")
PROBE = ({"role": "user", "content": "Write ten random words."},)


class JudgeClient:
    def __init__(self, cfg: JudgeConfig, cache: Cache | None = None, *,
                 log: Callable[[str], None] = print, sleep: Callable[[float], None] = time.sleep,
                 identity: Mapping[str, Any] | None = None):
        self.cfg, self.cache, self.log = cfg, cache, log
        self._lock, self._identity_lock = threading.Lock(), threading.Lock()
        self.endpoint = Endpoint(cfg.base_url, cfg, what="judge endpoint", sleep=sleep, count=self._count)
        self._openai, self._client = self.endpoint.openai, self.endpoint.client
        self._identity = dict(identity) if identity is not None else None
        self.stats = {"calls": 0, "cached": 0, "requests": 0, "retries": 0, "errors": 0, "probe_calls": 0}

    def _count(self, **add: int) -> None:
        with self._lock:
            for k, v in add.items():
                self.stats[k] += v

    def with_retries(self, fn: Callable[[], Any], *, retries: int | None = None) -> Any:
        return self.endpoint.with_retries(fn, retries=retries)

    def _describe_error(self, e: Exception) -> str:
        return self.endpoint.describe_error(e)

    # ---------------------------------------------------------- completions and verdicts

    def _create(self, messages: Sequence[Mapping[str, str]], seed: int, **extra: Any) -> str:
        kwargs: dict[str, Any] = {"model": self.cfg.model, "messages": [dict(m) for m in messages],
                                  "temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens,
                                  "seed": seed, **extra}
        response = self.with_retries(lambda: self._client.chat.completions.create(**kwargs))
        return (response.choices[0].message.content or "") if response.choices else ""

    def _request(self, messages: Sequence[Mapping[str, str]], sample: int, attempt: int) -> dict[str, Any]:
        return {**self.cfg.request_params(), "messages": [dict(m) for m in messages], "sample": sample,
                "attempt": attempt}

    def request_key(self, messages: Sequence[Mapping[str, str]], sample: int = 0, attempt: int = 0) -> str:
        return judge_key(self.identity, self._request(messages, sample, attempt))

    def complete(self, messages: Sequence[Mapping[str, str]], *, sample: int = 0, attempt: int = 0,
                 schema: Mapping[str, Any] | None = None) -> tuple[str, bool, str]:
        """One completion's text, whether it came from the cache, and its cache key (the caller
        stores it: `judge` keeps only valid verdicts). `sample` (the k-th judge sample) and
        `attempt` (the n-th re-ask) are in the key and the seed, so repeated identical requests
        are real new calls, each with its own seed."""
        request = self._request(messages, sample, attempt)
        key = judge_key(self.identity, request)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            self._count(cached=1)
            return hit["text"], True, key
        extra: dict[str, Any] = {}
        if self.cfg.response_format == "json_object":
            extra["response_format"] = {"type": "json_object"}
        elif self.cfg.response_format == "json_schema" and schema is not None:
            extra["response_format"] = {"type": "json_schema",
                                        "json_schema": {"name": "verdict", "schema": request_schema(schema)}}
        # the seed leaves out the URL and evalkit's version: the same on every machine
        text = self._create(messages, int(stable_hash(request)[:8], 16) & 0x7FFFFFFF, **extra)
        self._count(calls=1)
        return text, False, key

    def judge(self, messages: Sequence[Mapping[str, str]], schema: Mapping[str, Any], *, sample: int = 0) -> Verdict:
        """A validated verdict, re-asking after unparseable replies; invalid after the last try.
        Its completions (re-asks included) are cached once it is valid, and never when it stays
        invalid or the endpoint fails: a rerun asks exactly the invalid items again."""
        calls = cached = 0
        asked: Sequence[Mapping[str, str]] = list(messages)
        raw, error = "", ""
        fresh: dict[str, Any] = {}
        for attempt in range(self.cfg.invalid_retries + 1):
            try:
                raw, hit, key = self.complete(asked, sample=sample, attempt=attempt, schema=schema)
            except EndpointAuthError:
                raise
            except self._openai.OpenAIError as e:
                self._count(errors=1)
                return Verdict(None, raw, f"endpoint error: {self._describe_error(e)}", calls, cached)
            calls, cached = calls + (not hit), cached + hit
            if not hit:
                fresh[key] = {"text": raw}
            try:
                data = parse_verdict(raw, schema)
            except VerdictError as e:
                error = str(e)
                asked = reask_messages(messages, raw, error)
                continue
            if self.cache is not None:
                self.cache.put_many(fresh)  # committed now: an interrupted run keeps it
            return Verdict(data, raw, "", calls, cached)
        return Verdict(None, raw, f"unparseable verdict after {self.cfg.invalid_retries + 1} tries: {error}",
                       calls, cached)

    def judge_many(self, requests: Sequence[tuple[Sequence[Mapping[str, str]], Mapping[str, Any], int]],
                   *, on_done: Callable[[], None] | None = None) -> list[Verdict]:
        """(messages, schema, sample) requests -> verdicts in the same order, `concurrency` at a time."""
        results: list[Verdict | None] = [None] * len(requests)
        pool = ThreadPoolExecutor(max_workers=max(1, self.cfg.concurrency), thread_name_prefix="judge")
        try:
            futures = {pool.submit(self.judge, m, s, sample=k): i for i, (m, s, k) in enumerate(requests)}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                if on_done is not None:
                    on_done()
        finally:
            # on an error or Ctrl-C: drop what has not started; finished calls are already cached
            pool.shutdown(wait=True, cancel_futures=True)
        return results  # type: ignore[return-value]

    # ---------------------------------------------------------- endpoint identity and seeds

    @property
    def identity(self) -> dict[str, Any]:
        """The endpoint's identity (given, else one GET /models on first use): in every cache key.
        Raises ConfigError when the endpoint does not list the model."""
        with self._identity_lock:
            if self._identity is None:
                self._identity = endpoint_identity(self.cfg.base_url, self.endpoint.entry(self.cfg.model))
            return self._identity

    def probe_seeds(self) -> str:
        """Does the endpoint honour `seed` at this temperature? A short request with one seed twice,
        then with another: "honoured" (same, then different), "ignored" (the same seed differed),
        or "inconclusive" (nothing varied). Three calls, outside the verdict cache; the answer is
        cached per endpoint identity and temperature, so a rerun makes no call."""
        if self.cfg.temperature == 0:
            return "not needed at temperature 0"
        key = seed_probe_key(self.identity, self.cfg.temperature)
        try:  # a failed probe is not cached: a rerun asks again
            [(probe, _)] = cached(self.cache or Cache(None), [key], lambda _todo, deliver: deliver({0: self._ask_seeds()}),
                                  count=False, decode=lambda hit: str(hit["probe"]), encode=lambda probe: {"probe": probe})
        except EndpointAuthError:
            raise
        except self._openai.OpenAIError as e:
            return f"failed: {self._describe_error(e)}"
        return probe

    def _ask_seeds(self) -> str:
        """The probe's three calls, read: "honoured", "ignored" or "inconclusive"."""
        replies: list[str] = []
        for seed in (1, 1, 2):
            replies.append(self._create(PROBE, seed, max_tokens=16))
            self._count(probe_calls=1)
        a, b, c = replies
        return "ignored" if a != b else "honoured" if a != c else "inconclusive"


def preflight(cfg: JudgeConfig) -> dict[str, Any]:
    """Endpoint reachable, key present and accepted, model listed: else ConfigError (exit 4).
    Costs one GET /models, no completion. Returns the endpoint's identity (see `endpoint_identity`)."""
    client = JudgeClient(cfg, None, log=lambda _: None)  # raises if the key's variable is unset
    client.endpoint.check_reachable()
    return client.identity


__all__ = [
    "SEED_POLICY",
    "JudgeClient",
    "endpoint_identity",
    "preflight",
]

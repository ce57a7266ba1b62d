"""The judge endpoint: any OpenAI-compatible server, through the `openai` client.

The judge is treated as the noisy, failing, costly part it is:
- retries with exponential backoff (and Retry-After) on 429, 5xx, timeouts and connection errors,
  our own loop (the client's max_retries is 0) so every attempt is counted;
- bounded concurrency (a thread pool of `concurrency` workers);
- a verdict's completions are cached as soon as it is valid, keyed on the endpoint's identity
  (base URL plus what GET /models says it serves: id, root, parent, content fingerprint), the full
  messages and parameters, never the key: a rerun costs no calls, an interrupted run resumes, and
  other weights behind the same URL and name are asked afresh;
- an unparseable verdict is re-asked, then recorded as invalid and not cached: a rerun asks again;
- every request carries a seed derived from the request itself, so a seed-honouring endpoint gives
  the same verdicts on any machine at temperature > 0 (a three-call probe says whether it does).
The API key is read from the environment when the client is built, kept only inside the openai
client (never serialized), and redacted from any error text we surface.
"""
from __future__ import annotations

import contextlib
import difflib
import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from evalkit.cache import Cache, judge_key
from evalkit.errors import ConfigError, missing_extra
from evalkit.judge.verdicts import Verdict, VerdictError, parse_verdict, reask_messages, request_schema
from evalkit.shape import Shape, invalid
from evalkit.types import stable_hash

# what a GET /models entry says about the model it serves; `created` and vLLM's `permission`
# (a fresh random id per call) vary between calls, so they are not part of the identity
IDENTITY_FIELDS = ("id", "owned_by", "root", "parent", "fingerprint", "meta")
SEED_POLICY = ("per request: sha256(messages, sample, attempt, model, temperature, "
               "max_tokens, response_format), first 8 hex digits masked to 31 bits")
PROBE = ({"role": "user", "content": "Write ten random words."},)


class JudgeConfig(Shape):
    """The suite's `judge:` mapping: an OpenAI-compatible endpoint. Holds the NAME of the key's
    environment variable, never the key."""

    extra_keys: ClassVar[tuple[str, ...]] = ("api_key",)  # refused below with a message of its own

    base_url: str = Field(pattern=r"^https?://")
    model: str = Field(min_length=1)
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                    description="the environment variable holding the API key")
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(256, ge=1)
    timeout: float = Field(60.0, gt=0)
    concurrency: int = Field(4, ge=1, le=64)
    retries: int = Field(5, ge=0, le=20, description="transport retries per completion (429, 5xx, timeout, "
                                                     "connection)")
    invalid_retries: int = Field(2, ge=0, le=10, description="re-asks after an unparseable verdict")
    backoff: float = Field(1.0, ge=0, description="first backoff in seconds, doubled per retry (with jitter)")
    max_backoff: float = Field(30.0, ge=0)
    response_format: Literal["none", "json_object", "json_schema"] = Field(
        "none", description="also send OpenAI's response_format (json_object / json_schema)")

    @model_validator(mode="before")
    @classmethod
    def _no_key(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "api_key" in data:
            # checked first, and the message never echoes the value
            raise invalid("an API key must not be written in the suite", at=("api_key",),
                          hint="export it as an environment variable and name it: api_key_env: JUDGE_API_KEY")
        return data

    def describe(self) -> dict[str, Any]:
        """What the run record keeps about the judge (the variable's name, not its value)."""
        return self.model_dump()

    def request_params(self) -> dict[str, Any]:
        """Everything besides the messages that changes the reply: part of every cache key."""
        return {"model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens,
                "response_format": self.response_format}


class JudgeAuthError(ConfigError):
    """The endpoint refused the key: fatal, every further call would fail the same way."""


def endpoint_identity(base_url: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    """Who answers: the URL and the identifying fields of the model's GET /models entry. Without a
    `fingerprint` (a content hash, as `evalkit serve` lists) only URL and name are known."""
    return {"base_url": base_url.rstrip("/"),
            **{k: entry[k] for k in IDENTITY_FIELDS if entry.get(k) not in (None, "", [], {})}}


def _read_key(cfg: JudgeConfig) -> str | None:
    if not cfg.api_key_env:
        return None
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise ConfigError(f"environment variable {cfg.api_key_env} is not set (judge api_key_env for {cfg.base_url})",
                          hint=f"export {cfg.api_key_env}=... before running")
    return key


def _openai_module():
    try:
        import openai
    except ImportError:
        raise missing_extra("openai", "judge") from None
    return openai


class JudgeClient:
    def __init__(self, cfg: JudgeConfig, cache: Cache | None = None, *,
                 log: Callable[[str], None] = print, sleep: Callable[[float], None] = time.sleep,
                 identity: Mapping[str, Any] | None = None):
        self.cfg, self.cache, self.log, self._sleep = cfg, cache, log, sleep
        self._key = _read_key(cfg)
        openai = _openai_module()
        self._openai = openai
        # local servers (vLLM, llama.cpp, evalkit serve) often need no key, but the client wants one
        self._client = openai.OpenAI(base_url=cfg.base_url, api_key=self._key or "none",
                                     timeout=cfg.timeout, max_retries=0)
        self._lock, self._identity_lock = threading.Lock(), threading.Lock()
        self._identity = dict(identity) if identity is not None else None
        self.stats = {"calls": 0, "cached": 0, "requests": 0, "retries": 0, "errors": 0, "probe_calls": 0}

    def __getstate__(self):  # never pickled along with the key inside the openai client
        raise TypeError("JudgeClient holds a secret and cannot be serialized")

    def _count(self, **add: int) -> None:
        with self._lock:
            for k, v in add.items():
                self.stats[k] += v

    def redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    # ---------------------------------------------------------- one request, with retries

    def _describe_error(self, e: Exception) -> str:
        status = getattr(e, "status_code", None)
        head = f"HTTP {status}" if status else type(e).__name__
        return self.redact(f"{head}: {e}".splitlines()[0])[:300]

    def _delay(self, e: Exception, attempt: int) -> float:
        delay = min(self.cfg.max_backoff, self.cfg.backoff * 2 ** attempt) * (0.5 + random.random() / 2)
        response = getattr(e, "response", None)
        retry_after = response.headers.get("retry-after") if response is not None else None
        if retry_after:
            with contextlib.suppress(ValueError):  # an HTTP date: keep our own backoff
                delay = max(delay, float(retry_after))
        return min(delay, self.cfg.max_backoff)

    def with_retries(self, fn: Callable[[], Any], *, retries: int | None = None) -> Any:
        """Run one HTTP request, retrying what may pass on a second try; auth errors are fatal."""
        o = self._openai
        retries = self.cfg.retries if retries is None else retries
        for attempt in range(retries + 1):
            self._count(requests=1)
            try:
                return fn()
            except (o.AuthenticationError, o.PermissionDeniedError) as e:
                raise JudgeAuthError(f"judge endpoint {self.cfg.base_url} refused the API key "
                                     f"({self._describe_error(e)})",
                                     hint=f"check the key in ${self.cfg.api_key_env}" if self.cfg.api_key_env
                                     else "the endpoint needs a key: set judge.api_key_env") from None
            except (o.RateLimitError, o.InternalServerError, o.APITimeoutError, o.APIConnectionError) as e:
                last = e
            except o.APIStatusError as e:
                if e.status_code < 500 and e.status_code not in (408, 409):
                    raise
                last = e
            if attempt < retries:
                self._count(retries=1)
                self._sleep(self._delay(last, attempt))
        raise last

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
            except JudgeAuthError:
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
                entries = self.with_retries(lambda: self._client.models.list(), retries=min(self.cfg.retries, 2))
                listed = {m.id: m.model_dump() for m in entries}
                if self.cfg.model not in listed:
                    close = difflib.get_close_matches(self.cfg.model, listed, n=1)
                    raise ConfigError(f"model '{self.cfg.model}' is not listed by the judge endpoint "
                                      f"{self.cfg.base_url} (available: {', '.join(listed) or 'none'})",
                                      hint=f"did you mean '{close[0]}'?" if close else None)
                self._identity = endpoint_identity(self.cfg.base_url, listed[self.cfg.model])
            return self._identity

    def probe_seeds(self) -> str:
        """Does the endpoint honour `seed` at this temperature? A short request with one seed twice,
        then with another: "honoured" (same, then different), "ignored" (the same seed differed),
        or "inconclusive" (nothing varied). Three calls, outside the verdict cache; the answer is
        cached per endpoint identity and temperature, so a rerun makes no call."""
        if self.cfg.temperature == 0:
            return "not needed at temperature 0"
        key = Cache.key("judge-seed-probe", endpoint=self.identity, temperature=self.cfg.temperature)
        if self.cache is not None and (hit := self.cache.get(key, count=False)) is not None:
            return hit["probe"]
        replies: list[str] = []
        try:
            for seed in (1, 1, 2):
                replies.append(self._create(PROBE, seed, max_tokens=16))
                self._count(probe_calls=1)
        except JudgeAuthError:
            raise
        except self._openai.OpenAIError as e:
            return f"failed: {self._describe_error(e)}"
        a, b, c = replies
        probe = "ignored" if a != b else "honoured" if a != c else "inconclusive"
        if self.cache is not None:
            self.cache.put(key, {"probe": probe})
        return probe


def preflight(cfg: JudgeConfig) -> dict[str, Any]:
    """Endpoint reachable, key present and accepted, model listed: else ConfigError (exit 4).
    Costs one GET /models, no completion. Returns the endpoint's identity (see `endpoint_identity`)."""
    client = JudgeClient(cfg, None, log=lambda _: None)  # raises if the key's variable is unset
    o = client._openai
    try:
        return client.identity
    except JudgeAuthError:
        raise
    except (o.APIConnectionError, o.APITimeoutError) as e:
        raise ConfigError(f"judge endpoint unreachable at {cfg.base_url} ({client._describe_error(e)})",
                          hint="is the server running? (`evalkit serve ...` for a local judge)") from None
    except o.NotFoundError:
        raise ConfigError(f"judge endpoint {cfg.base_url} has no /models route",
                          hint="base_url usually ends in /v1, e.g. http://127.0.0.1:8000/v1") from None
    except o.OpenAIError as e:
        raise ConfigError(f"judge endpoint {cfg.base_url} failed the preflight check "
                          f"({client._describe_error(e)})") from None


__all__ = [
    "SEED_POLICY",
    "JudgeAuthError",
    "JudgeClient",
    "JudgeConfig",
    "endpoint_identity",
    "preflight",
]

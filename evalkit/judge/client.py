"""The judge endpoint: any OpenAI-compatible server, through the `openai` client.

The judge is treated as the noisy, failing, costly part it is:
- retries with exponential backoff (and Retry-After) on 429, 5xx, timeouts and connection errors,
  our own loop (the client's max_retries is 0) so every attempt is counted;
- bounded concurrency (a thread pool of `concurrency` workers);
- every finished completion is cached at once (keyed by model, full messages and parameters,
  never the key or the URL), so a rerun costs no calls and an interrupted run resumes;
- an unparseable verdict is re-asked, then recorded as invalid.
The API key is read from the environment when the client is built, kept only inside the openai
client (never serialized), and redacted from any error text we surface.
"""
from __future__ import annotations

import difflib
import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from typing import Any

from evalkit.cache import Cache
from evalkit.errors import ConfigError, missing_extra
from evalkit.judge.verdicts import Verdict, VerdictError, parse_verdict, reask_messages

RESPONSE_FORMATS = ("none", "json_object", "json_schema")


@dataclass(frozen=True)
class JudgeConfig:
    """The suite's `judge:` mapping. Holds the NAME of the key's environment variable, never the key."""

    base_url: str
    model: str
    api_key_env: str | None = None
    temperature: float = 0.0
    max_tokens: int = 256
    timeout: float = 60.0
    concurrency: int = 4
    retries: int = 5  # transport retries per completion (429, 5xx, timeout, connection)
    invalid_retries: int = 2  # re-asks after an unparseable verdict
    backoff: float = 1.0  # first backoff in seconds, doubled per retry (with jitter)
    max_backoff: float = 30.0
    response_format: str = "none"  # also send OpenAI's response_format (json_object / json_schema)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> JudgeConfig:
        if "api_key" in params:
            # checked first so the message can never echo the value
            raise ConfigError("an API key must not be written in the suite",
                              path="judge.api_key",
                              hint="export it as an environment variable and name it: api_key_env: JUDGE_API_KEY")
        unknown = set(params) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown judge key(s): {', '.join(sorted(unknown))}", path="judge")
        return cls(**dict(params))

    def describe(self) -> dict[str, Any]:
        """What the run record keeps about the judge (the variable's name, not its value)."""
        return asdict(self)

    def request_params(self) -> dict[str, Any]:
        """Everything besides the messages that changes the reply: part of every cache key."""
        return {"model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens,
                "response_format": self.response_format}


class JudgeAuthError(ConfigError):
    """The endpoint refused the key: fatal, every further call would fail the same way."""


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
                 log: Callable[[str], None] = print, sleep: Callable[[float], None] = time.sleep):
        self.cfg, self.cache, self.log, self._sleep = cfg, cache, log, sleep
        self._key = _read_key(cfg)
        openai = _openai_module()
        self._openai = openai
        # local servers (vLLM, llama.cpp, evalkit serve) often need no key, but the client wants one
        self._client = openai.OpenAI(base_url=cfg.base_url, api_key=self._key or "none",
                                     timeout=cfg.timeout, max_retries=0)
        self._lock = threading.Lock()
        self.stats = {"calls": 0, "cached": 0, "requests": 0, "retries": 0, "errors": 0}

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
            try:
                delay = max(delay, float(retry_after))
            except ValueError:  # an HTTP date: keep our own backoff
                pass
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

    def complete(self, messages: Sequence[Mapping[str, str]], *, sample: int = 0, attempt: int = 0,
                 schema: Mapping[str, Any] | None = None) -> tuple[str, bool]:
        """One completion's text, from the cache when this exact request was answered before.
        `sample` (the k-th judge sample) and `attempt` (the n-th re-ask) are in the key so that
        repeated identical requests are real new calls, each cached on its own."""
        key = Cache.key("judge", **self.cfg.request_params(), messages=[dict(m) for m in messages],
                        sample=sample, attempt=attempt)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            self._count(cached=1)
            return hit["text"], True
        kwargs: dict[str, Any] = {"model": self.cfg.model, "messages": [dict(m) for m in messages],
                                  "temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens}
        if self.cfg.response_format == "json_object":
            kwargs["response_format"] = {"type": "json_object"}
        elif self.cfg.response_format == "json_schema" and schema is not None:
            kwargs["response_format"] = {"type": "json_schema",
                                         "json_schema": {"name": "verdict", "schema": dict(schema)}}
        response = self.with_retries(lambda: self._client.chat.completions.create(**kwargs))
        text = (response.choices[0].message.content or "") if response.choices else ""
        self._count(calls=1)
        if self.cache is not None:
            self.cache.put(key, {"text": text})  # committed now: an interrupted run keeps it
        return text, False

    def judge(self, messages: Sequence[Mapping[str, str]], schema: Mapping[str, Any], *, sample: int = 0) -> Verdict:
        """A validated verdict, re-asking after unparseable replies; invalid after the last try.
        Endpoint failures that outlast the retries give an invalid verdict that is not cached."""
        calls = cached = 0
        asked, raw, error = list(messages), "", ""
        for attempt in range(self.cfg.invalid_retries + 1):
            try:
                raw, hit = self.complete(asked, sample=sample, attempt=attempt, schema=schema)
            except JudgeAuthError:
                raise
            except self._openai.OpenAIError as e:
                self._count(errors=1)
                return Verdict(None, raw, f"endpoint error: {self._describe_error(e)}", calls, cached)
            calls, cached = calls + (not hit), cached + hit
            try:
                return Verdict(parse_verdict(raw, schema), raw, "", calls, cached)
            except VerdictError as e:
                error = str(e)
                asked = reask_messages(messages, raw, error)
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

    # ---------------------------------------------------------- preflight

    def list_models(self) -> list[str]:
        return [m.id for m in self.with_retries(lambda: self._client.models.list(), retries=min(self.cfg.retries, 2))]


def preflight(cfg: JudgeConfig) -> list[str]:
    """Endpoint reachable, key present and accepted, model listed: else ConfigError (exit 4).
    Costs one GET /models, no completion. Returns the models the endpoint lists."""
    client = JudgeClient(cfg, None, log=lambda _: None)  # raises if the key's variable is unset
    o = client._openai
    try:
        models = client.list_models()
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
    if cfg.model not in models:
        close = difflib.get_close_matches(cfg.model, models, n=1)
        raise ConfigError(f"model '{cfg.model}' is not listed by the judge endpoint {cfg.base_url} "
                          f"(available: {', '.join(models) or 'none'})",
                          hint=f"did you mean '{close[0]}'?" if close else None)
    return models


__all__ = ["JudgeConfig", "JudgeClient", "JudgeAuthError", "preflight", "RESPONSE_FORMATS"]

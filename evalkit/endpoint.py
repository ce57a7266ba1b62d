"""An OpenAI-compatible endpoint, as the judge and the remote backends reach it.

The transport is treated as the failing part it is: our own retry loop (the openai client's
max_retries is 0, so every attempt is counted) with exponential backoff and Retry-After on 429,
5xx, timeouts, dropped connections and garbled bodies; a refused key is fatal at once. The API key is read from
the environment variable the config names, kept only inside the openai client (never
serialized), and redacted from any error text surfaced.
"""
from __future__ import annotations

import contextlib
import difflib
import json
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from evalkit.config.endpoint import EndpointSettings
from evalkit.errors import ConfigError, missing_extra

# what a GET /models entry says about the model it serves; `created` and vLLM's `permission`
# (a fresh random id per call) vary between calls, so they are not part of the identity
IDENTITY_FIELDS = ("id", "owned_by", "root", "parent", "fingerprint", "meta")


class EndpointAuthError(ConfigError):
    """The endpoint refused the key: fatal, every further call would fail the same way."""


def openai_module(extra: str = "judge") -> Any:
    try:
        import openai
    except ImportError:
        raise missing_extra("openai", extra) from None
    return openai


def endpoint_identity(base_url: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    """Who answers: the URL and the identifying fields of the model's GET /models entry. Without a
    `fingerprint` (a content hash, as `evalkit serve` lists) only URL and name are known."""
    return {"base_url": base_url.rstrip("/"), **served_identity(entry)}


def served_identity(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The identifying fields of a GET /models entry (no URL)."""
    return {k: entry[k] for k in IDENTITY_FIELDS if entry.get(k) not in (None, "", [], {})}


class Endpoint:
    """One base URL: an openai client, the retry loop, the model listing, redaction."""

    def __init__(self, base_url: str, settings: EndpointSettings, *, what: str = "endpoint",
                 sleep: Callable[[float], None] = time.sleep, count: Callable[..., None] | None = None):
        self.base_url, self.settings, self.what, self._sleep = base_url.rstrip("/"), settings, what, sleep
        self._count = count or (lambda **_: None)
        self._key = self._read_key()
        self.openai = openai_module()
        # local servers (vLLM, llama.cpp, evalkit serve) often need no key, but the client wants one
        self.client = self.openai.OpenAI(base_url=self.base_url, api_key=self._key or "none",
                                         timeout=settings.timeout, max_retries=0)
        self._models: dict[str, dict[str, Any]] | None = None
        self._lock = threading.Lock()

    def __getstate__(self):  # never pickled along with the key inside the openai client
        raise TypeError(f"{type(self).__name__} holds a secret and cannot be serialized")

    def _read_key(self) -> str | None:
        env = self.settings.api_key_env
        if not env:
            return None
        key = os.environ.get(env)
        if not key:
            raise ConfigError(f"environment variable {env} is not set (api_key_env for {self.what} {self.base_url})",
                              hint=f"export {env}=... before running")
        return key

    def redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def describe_error(self, e: BaseException) -> str:
        status = getattr(e, "status_code", None)
        head = f"HTTP {status}" if status else type(e).__name__
        return self.redact(f"{head}: {e}".splitlines()[0])[:300]

    def _delay(self, e: Exception, attempt: int) -> float:
        s = self.settings
        delay = min(s.max_backoff, s.backoff * 2 ** attempt) * (0.5 + random.random() / 2)
        response = getattr(e, "response", None)
        retry_after = response.headers.get("retry-after") if response is not None else None
        if retry_after:
            with contextlib.suppress(ValueError):  # an HTTP date: keep our own backoff
                delay = max(delay, float(retry_after))
        return min(delay, s.max_backoff)

    def with_retries(self, fn: Callable[[], Any], *, retries: int | None = None) -> Any:
        """Run one HTTP request, retrying what may pass on a second try; auth errors are fatal."""
        o = self.openai
        retries = self.settings.retries if retries is None else retries
        for attempt in range(retries + 1):
            self._count(requests=1)
            try:
                return fn()
            except (o.AuthenticationError, o.PermissionDeniedError) as e:
                env = self.settings.api_key_env
                raise EndpointAuthError(f"{self.what} {self.base_url} refused the API key ({self.describe_error(e)})",
                                        hint=f"check the key in ${env}" if env
                                        else "the endpoint needs a key: set api_key_env") from None
            except (o.RateLimitError, o.InternalServerError, o.APITimeoutError, o.APIConnectionError,
                    o.APIResponseValidationError, json.JSONDecodeError) as e:  # the last two: a garbled body
                last = e
            except o.APIStatusError as e:
                if e.status_code < 500 and e.status_code not in (408, 409):
                    raise
                last = e
            if attempt < retries:
                self._count(retries=1)
                self._sleep(self._delay(last, attempt))
        raise last

    def models(self) -> dict[str, dict[str, Any]]:
        """GET /models once: model id -> its entry."""
        with self._lock:
            if self._models is None:
                entries = self.with_retries(lambda: self.client.models.list(), retries=min(self.settings.retries, 2))
                self._models = {m.id: m.model_dump() for m in entries}
            return self._models

    def entry(self, model: str) -> dict[str, Any]:
        """The GET /models entry of `model`; ConfigError when the endpoint does not list it."""
        listed = self.models()
        if model not in listed:
            close = difflib.get_close_matches(model, listed, n=1)
            raise ConfigError(f"model '{model}' is not listed by the {self.what} {self.base_url} "
                              f"(available: {', '.join(listed) or 'none'})",
                              hint=f"did you mean '{close[0]}'?" if close else None)
        return listed[model]

    def server_version(self) -> str | None:
        """GET /version beside /v1 (vLLM and evalkit serve answer it); None when there is none."""
        import urllib.error
        import urllib.request

        request = urllib.request.Request(f"{self.base_url.removesuffix('/v1')}/version",
                                         headers={"Authorization": f"Bearer {self._key}"} if self._key else {})
        try:
            with urllib.request.urlopen(request, timeout=min(self.settings.timeout, 10.0)) as answer:
                version = json.loads(answer.read()).get("version")
        except (OSError, ValueError, AttributeError):  # urllib's errors are OSErrors
            return None
        return str(version) if version is not None else None

    def check_reachable(self) -> None:
        """The endpoint answers GET /models with this key: else a ConfigError saying what failed."""
        o = self.openai
        try:
            self.models()
        except EndpointAuthError:
            raise
        except (o.APIConnectionError, o.APITimeoutError) as e:
            raise ConfigError(f"{self.what} unreachable at {self.base_url} ({self.describe_error(e)})",
                              hint="is the server running? (`evalkit serve ...` serves a local model)") from None
        except o.NotFoundError:
            raise ConfigError(f"{self.what} {self.base_url} has no /models route",
                              hint="base_url usually ends in /v1, e.g. http://127.0.0.1:8000/v1") from None
        except o.OpenAIError as e:
            raise ConfigError(f"{self.what} {self.base_url} failed the preflight check "
                              f"({self.describe_error(e)})") from None

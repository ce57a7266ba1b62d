"""The OpenAI API as `evalkit serve` speaks it: typed requests, response and stream-chunk bodies.

Requests are strict shapes, by the OpenAI spec: every documented parameter is accepted at its
default (or null, which means the default); a wrong type or value is a 400 naming the parameter, a
parameter the server cannot honour is a 400 saying why when it asks for more than its default,
and an unknown one is a 400 with a suggestion. Nothing is silently ignored except the few fields
that never change an answer (`user`, `metadata`, ...).
"""
from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, ValidationError, model_validator

from evalkit.backends.decoder import TokenLogprob
from evalkit.backends.sampling import Sampling
from evalkit.errors import did_you_mean, fmt_path
from evalkit.shape import Shape, error_parts, invalid


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server."""

    max_body_bytes: int = 1 << 20
    body_timeout_s: float = 10.0  # a body shorter than its Content-Length is a 400 after this
    request_timeout_s: float = 600.0
    max_tokens_cap: int = 2048
    max_queue: int = 1024  # sequences waiting in the engine; more is a 503


class ApiError(Exception):
    """An error answered as OpenAI's JSON error body with an HTTP status."""

    def __init__(self, status: int, message: str, *, type_: str | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        type_ = type_ or ("invalid_request_error" if status < 500 else "server_error")
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass(frozen=True)
class Unsupported:
    """An OpenAI parameter this server cannot honour. At its documented default (or null, or left
    out) it asks for nothing, so it is accepted; any other value is a 400 saying why."""

    why: str
    defaults: tuple[Any, ...] = ()
    instead: str = ""

    def check(self, key: str, value: Any) -> None:
        if value is None or any(_same(value, d) for d in self.defaults):
            return
        accepted = " or ".join(["null", *(json.dumps(d) for d in self.defaults)])
        raise invalid(f"{self.why}, so evalkit serve accepts only {accepted} (got {brief(value)})"
                      + (f"; {self.instead}" if self.instead else ""), at=(key,))


def _same(value: Any, default: Any) -> bool:
    """Equal and of the same JSON type: `true` is not the default 1, nor `1.0`."""
    return type(value) is type(default) and value == default


def brief(value: Any, limit: int = 40) -> str:
    """A value as JSON for a message, cut at `limit` characters."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


_TOOLS = "tool calling is not supported"
_FUNCTIONS = "function calling is not supported"
# The OpenAI parameters that change what a model would answer but that this server cannot honour.
UNSUPPORTED = {
    "best_of": Unsupported("choosing the best of several candidates is not supported", (1,), "ask for n choices instead"),
    "suffix": Unsupported("inserting text before a suffix is not supported", ("",)),
    "tools": Unsupported(_TOOLS, ([],)), "tool_choice": Unsupported(_TOOLS, ("none", "auto")),
    "functions": Unsupported(_FUNCTIONS, ([],)), "function_call": Unsupported(_FUNCTIONS, ("none", "auto")),
    "audio": Unsupported("audio output is not supported"),
    "modalities": Unsupported("only text output is supported", (["text"],)),
    "prediction": Unsupported("predicted outputs are not supported"),
    "moderation": Unsupported("moderation is not supported"),
    "web_search_options": Unsupported("web search is not supported"),
    "reasoning_effort": Unsupported("the served models do not reason", ("none",)),
    "verbosity": Unsupported("setting the verbosity of an answer is not supported", ("medium",)),
}
# The OpenAI parameters that never change an answer (billing, storage, caching, abuse tracking):
# accepted with any value and ignored.
IGNORED = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier", "prompt_cache_key",
           "prompt_cache_retention", "prompt_cache_options")


class _Request(Shape):
    """Closed like every shape: an unknown key is a 400 with a suggestion. `null` for a parameter
    that has a default means the default (as in OpenAI's API); the keys in `unsupported` are
    checked and the `ignored` ones accepted, and both are dropped before validation (the model has
    no field for them)."""

    unsupported: ClassVar[Mapping[str, Unsupported]] = {}
    ignored: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        cls._first_check(data)
        fields = {f.alias or n: f for n, f in cls.model_fields.items()}
        kept = {}
        for key, value in data.items():
            if key in fields:
                if value is not None or fields[key].is_required():
                    kept[key] = value
            elif key in cls.unsupported:
                cls.unsupported[key].check(key, value)
            elif key not in cls.ignored:
                raise invalid(f"unsupported parameter '{key}'{did_you_mean(str(key), fields)}", at=(key,))
        return kept

    @classmethod
    def _first_check(cls, data: Mapping[str, Any]) -> None:
        """A check that says more than "unknown key" would (subclasses)."""


class StreamOptions(_Request):
    ignored: ClassVar[tuple[str, ...]] = ("include_obfuscation",)  # padding against length side channels

    include_usage: bool = False
    continuous_usage_stats: bool = False


_TOKEN_ID = re.compile(r"-?[0-9]{1,30}")  # ASCII digits: str.isdigit() also takes "²", which int() refuses


class _Sampling(_Request):
    """What both endpoints share. temperature defaults to 0 (greedy), unlike OpenAI's 1: an
    evaluation server answers the same question the same way unless asked to sample. The keys
    that never change an answer (`user`, ...) are accepted and ignored."""

    unsupported: ClassVar[Mapping[str, Unsupported]] = UNSUPPORTED
    ignored: ClassVar[tuple[str, ...]] = IGNORED

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[Annotated[str, Field(min_length=1)]] | None = Field(None, max_length=16)
    stream: bool = False
    stream_options: StreamOptions | None = None

    def sampling(self, seed_offset: int = 0) -> Sampling:
        return Sampling(temperature=self.temperature, top_p=self.top_p, top_k=max(self.top_k, 0), min_p=self.min_p,
                        repetition_penalty=self.repetition_penalty, frequency_penalty=self.frequency_penalty,
                        presence_penalty=self.presence_penalty, logit_bias=self._bias(),
                        seed=None if self.seed is None else self.seed + seed_offset)

    def _bias(self) -> tuple[tuple[int, float], ...]:
        out = []
        for key, value in (self.logit_bias or {}).items():
            if not _TOKEN_ID.fullmatch(key):
                raise ApiError(400, f"logit_bias: keys are token ids, got {brief(key)}", param="logit_bias")
            out.append((int(key), value))
        return tuple(out)

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]  # an empty one is refused by the app, by its index
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)

    @property
    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # one string or one token list
        return list(p)  # type: ignore[arg-type]


class TextPart(_Request):
    ignored: ClassVar[tuple[str, ...]] = ("prompt_cache_breakpoint",)

    type: Literal["text"]
    text: str

    @classmethod
    def _first_check(cls, data: Mapping[str, Any]) -> None:
        if data.get("type") != "text":
            raise invalid(f"only text content parts are supported, got {data.get('type')!r}", at=("type",))


class Message(_Request):
    # what an assistant message of an earlier reply carries, null when it is plain text
    unsupported: ClassVar[Mapping[str, Unsupported]] = {
        "tool_calls": Unsupported(_TOOLS, ([],)), "function_call": Unsupported(_FUNCTIONS),
        "audio": Unsupported("audio is not supported"), "refusal": Unsupported("refusal messages are not supported")}

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @classmethod
    def _first_check(cls, data: Mapping[str, Any]) -> None:
        if data.get("role") in ("tool", "function"):
            raise invalid(f"{data['role']} messages are not supported: evalkit serve does not call {data['role']}s",
                          at=("role",))

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class JsonSchema(_Request):
    name: str = "response"
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise invalid("json_schema is required when type is json_schema", at=("json_schema",))
        return self


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse(shape: type[_Request], data: Any) -> Any:
    """`data` as `shape`, or a 400 naming the first wrong parameter."""
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return shape.model_validate(data)
    except ValidationError as e:
        path, message, hint = error_parts(e, data)
        where = fmt_path(path)
        text = f"{where}: {message}" if where else message
        raise ApiError(400, text + (f" ({hint})" if hint else ""), param=where or None) from None


# ---------------------------------------------------------------- responses

def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(kind: str, model: str) -> dict[str, Any]:
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model}


def token_text(tokenizer: Any, token: int) -> str:
    return tokenizer.decode([token])


def completion_logprobs(tokenizer: Any, entries: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """The legacy completions `logprobs` object. A prompt's first token has no logprob (null, as
    its top_logprobs); top_logprobs holds the alternatives and the chosen token, as vLLM's do."""
    tokens: list[str] = []
    lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for e in entries:
        text = token_text(tokenizer, e.token)
        tokens.append(text)
        lps.append(e.logprob)
        offsets.append(offset)
        offset += len(text)
        if e.logprob is None:
            tops.append(None)
            continue
        top = {token_text(tokenizer, t): lp for t, lp in e.top}
        top.setdefault(text, e.logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer: Any, entries: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """The chat `logprobs.content` items of generated tokens."""
    def item(token: int, lp: float | None) -> dict[str, Any]:
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return [item(e.token, e.logprob) | {"top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]

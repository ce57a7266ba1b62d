"""Property-based fuzzing of `evalkit serve`'s request bodies, on a real server on the tiny model.

Random requests to every route (the generation routes, /v1/models, the tokenizer routes, unknown
routes, wrong methods): bodies built from the OpenAI spec's own parameter names (openai_spec) with
values of random types (plausible ones, and nulls, huge and non-finite numbers, unicode, lone
surrogates, nesting), raw bodies that are not JSON (random bytes, deep nesting, 5000-digit numbers,
truncated JSON), and random content types. The invariant: a 2xx with a JSON (or event-stream) body,
or a 4xx with OpenAI's JSON error body (or Starlette's redirect of a trailing slash); never a 5xx,
an error event in a stream, a broken connection or a hang.

Bounded and seeded: FUZZ_EXAMPLES examples (default 150: 3 to 6 s on 2 cores once the shared server
is up; 2000 take 35 to 60 s), FUZZ_SEED replays a run (both printed at the start). FUZZ_COLLECT=FILE
records every failure as a JSON line and goes on. The fuzz server caps max_tokens at 8 (a request's
default is capped too), which keeps generation cheap.
"""
from __future__ import annotations

import http.client
import json
import os
import urllib.parse
from dataclasses import dataclass
from typing import Any

import openai_spec
import pytest
from fuzz_strategies import FUZZ_SEED, announce, fuzz_examples, fuzz_settings
from hypothesis import given, seed
from hypothesis import strategies as st

pytestmark = pytest.mark.fuzz

EXAMPLES = 150
COLLECT = os.environ.get("FUZZ_COLLECT")
TIMEOUT_S = 30  # no request on the tiny model takes a second; 30 s without an answer is a hang
MAX_TOKENS_CAP = 8


@pytest.fixture(scope="module")
def fuzz_server(tiny_server):
    """A second server on the shared engine, with small limits: max_tokens <= 8, 256 KiB bodies."""
    from evalkit.serve.protocol import Limits
    from evalkit.serve.server import make_server

    srv = make_server(engine=tiny_server.engine, port=0, log=lambda _: None,
                      limits=Limits(max_tokens_cap=MAX_TOKENS_CAP, max_body_bytes=256 << 10, body_timeout_s=2))
    srv.start()
    yield srv
    srv.close()


@pytest.fixture(scope="module", autouse=True)
def _announce(request: pytest.FixtureRequest) -> None:
    announce(request, __file__, fuzz_examples(EXAMPLES))


# ---------------------------------------------------------------- values

ODD_STRINGS = ["", " ", "\x00", "\ud800", "\udfff", "\ufeff", "\u2028", "😀", "名前", "Ünïcödé", "a" * 3000,
               "<|im_end|>", "<|im_start|>", "<|endoftext|>", "\n\n", "null", "base", "lora", "-1", "1e999", "NaN",
               "{}", "[]", "%s", "{x}", "{{ x }}", "\\u0000", "../../etc/passwd"]
HUGE = [2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, 10**400, -(10**400)]
FLOATS = [0.0, -0.0, 1e-300, 5e-324, 1e300, float("inf"), float("-inf"), float("nan"), 0.5, 2.0000001, 1.0, -1.0]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.integers(), st.sampled_from(HUGE),
                    st.floats(), st.sampled_from(FLOATS), st.text(max_size=12), st.sampled_from(ODD_STRINGS))
ALL_KEYS = sorted(openai_spec.params("completions") | openai_spec.params("chat")
                  | {"top_k", "min_p", "repetition_penalty", "role", "content", "text", "type", "schema", "json_schema"})
json_values = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                     st.dictionaries(st.one_of(st.sampled_from(ALL_KEYS), st.text(max_size=8)),
                                                     inner, max_size=4)),
    max_leaves=10)

VOCAB = 49152  # the tiny model's (the embedded tokenizer's); ids around it and far outside
token_ids = st.one_of(st.integers(0, VOCAB - 1), st.sampled_from([-1, VOCAB - 1, VOCAB, 10**9, 2**63]), st.booleans())
texts = st.one_of(st.text(max_size=30), st.sampled_from(ODD_STRINGS))
SCHEMAS = [{"type": "object"}, {"type": "string", "maxLength": 5}, {"type": "nonsense"}, {"enum": []}, {},
           {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False},
           {"$ref": "#/nope"}, {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}, {"not": {}},
           {"anyOf": [{"type": "null"}, {"type": "number", "minimum": 3, "maximum": 1}]}, {"pattern": "("}]


@st.composite
def parts(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["text", "text", "image_url", "refusal", None]))
    part: dict[str, Any] = {"type": kind} if kind is not None else {}
    if draw(st.booleans()):
        part["text"] = draw(st.one_of(texts, json_values))
    if draw(st.integers(0, 4)) == 0:
        part[draw(st.sampled_from(["image_url", "prompt_cache_breakpoint", "extra"]))] = draw(json_values)
    return part


@st.composite
def message(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 15)) == 0:
        return draw(json_values)
    msg: dict[str, Any] = {"role": draw(st.sampled_from(["user", "user", "system", "developer", "assistant", "tool",
                                                         "function", "robot", "", None]))}
    if draw(st.integers(0, 9)):
        msg["content"] = draw(st.one_of(texts, texts, st.lists(parts(), max_size=3), st.none(), json_values))
    for key in draw(st.lists(st.sampled_from(["name", "refusal", "tool_calls", "function_call", "audio",
                                              "tool_call_id", "weight"]), max_size=2, unique=True)):
        msg[key] = draw(st.one_of(st.none(), st.just([]), json_values))
    return msg


# plausible values per key: near the valid range, its edges and just outside
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from(["base", "lora", "other", "dora", "nope", "", "BASE", "base "]),
    "prompt": st.one_of(texts, st.lists(texts, max_size=3), st.lists(token_ids, max_size=6),
                        st.lists(st.lists(token_ids, max_size=4), max_size=3)),
    "messages": st.lists(message(), max_size=4),
    "max_tokens": st.integers(-2, 12), "max_completion_tokens": st.integers(-2, 12),
    "temperature": st.one_of(st.floats(0, 2), st.sampled_from(FLOATS)), "top_p": st.floats(0, 1),
    "min_p": st.floats(0, 1), "top_k": st.one_of(st.integers(-2, 60), st.sampled_from([VOCAB, 10**12])),
    "repetition_penalty": st.floats(0, 11), "frequency_penalty": st.floats(-3, 3), "presence_penalty": st.floats(-3, 3),
    "n": st.integers(-1, 17), "best_of": st.integers(-1, 3),
    "logprobs": st.one_of(st.booleans(), st.integers(-1, 21)), "top_logprobs": st.integers(-1, 21),
    "echo": st.booleans(), "stream": st.booleans(),
    "stream_options": st.one_of(st.fixed_dictionaries({}, optional={
        "include_usage": st.one_of(st.booleans(), json_values), "include_obfuscation": st.booleans(),
        "continuous_usage_stats": st.booleans()}), json_values),
    "logit_bias": st.dictionaries(st.one_of(token_ids.map(str), st.text(max_size=4), st.just("99999999999999999999")),
                                  st.one_of(st.floats(-101, 101), json_values), max_size=3),
    "stop": st.one_of(texts, st.lists(texts, max_size=5)),
    "seed": st.one_of(st.integers(), st.sampled_from(HUGE)),
    "response_format": st.one_of(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema", "xml"])}, optional={
            "json_schema": st.one_of(st.fixed_dictionaries({"schema": st.one_of(st.sampled_from(SCHEMAS), json_values)},
                                                           optional={"name": texts, "strict": st.booleans()}),
                                     json_values)}),
        json_values),
    "suffix": st.one_of(st.just(""), texts), "tool_choice": st.sampled_from(["none", "auto", "required"]),
    "modalities": st.sampled_from([["text"], ["text", "audio"], []]), "reasoning_effort": st.sampled_from(
        ["none", "low", "high"]), "verbosity": st.sampled_from(["low", "medium", "high"]),
}


# valid but extreme values: what passes validation and must still not break generation
EDGES: dict[str, list[Any]] = {
    "temperature": [1e-300, 5e-324, 1e-6, 2.0], "top_p": [1e-300, 1e-9], "min_p": [1.0, 0.999],
    "top_k": [1, VOCAB, 10**12, -1], "repetition_penalty": [1e-300, 1e-9, 10.0], "frequency_penalty": [-2.0, 2.0],
    "presence_penalty": [-2.0, 2.0], "seed": [2**64 - 1, -(2**63), 0], "n": [16],
    "logit_bias": [{"-1": 5}, {str(VOCAB): 1}, {"99999999999999999999": -1}, {"0": 100, "1": -100}, {"²": 1}, {"٣": 1}],
    "stop": [["\n"] * 16, "a" * 3000, "\ufffd", " "], "logprobs": [20, 0, True], "top_logprobs": [20],
    "max_tokens": [0, MAX_TOKENS_CAP], "max_completion_tokens": [1, MAX_TOKENS_CAP],
    "response_format": [{"type": "json_schema", "json_schema": {"schema": s}} for s in SCHEMAS],
}


# the required keys of a tame body: well formed, so that the other keys' values reach generation
TAME: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from(["base", "lora", "dora"]),
    "prompt": st.one_of(texts, st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6),
                        st.lists(texts, min_size=1, max_size=3)),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                                "content": st.one_of(texts, st.lists(parts(), max_size=2))}),
                         min_size=1, max_size=3),
}


def value_for(key: str, wild: bool) -> st.SearchStrategy[Any]:
    """A plausible value for `key` (its valid range, edges and just outside), or in a wild body
    sometimes a random JSON value."""
    plausible = PLAUSIBLE.get(key)
    if plausible is None:
        return json_values
    if wild:
        return st.one_of(plausible, plausible, json_values)
    return st.one_of(plausible, st.sampled_from(EDGES[key])) if key in EDGES else plausible


@st.composite
def generation_body(draw: st.DrawFn, endpoint: str) -> dict[str, Any]:
    """A body for /v1/completions or /v1/chat/completions: spec keys with values. Half the bodies
    are tame (the required keys, plausible values: they reach generation), half wild (a required
    key may be missing, values of any type, an unknown or misspelt key). max_tokens is small
    unless drawn."""
    wild = draw(st.booleans())
    spec = sorted(openai_spec.params(endpoint) | {"top_k", "min_p", "repetition_penalty"})
    required = ["model", "prompt"] if endpoint == "completions" else ["model", "messages"]
    body: dict[str, Any] = {}
    for key in required:
        if not wild or draw(st.integers(0, 12)):
            body[key] = draw(value_for(key, wild) if wild else TAME[key])
    keys = st.one_of(st.sampled_from(spec), st.sampled_from([k for k in spec if k in EDGES]))  # generation's, twice as often
    for key in draw(st.lists(keys, max_size=6 if wild else 3, unique=True)):
        body[key] = draw(value_for(key, wild))
    if wild and draw(st.integers(0, 6)) == 0:
        body[draw(st.one_of(st.text(max_size=10), st.sampled_from(["max_token", "temprature", "stream_option", "Model"])))] = \
            draw(json_values)
    if "max_tokens" not in body and "max_completion_tokens" not in body and draw(st.integers(0, 4)):
        body["max_tokens"] = draw(st.integers(0, MAX_TOKENS_CAP))
    return body


@st.composite
def tokenizer_body(draw: st.DrawFn, route: str) -> Any:
    if route == "/tokenize":
        body = draw(st.fixed_dictionaries({}, optional={"prompt": st.one_of(texts, json_values),
                                                        "add_special_tokens": st.one_of(st.booleans(), json_values)}))
    else:
        body = draw(st.fixed_dictionaries({}, optional={"tokens": st.one_of(st.lists(token_ids, max_size=8),
                                                                            json_values)}))
    return body if draw(st.integers(0, 8)) else draw(json_values)


# ---------------------------------------------------------------- requests

@dataclass
class Request:
    method: str
    path: str
    body: bytes | None
    content_type: str | None

    def show(self) -> str:
        body = "" if self.body is None else self.body[:2000].decode("utf-8", errors="backslashreplace")
        more = "" if self.body is None or len(self.body) <= 2000 else f"... ({len(self.body)} bytes)"
        return f"{self.method} {self.path} (Content-Type: {self.content_type}) {body}{more}"


POST_ROUTES = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]
GET_ROUTES = ["/v1/models", "/tokenizer_info", "/health", "/v1/health", "/version"]
CONTENT_TYPES = ["application/json", "application/json", "application/json; charset=utf-8", "text/plain",
                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/json; charset=utf-16",
                 None, "*/*", "application/xml"]
RAW = [b"", b"{", b"}", b"[]", b"null", b"42", b'"x"', b"NaN", b"\xef\xbb\xbf{}", b"\xff\xfe{\x00}\x00", b"{'model': 'base'}",
       b"[" * 100_000 + b"]" * 100_000, b'{"model": ' + b"[" * 5000 + b"]" * 5000 + b"}", b"1" * 5000,
       b'{"model": "base", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", b'{"model": "base", "prompt": "\\ud800"}',
       b'{"model": "\\udfff", "prompt": "x"}', b'{"model": "base", "messages": [{"role": "user", "content": "\\ud83d"}]}',
       b'{"model": "base", "prompt": "x", "max_tokens": 1e999}', b'{"model": "base", "prompt": "x", "temperature": NaN}',
       b'{"model": "base", "prompt": "x", "max_tokens": 2,}', b'{"model": "base"} trailing', b"\x00" * 64]


def encode(draw: st.DrawFn, body: Any) -> bytes:
    """JSON text of `body` (ASCII or not; NaN/Infinity as Python writes them), sometimes cut short."""
    text = json.dumps(body, ensure_ascii=draw(st.booleans()), allow_nan=True)
    data = text.encode("utf-8", errors="surrogatepass")
    if draw(st.integers(0, 20)) == 0:
        data = data[:draw(st.integers(0, len(data)))]
    return data


@st.composite
def requests(draw: st.DrawFn) -> Request:
    kind = draw(st.sampled_from(["completions"] * 4 + ["chat"] * 4 + ["tokenize", "detokenize", "get", "model",
                                                                     "raw", "unknown", "wrong_method"]))
    ctype = draw(st.sampled_from(CONTENT_TYPES))
    if kind in ("completions", "chat"):
        path = "/v1/completions" if kind == "completions" else "/v1/chat/completions"
        return Request("POST", path, encode(draw, draw(generation_body(kind))), ctype)
    if kind in ("tokenize", "detokenize"):
        path = f"/{kind}"
        return Request("POST", path, encode(draw, draw(tokenizer_body(path))), ctype)
    if kind == "get":
        path = draw(st.sampled_from(GET_ROUTES)) + draw(st.sampled_from(["", "", "?x=1", "/", "?model=%00"]))
        return Request("GET", path, None, None)
    if kind == "model":
        name = draw(st.one_of(st.sampled_from(["base", "lora", "nope", "", "a/b", "..", "%00", "%ed%a0%80", "%ff"]),
                              st.text(max_size=10).map(lambda s: urllib.parse.quote(s, safe=""))))
        return Request("GET", "/v1/models/" + name, None, None)
    if kind == "raw":
        body = draw(st.one_of(st.sampled_from(RAW), st.binary(max_size=64)))
        return Request("POST", draw(st.sampled_from(POST_ROUTES)), body, ctype)
    if kind == "unknown":
        path = "/" + urllib.parse.quote(draw(st.text(max_size=20)), safe="/")
        method = draw(st.sampled_from(["GET", "POST", "PUT"]))
        return Request(method, path, encode(draw, draw(json_values)) if method != "GET" else None, ctype)
    route = draw(st.sampled_from(POST_ROUTES + GET_ROUTES))
    allowed = "POST" if route in POST_ROUTES else "GET"
    method = draw(st.sampled_from([m for m in ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD")
                                   if m != allowed and not (allowed == "GET" and m == "HEAD")]))
    return Request(method, route, encode(draw, draw(json_values)) if method in ("POST", "PUT", "PATCH") else None, ctype)


REDIRECTS = (307, 308)  # a path with a trailing slash: to the route without it (Starlette's redirect_slashes)


# ---------------------------------------------------------------- the invariant

def send(url: str, req: Request) -> tuple[int, str, bytes, str | None]:
    host, port = urllib.parse.urlsplit(url).netloc.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT_S)
    try:
        headers = {"Content-Type": req.content_type} if req.content_type else {}
        conn.request(req.method, req.path, body=req.body, headers=headers)
        r = conn.getresponse()
        return r.status, r.getheader("content-type") or "", r.read(), r.getheader("location")
    finally:
        conn.close()


def _error_shape(body: Any) -> str | None:
    """What is wrong with an OpenAI error body, or None."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict) or set(err) != {"message", "type", "param", "code"}:
        return f"not an OpenAI error body: {str(body)[:300]}"
    if not (isinstance(err["message"], str) and err["message"].strip() and isinstance(err["type"], str)):
        return f"an error without a message or type: {err}"
    if not all(err[k] is None or isinstance(err[k], str) for k in ("param", "code")):
        return f"param and code must be strings or null: {err}"
    return None


def _events(data: bytes) -> tuple[list[Any], str | None]:
    """The JSON events of a server-sent event stream, or what is wrong with it."""
    chunks = [c for c in data.decode().split("\n\n") if c]
    if not chunks or (chunks[-1] != "data: [DONE]" and "error" not in chunks[-1]):
        return [], f"a stream that does not end with [DONE] or an error: {data[-300:]!r}"
    out = []
    for c in chunks:
        if not c.startswith("data: "):
            return [], f"not an event: {c[:200]!r}"
        if c != "data: [DONE]":
            out.append(json.loads(c.removeprefix("data: ")))
    return out, None


def violation(status: int, ctype: str, data: bytes, method: str, location: str | None = None) -> str | None:
    """What breaks the invariant in an answer, or None."""
    if status in REDIRECTS and location is not None:
        return None
    if status >= 500 or not 200 <= status < 500:
        return f"status {status}: {data[:500]!r}"
    if method == "HEAD":
        return None
    try:
        if ctype.startswith("text/event-stream"):
            events, wrong = _events(data)
            if wrong:
                return wrong
            errors = [e for e in events if "error" in e]
            for e in errors:
                if _error_shape(e) or e["error"]["type"] == "server_error":
                    return f"an error in the stream: {e}"
            return None
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        return f"status {status} with a body that is not JSON ({e}): {data[:300]!r}"
    return _error_shape(body) if status >= 400 else None


@seed(FUZZ_SEED)
@fuzz_settings(EXAMPLES)
@given(req=requests())
def test_fuzz_request_bodies(fuzz_server, req: Request) -> None:
    """Any request to any route: a 2xx, or a 4xx with OpenAI's JSON error body; never a 5xx, a
    dropped connection or no answer within 30 s."""
    try:
        status, ctype, data, location = send(fuzz_server.url, req)
        wrong = violation(status, ctype, data, req.method, location)
    except (OSError, http.client.HTTPException) as e:  # reset, refused, timed out, malformed HTTP
        wrong = f"no answer: {type(e).__name__}: {e}"
    if wrong is None:
        return
    if COLLECT:
        with open(COLLECT, "a") as f:
            f.write(json.dumps({"problem": wrong[:1000], "request": req.show()}) + "\n")
        return
    raise AssertionError(f"{wrong}\nrequest: {req.show()}\n(FUZZ_SEED={FUZZ_SEED})")

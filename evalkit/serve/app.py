"""The HTTP side of `evalkit serve`: an ASGI app (Starlette, run by uvicorn as vLLM is) that turns
OpenAI requests into engine jobs and the engine's events into responses or server-sent events.

It protects the engine before any compute: a body-size limit (413), a body that must arrive in
time and be UTF-8 JSON (400), typed parameters (400), the context window (400
`context_length_exceeded`), a queue bound (503). A request whose client disconnects is cancelled,
and one that runs past the per-request timeout fails with 504.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from evalkit.backends.base import render_prompt, special_tokens_for_text
from evalkit.errors import fmt_path
from evalkit.serve import protocol as api
from evalkit.serve.engine import BASE, Delta, Engine, Event, Failed, Finished, Job, PromptLogprobs, TokenLogprob
from evalkit.serve.guided import GrammarError, Grammars
from evalkit.serve.protocol import ApiError, Limits
from evalkit.types import Case

log = logging.getLogger("evalkit.serve")

DEFAULT_CHAT_MAX_TOKENS = 256
DEFAULT_COMPLETION_MAX_TOKENS = 16  # as OpenAI's and vLLM's completions
CLIENT_GONE = 499  # nginx's status for a request whose client closed the connection (logged only)


@dataclass
class _Prompt:
    ids: list[int]
    text: str


@dataclass
class _Choice:
    """One choice, as the engine's events arrive."""

    prompt: _Prompt
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    text: str = ""
    tokens: list[TokenLogprob] = field(default_factory=list)
    finished: Finished | None = None
    echoed: bool = False  # streaming with echo: the prompt's text was sent


class Api:
    """The routes, bound to one engine."""

    def __init__(self, engine: Engine, *, limits: Limits | None = None, api_key: str | None = None,
                 say: Callable[[str], None] = print):
        self.engine, self.limits, self.key, self.say = engine, limits or Limits(), api_key, say
        self.grammars = Grammars(engine.tokenizer, engine.vocab_size, engine.eos_ids)
        self.counts = {"chat": 0, "completions": 0, "models": 0}

    def app(self) -> Starlette:
        def route(method: str, path: str, endpoint: Callable[[Request], Awaitable[Response]]) -> Route:
            return Route(path, self._logged(endpoint), methods=[method])

        routes = [
            route("GET", "/health", self.health), route("GET", "/v1/health", self.health),
            route("GET", "/version", self.version),
            route("GET", "/v1/models", self.models), route("GET", "/v1/models/{name:path}", self.model),
            route("POST", "/v1/completions", self.completions), route("POST", "/v1/chat/completions", self.chat),
            # vLLM's tokenizer endpoints: lm-eval's API clients tokenize through them
            route("POST", "/tokenize", self.tokenize), route("POST", "/detokenize", self.detokenize),
            route("GET", "/tokenizer_info", self.tokenizer_info),
        ]
        handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
            HTTPException: self._http_error, ApiError: self._api_error, Exception: self._internal_error}
        return Starlette(routes=routes, exception_handlers=handlers)

    # ------------------------------------------------------------ plumbing

    def _logged(self, endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            t0 = time.perf_counter()
            status = 500
            try:
                if request.url.path not in ("/health", "/v1/health"):
                    self._authorize(request)
                response = await endpoint(request)
                status = response.status_code
                return response
            except ApiError as e:
                status = e.status
                raise
            except ClientDisconnect:  # gone while sending its body: nobody to answer
                status = CLIENT_GONE
                return Response(status_code=status)
            finally:
                self.say(f"{request.method} {request.url.path} {status} {time.perf_counter() - t0:.2f}s")
        return run

    def _authorize(self, request: Request) -> None:
        if self.key is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {self.key}".encode()):
            raise ApiError(401, "invalid or missing API key (expected Authorization: Bearer ...)", code="invalid_api_key")

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            body = ApiError(405, f"method {request.method} is not allowed on {request.url.path} "
                                     f"(allowed: {(exc.headers or {}).get('Allow', '')})", code="method_not_allowed").body
        else:
            body = ApiError(exc.status_code, f"no route {request.method} {request.url.path}", code="not_found").body
        self.say(f"{request.method} {request.url.path} {exc.status_code}")
        return JSONResponse(body, exc.status_code, headers=exc.headers)

    async def _api_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return JSONResponse(exc.body, exc.status)

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(ApiError(500, "internal server error (see the server log)").body, 500)

    async def _json(self, request: Request) -> Any:
        """The body as JSON, read within the limits: 413 before reading an announced oversize
        body, 400 for a body that stops short, is not UTF-8 or not JSON."""
        limit = self.limits.max_body_bytes
        announced = request.headers.get("content-length")
        if announced is not None and not announced.isdigit():
            raise ApiError(400, f"invalid Content-Length {announced!r}")
        if announced is not None and int(announced) > limit:
            raise ApiError(413, f"the request body ({int(announced)} bytes) exceeds the server's limit of {limit} bytes "
                                "(--max-body-mb)", code="request_too_large")
        body = bytearray()
        chunks = request.stream().__aiter__()
        while True:
            try:  # a client may send slowly, but not stall
                chunk = await asyncio.wait_for(anext(chunks), self.limits.body_timeout_s)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise ApiError(400, f"the request body stopped after {len(body)} of {announced or '?'} bytes "
                                    f"(Content-Length) and nothing more came in {self.limits.body_timeout_s:g} s") from None
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"the request body exceeds the server's limit of {limit} bytes",
                               code="request_too_large")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ApiError(400, f"the request body is not UTF-8 (byte 0x{body[e.start]:02x} at offset {e.start})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ApiError(400, f"invalid JSON body: {e.msg} (line {e.lineno} column {e.colno})") from None
        except RecursionError:
            raise ApiError(400, "invalid JSON body: nested too deeply") from None
        except ValueError as e:  # an integer of more digits than Python converts (4300)
            raise ApiError(400, f"invalid JSON body: {e}") from None
        if "\\u" in text and _SURROGATE_ESCAPE.search(text):
            _refuse_lone_surrogates(data)
        return data

    def _check_model(self, name: str) -> None:
        if name not in self.engine.names:
            raise ApiError(404, f"The model '{name}' does not exist (available: {', '.join(self.engine.names)})",
                           param="model", code="model_not_found")

    # ------------------------------------------------------------ informational routes

    async def health(self, request: Request) -> Response:
        if not self.engine.alive:
            return JSONResponse(ApiError(503, "the engine is not running").body, 503)
        return JSONResponse({"status": "ok", "queued": self.engine.queued})

    async def version(self, request: Request) -> Response:
        from evalkit import __version__

        return JSONResponse({"version": f"evalkit {__version__}"})

    def _model_entry(self, name: str) -> dict[str, Any]:
        e = self.engine
        entry = {"id": name, "object": "model", "created": e.created, "owned_by": "evalkit",
                 "root": e.roots.get(name, name), "parent": None if name == BASE else BASE,
                 "max_model_len": e.max_model_len}
        fingerprint = e.fingerprints.get(name)
        return entry | ({"fingerprint": fingerprint} if fingerprint else {})

    async def models(self, request: Request) -> Response:
        self.counts["models"] += 1
        return JSONResponse({"object": "list", "data": [self._model_entry(n) for n in self.engine.names]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["name"]
        self._check_model(name)
        return JSONResponse(self._model_entry(name))

    async def tokenize(self, request: Request) -> Response:
        body = await self._json(request)
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            raise ApiError(400, "'prompt' must be a string", param="prompt")
        special = body.get("add_special_tokens", special_tokens_for_text(self.engine.tokenizer))
        if not isinstance(special, bool):
            raise ApiError(400, "'add_special_tokens' must be a boolean", param="add_special_tokens")
        ids = await run_in_threadpool(self._encode, body["prompt"], special)
        return JSONResponse({"count": len(ids), "max_model_len": self.engine.max_model_len, "tokens": ids})

    async def detokenize(self, request: Request) -> Response:
        body = await self._json(request)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list):
            raise ApiError(400, "'tokens' must be a list of token ids", param="tokens")
        self._check_ids(tokens, "tokens")
        return JSONResponse({"prompt": self.engine.tokenizer.decode(tokens)})

    async def tokenizer_info(self, request: Request) -> Response:
        tok = self.engine.tokenizer
        return JSONResponse({"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token,
                             "bos_token": tok.bos_token, "pad_token": tok.pad_token,
                             "chat_template": getattr(tok, "chat_template", None),
                             "model_max_length": self.engine.max_model_len})

    # ------------------------------------------------------------ generation routes

    async def completions(self, request: Request) -> Response:
        req: api.CompletionRequest = api.parse(api.CompletionRequest, await self._json(request))
        self._check_model(req.model)
        self.counts["completions"] += 1
        if req.max_tokens == 0 and not req.echo:
            raise ApiError(400, "max_tokens: must be >= 1 (0 only with echo)", param="max_tokens")
        prompts = await run_in_threadpool(self._completion_prompts, req)
        k = req.logprobs
        jobs, choices = self._jobs(req, prompts, lambda p: self._limit(p, req.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS,
                                                                       "prompt"),
                                   logprobs=k, prompt_logprobs=k if req.echo else None)
        for c in choices:
            c.text = c.prompt.text if req.echo else ""

        def body(c: _Choice, i: int) -> dict[str, Any]:
            entries = [*c.prompt_logprobs, *c.tokens]
            return {"index": i, "text": c.text, "finish_reason": _reason(c), "stop_reason": None,
                    "logprobs": None if k is None else api.completion_logprobs(self.engine.tokenizer, entries)}
        if req.stream:
            return self._stream(request, req, jobs, choices, self._completion_chunk(req))
        if not await self._gather(request, jobs, choices):
            return Response(status_code=CLIENT_GONE)
        return JSONResponse(api.envelope("text_completion", req.model) | {
            "choices": [body(c, i) for i, c in enumerate(choices)], "usage": self._usage(prompts, choices)})

    async def chat(self, request: Request) -> Response:
        req: api.ChatRequest = api.parse(api.ChatRequest, await self._json(request))
        self._check_model(req.model)
        self.counts["chat"] += 1
        prompt, grammar = await run_in_threadpool(self._chat_prompt, req)
        k = (req.top_logprobs or 0) if req.logprobs else None
        jobs, choices = self._jobs(req, [prompt], lambda p: self._limit(p, req.limit, None, "messages"), logprobs=k,
                                   grammar=grammar)
        if req.stream:
            return self._stream(request, req, jobs, choices, self._chat_chunk(req))
        if not await self._gather(request, jobs, choices):
            return Response(status_code=CLIENT_GONE)
        tok = self.engine.tokenizer
        return JSONResponse(api.envelope("chat.completion", req.model) | {
            "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                         "logprobs": None if k is None else {"content": api.chat_logprobs(tok, c.tokens)},
                         "finish_reason": _reason(c)} for i, c in enumerate(choices)],
            "usage": self._usage([prompt], choices)})

    # ------------------------------------------------------------ preparing jobs (in a worker thread)

    def _encode(self, text: str, special: bool) -> list[int]:
        return list(self.engine.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _check_ids(self, ids: Sequence[Any], param: str) -> None:
        vocab = self.engine.vocab_size
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab][:1]
        if bad:  # a list: the id itself may be null
            is_id = isinstance(bad[0], int) and not isinstance(bad[0], bool)
            what = f"token id {bad[0]} is outside the vocabulary" if is_id else f"{api.brief(bad[0])} is not a token id"
            raise ApiError(400, f"{param}: {what} (an integer in 0..{vocab - 1})", param=param)

    def _completion_prompts(self, req: api.CompletionRequest) -> list[_Prompt]:
        out = []
        special = special_tokens_for_text(self.engine.tokenizer)
        prompts = req.prompts
        if not prompts:
            raise ApiError(400, "prompt: must not be empty", param="prompt")
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                prompt = _Prompt(self._encode(p, special), p)
            else:
                self._check_ids(p, "prompt")
                prompt = _Prompt(list(p), self.engine.tokenizer.decode(p))
            if not prompt.ids:  # nothing to continue from ("" when the tokenizer adds no BOS)
                where = "prompt" if len(prompts) == 1 and req.prompt is p else f"prompt[{i}]"
                raise ApiError(400, f"{where}: the prompt is empty (no tokens to continue from)", param="prompt")
            out.append(prompt)
        return out

    def _chat_prompt(self, req: api.ChatRequest) -> tuple[_Prompt, str | None]:
        messages = tuple({"role": m.role, "content": m.text} for m in req.messages)
        try:
            text = render_prompt(self.engine.tokenizer, Case(id="request", messages=messages))
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        except Exception as e:  # the chat template refused the conversation (e.g. roles out of order)
            raise ApiError(400, f"the model's chat template rejected the messages: {e}", param="messages") from None
        grammar = None
        fmt = req.response_format
        if fmt is not None and fmt.type != "text":
            try:
                grammar = self.grammars.compile(fmt.json_schema.schema_ if fmt.json_schema else None)
            except GrammarError as e:
                raise ApiError(400, f"response_format: the schema cannot be enforced: {e}",
                               param="response_format") from None
        return _Prompt(self._encode(text, False), text), grammar

    def _limit(self, prompt: _Prompt, asked: int | None, default: int | None, param: str) -> int:
        """max_tokens for a prompt: what was asked (else `default`, else what fits of
        DEFAULT_CHAT_MAX_TOKENS), within the cap and the context window."""
        window, n = self.engine.max_model_len, len(prompt.ids)
        if asked is not None and asked > self.limits.max_tokens_cap:
            raise ApiError(400, f"max_tokens: must be <= {self.limits.max_tokens_cap} (the server's --max-tokens-cap), "
                                f"got {asked}", param="max_tokens")
        if asked is not None:
            tokens = asked
        else:  # the default fits the cap, and a chat's the context window too
            tokens = min(default if default is not None else min(DEFAULT_CHAT_MAX_TOKENS, window - n),
                         self.limits.max_tokens_cap)
        if n + tokens > window or n >= window:
            raise ApiError(400, f"This model's maximum context length is {window} tokens. However, you requested "
                                f"{n + tokens} tokens ({n} in the prompt, {tokens} for the completion). Please reduce "
                                "the prompt or max_tokens.", param=param,
                           code="context_length_exceeded")
        return tokens

    def _jobs(self, req: api._Sampling, prompts: list[_Prompt], limit: Callable[[_Prompt], int], *,
              logprobs: int | None, prompt_logprobs: int | None = None,
              grammar: str | None = None) -> tuple[list[Job], list[_Choice]]:
        limits = [limit(p) for p in prompts]  # every prompt is checked before any job starts
        self._check_ids([token for token, _ in req.sampling().logit_bias], "logit_bias")
        n_jobs = len(prompts) * req.n
        if n_jobs > self.limits.max_queue:  # more than the server ever queues: retrying cannot help
            raise ApiError(400, f"the request asks for {n_jobs} sequences ({len(prompts)} prompt(s) x n={req.n}), more "
                                f"than the server queues at once ({self.limits.max_queue})", param="n")
        if self.engine.queued + n_jobs > self.limits.max_queue:
            raise ApiError(503, f"the server is busy ({self.engine.queued} sequences waiting); retry later",
                           code="server_busy")
        deadline = time.monotonic() + self.limits.request_timeout_s
        jobs, choices = [], []
        for p, max_tokens in zip(prompts, limits):
            for j in range(req.n):
                choices.append(_Choice(p))
                jobs.append(Job(req.model, p.ids, max_tokens, sink=_noop, sampling=req.sampling(j), stop=req.stops,
                                logprobs=logprobs, prompt_logprobs=prompt_logprobs, deadline=deadline,
                                guide=self.grammars.guide(grammar) if grammar is not None else None))
        return jobs, choices

    # ------------------------------------------------------------ running jobs

    async def _events(self, jobs: list[Job]) -> AsyncIterator[tuple[int, Event]]:
        """Submit the jobs and yield (choice index, event) until every job has ended; the jobs
        are cancelled when the consumer stops early (disconnect, error)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        def sink(i: int) -> Callable[[Event], None]:
            def put(event: Event) -> None:  # called from the engine thread
                loop.call_soon_threadsafe(queue.put_nowait, (i, event))
            return put

        for i, job in enumerate(jobs):
            job.sink = sink(i)
        try:
            self.engine.submit(jobs)
        except RuntimeError:
            raise ApiError(503, "the server is shutting down") from None
        open_ = len(jobs)
        try:
            while open_:
                i, event = await queue.get()
                if isinstance(event, Finished | Failed):
                    open_ -= 1
                yield i, event
        finally:
            for job in jobs:
                job.cancelled = True

    def _apply(self, choice: _Choice, event: Event) -> None:
        if isinstance(event, PromptLogprobs):
            choice.prompt_logprobs = event.tokens
        elif isinstance(event, Delta):
            choice.text += event.text
            choice.tokens.extend(event.tokens)
        elif isinstance(event, Finished):
            choice.finished = event
        elif isinstance(event, Failed):
            raise ApiError(event.status, event.message, code=event.code)

    async def _gather(self, request: Request, jobs: list[Job], choices: list[_Choice]) -> bool:
        """Run the jobs to the end; False when the client went away first (the jobs are cancelled)."""
        async def collect() -> None:
            async for i, event in self._events(jobs):
                self._apply(choices[i], event)

        work = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():  # the client left: stop generating for it
                for job in jobs:
                    job.cancelled = True
                work.cancel()
        if work.cancelled():
            return False
        work.result()  # raises the request's ApiError, if any
        return True

    def _usage(self, prompts: Sequence[_Prompt], choices: Sequence[_Choice]) -> dict[str, int]:
        done = sum(c.finished.completion_tokens for c in choices if c.finished)
        return api.usage(sum(len(p.ids) for p in prompts), done)

    def _stream(self, request: Request, req: api._Sampling, jobs: list[Job], choices: list[_Choice],
                chunk: Callable[[int, _Choice, Event], dict[str, Any] | None]) -> Response:
        kind = "chat.completion.chunk" if isinstance(req, api.ChatRequest) else "text_completion"
        head = api.envelope(kind, req.model) | ({"usage": None} if req.include_usage else {})  # every chunk's

        async def sse() -> AsyncIterator[str]:
            def data(obj: Any) -> str:
                return f"data: {json.dumps(obj)}\n\n"
            if isinstance(req, api.ChatRequest):
                for i in range(len(choices)):
                    yield data(head | {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]})
            try:
                async for i, event in self._events(jobs):
                    self._apply(choices[i], event)
                    body = chunk(i, choices[i], event)
                    if body is not None:
                        yield data(head | {"choices": [body]})
            except ApiError as e:
                yield data(e.body)
                return
            if req.include_usage:
                prompts = list({id(c.prompt): c.prompt for c in choices}.values())
                yield data(head | {"choices": [], "usage": self._usage(prompts, choices)})
            yield "data: [DONE]\n\n"
        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def _completion_chunk(self, req: api.CompletionRequest) -> Callable[[int, _Choice, Event], dict[str, Any] | None]:
        tok, k = self.engine.tokenizer, req.logprobs

        def chunk(i: int, c: _Choice, event: Event) -> dict[str, Any] | None:
            text = ""
            entries: tuple[TokenLogprob, ...] = ()
            if req.echo and not c.echoed and not isinstance(event, Failed):  # the prompt goes first
                text, c.echoed = c.prompt.text, True
            if isinstance(event, PromptLogprobs):
                entries = event.tokens
            elif isinstance(event, Delta):
                text, entries = text + event.text, event.tokens
            elif isinstance(event, Finished):
                return {"index": i, "text": text, "logprobs": None, "finish_reason": event.finish_reason,
                        "stop_reason": None}
            else:
                return None
            return {"index": i, "text": text, "finish_reason": None, "stop_reason": None,
                    "logprobs": None if k is None else api.completion_logprobs(tok, entries)}
        return chunk

    def _chat_chunk(self, req: api.ChatRequest) -> Callable[[int, _Choice, Event], dict[str, Any] | None]:
        tok, want = self.engine.tokenizer, req.logprobs

        def chunk(i: int, c: _Choice, event: Event) -> dict[str, Any] | None:
            if isinstance(event, Delta):
                return {"index": i, "delta": {"content": event.text}, "finish_reason": None,
                        "logprobs": {"content": api.chat_logprobs(tok, event.tokens)} if want else None}
            if isinstance(event, Finished):
                return {"index": i, "delta": {}, "logprobs": None, "finish_reason": event.finish_reason}
            return None
        return chunk


# a UTF-16 surrogate written as a JSON escape; valid pairs decode to one character, lone ones stay
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _refuse_lone_surrogates(data: Any) -> None:
    """A 400 naming the first string (or key) with a lone surrogate: it is not Unicode, so no
    tokenizer takes it and no response could repeat it as UTF-8."""
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            stack += [((*path, k), v) for k, v in value.items()]
            strings = list(value)
        elif isinstance(value, list):
            stack += [((*path, i), v) for i, v in enumerate(value)]
            strings = []
        else:
            strings = [value] if isinstance(value, str) else []
        for text in strings:
            bad = next((c for c in text if "\ud800" <= c <= "\udfff"), None)
            if bad is not None:
                where = fmt_path(path) or "the body"
                raise ApiError(400, f"{where}: a lone UTF-16 surrogate (\\u{ord(bad):04x}) is not valid Unicode",
                               param=fmt_path(path) or None)


def _reason(choice: _Choice) -> str | None:
    return choice.finished.finish_reason if choice.finished else None


def _noop(event: Event) -> None:
    pass


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: receive() waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass

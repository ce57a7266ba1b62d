"""The serving routes of `evalkit serve`: an ASGI app (Starlette, run by uvicorn as vLLM is) that turns
OpenAI requests into engine jobs, and the informational routes (models, health, tokenizer).

It protects the engine before any compute: typed parameters (400), the context window (400
`context_length_exceeded`), a queue bound (503), on top of the body checks every route gets
(`evalkit.serve.plumbing`). Running the jobs and shaping the answers, whole or streamed, is
`evalkit.serve.replies`'s; a request whose client disconnects is cancelled, and one that runs past
the per-request timeout fails with 504.
"""
from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from evalkit.backends.base import render_prompt, special_tokens_for_text
from evalkit.backends.decoder import Generation
from evalkit.serve import protocol as api
from evalkit.serve.engine import BASE, Engine
from evalkit.serve.guided import GrammarError, Grammars
from evalkit.serve.plumbing import CLIENT_GONE, error_handlers, logged, read_json
from evalkit.serve.protocol import ApiError, Limits
from evalkit.serve.replies import (
    Choice,
    Prompt,
    chat_chunk,
    completion_chunk,
    finish_reason,
    gather,
    no_sink,
    stream,
    usage,
)
from evalkit.types import Case

DEFAULT_CHAT_MAX_TOKENS = 256
DEFAULT_COMPLETION_MAX_TOKENS = 16  # as OpenAI's and vLLM's completions
OPEN_PATHS = ("/health", "/v1/health")  # answered without the API key


class Api:
    """The routes, bound to one engine."""

    def __init__(self, engine: Engine, *, limits: Limits | None = None, api_key: str | None = None,
                 say: Callable[[str], None] = print):
        self.engine, self.limits, self.key, self.say = engine, limits or Limits(), api_key, say
        self.grammars = Grammars(engine.tokenizer, engine.vocab_size, engine.eos_ids)
        self.counts = {"chat": 0, "completions": 0, "models": 0}

    def app(self) -> Starlette:
        def route(method: str, path: str, endpoint: Callable[[Request], Awaitable[Response]]) -> Route:
            return Route(path, logged(endpoint, api_key=self.key, say=self.say, open_paths=OPEN_PATHS), methods=[method])

        routes = [
            route("GET", "/health", self.health), route("GET", "/v1/health", self.health),
            route("GET", "/version", self.version),
            route("GET", "/v1/models", self.models), route("GET", "/v1/models/{name:path}", self.model),
            route("POST", "/v1/completions", self.completions), route("POST", "/v1/chat/completions", self.chat),
            # vLLM's tokenizer endpoints: lm-eval's API clients tokenize through them
            route("POST", "/tokenize", self.tokenize), route("POST", "/detokenize", self.detokenize),
            route("GET", "/tokenizer_info", self.tokenizer_info),
        ]
        return Starlette(routes=routes, exception_handlers=error_handlers(self.say))

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
        body = await read_json(request, self.limits)
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            raise ApiError(400, "'prompt' must be a string", param="prompt")
        special = body.get("add_special_tokens", special_tokens_for_text(self.engine.tokenizer))
        if not isinstance(special, bool):
            raise ApiError(400, "'add_special_tokens' must be a boolean", param="add_special_tokens")
        ids = await run_in_threadpool(self._encode, body["prompt"], special)
        return JSONResponse({"count": len(ids), "max_model_len": self.engine.max_model_len, "tokens": ids})

    async def detokenize(self, request: Request) -> Response:
        body = await read_json(request, self.limits)
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
        req: api.CompletionRequest = api.parse(api.CompletionRequest, await read_json(request, self.limits))
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

        def body(c: Choice, i: int) -> dict[str, Any]:
            entries = [*c.prompt_logprobs, *c.tokens]
            return {"index": i, "text": c.text, "finish_reason": finish_reason(c), "stop_reason": None,
                    "logprobs": None if k is None else api.completion_logprobs(self.engine.tokenizer, entries)}
        if req.stream:
            return stream(self.engine, req, jobs, choices, completion_chunk(self.engine.tokenizer, req))
        if not await gather(self.engine, request, jobs, choices):
            return Response(status_code=CLIENT_GONE)
        return JSONResponse(api.envelope("text_completion", req.model) | {
            "choices": [body(c, i) for i, c in enumerate(choices)], "usage": usage(prompts, choices)})

    async def chat(self, request: Request) -> Response:
        req: api.ChatRequest = api.parse(api.ChatRequest, await read_json(request, self.limits))
        self._check_model(req.model)
        self.counts["chat"] += 1
        prompt, grammar = await run_in_threadpool(self._chat_prompt, req)
        k = (req.top_logprobs or 0) if req.logprobs else None
        jobs, choices = self._jobs(req, [prompt], lambda p: self._limit(p, req.limit, None, "messages"), logprobs=k,
                                   grammar=grammar)
        if req.stream:
            return stream(self.engine, req, jobs, choices, chat_chunk(self.engine.tokenizer, req))
        if not await gather(self.engine, request, jobs, choices):
            return Response(status_code=CLIENT_GONE)
        tok = self.engine.tokenizer
        return JSONResponse(api.envelope("chat.completion", req.model) | {
            "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                         "logprobs": None if k is None else {"content": api.chat_logprobs(tok, c.tokens)},
                         "finish_reason": finish_reason(c)} for i, c in enumerate(choices)],
            "usage": usage([prompt], choices)})

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

    def _completion_prompts(self, req: api.CompletionRequest) -> list[Prompt]:
        out = []
        special = special_tokens_for_text(self.engine.tokenizer)
        prompts = req.prompts
        if not prompts:
            raise ApiError(400, "prompt: must not be empty", param="prompt")
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                prompt = Prompt(self._encode(p, special), p)
            else:
                self._check_ids(p, "prompt")
                prompt = Prompt(list(p), self.engine.tokenizer.decode(p))
            if not prompt.ids:  # nothing to continue from ("" when the tokenizer adds no BOS)
                where = "prompt" if len(prompts) == 1 and req.prompt is p else f"prompt[{i}]"
                raise ApiError(400, f"{where}: the prompt is empty (no tokens to continue from)", param="prompt")
            out.append(prompt)
        return out

    def _chat_prompt(self, req: api.ChatRequest) -> tuple[Prompt, str | None]:
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
        return Prompt(self._encode(text, False), text), grammar

    def _limit(self, prompt: Prompt, asked: int | None, default: int | None, param: str) -> int:
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

    def _jobs(self, req: api._Sampling, prompts: list[Prompt], limit: Callable[[Prompt], int], *,
              logprobs: int | None, prompt_logprobs: int | None = None,
              grammar: str | None = None) -> tuple[list[Generation], list[Choice]]:
        limits = [limit(p) for p in prompts]  # every prompt is checked before any job starts
        samplings = [req.sampling(j) for j in range(req.n)]  # the j-th choice of each prompt: its seed + j
        self._check_ids([token for token, _ in samplings[0].logit_bias], "logit_bias")  # n >= 1; one bias for all
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
                choices.append(Choice(p))
                jobs.append(Generation(req.model, p.ids, max_tokens, sink=no_sink, sampling=samplings[j], stop=req.stops,
                                logprobs=logprobs, prompt_logprobs=prompt_logprobs, deadline=deadline,
                                guide=self.grammars.guide(grammar) if grammar is not None else None))
        return jobs, choices

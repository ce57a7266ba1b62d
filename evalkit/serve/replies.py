"""Running a request's jobs on the engine and shaping what goes back: the engine's events collected
into choices (one per sequence), or streamed as OpenAI chunks (server-sent events).

The jobs run on the engine's thread; their events come back here through each job's sink. A
consumer that stops early (a client gone, an error) cancels the jobs it started.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from evalkit.backends.decoder import Delta, Event, Failed, Finished, Generation, PromptLogprobs, TokenLogprob
from evalkit.serve import protocol as api
from evalkit.serve.engine import Engine
from evalkit.serve.plumbing import SSE_DONE, disconnected, event_stream, sse
from evalkit.serve.protocol import ApiError


@dataclass
class Prompt:
    ids: list[int]
    text: str


@dataclass
class Choice:
    """One choice, as the engine's events arrive."""

    prompt: Prompt
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    text: str = ""
    tokens: list[TokenLogprob] = field(default_factory=list)
    finished: Finished | None = None
    echoed: bool = False  # streaming with echo: the prompt's text was sent


Chunk = Callable[[int, Choice, Event], dict[str, Any] | None]  # a choice's event as a stream chunk (None: nothing to send)


def finish_reason(choice: Choice) -> str | None:
    return choice.finished.finish_reason if choice.finished else None


def no_sink(event: Event) -> None:
    """A job's sink until it is submitted (`events` sets the real one)."""


async def events(engine: Engine, jobs: list[Generation]) -> AsyncIterator[tuple[int, Event]]:
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
        engine.submit(jobs)
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


def apply(choice: Choice, event: Event) -> None:
    """An event into its choice; a failed job fails the request."""
    if isinstance(event, PromptLogprobs):
        choice.prompt_logprobs = event.tokens
    elif isinstance(event, Delta):
        choice.text += event.text
        choice.tokens.extend(event.tokens)
    elif isinstance(event, Finished):
        choice.finished = event
    elif isinstance(event, Failed):
        raise ApiError(event.status, event.message, code=event.code)


async def gather(engine: Engine, request: Request, jobs: list[Generation], choices: list[Choice]) -> bool:
    """Run the jobs to the end; False when the client went away first (the jobs are cancelled)."""
    async def collect() -> None:
        async for i, event in events(engine, jobs):
            apply(choices[i], event)

    work = asyncio.ensure_future(collect())
    gone = asyncio.ensure_future(disconnected(request))
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


def usage(prompts: Sequence[Prompt], choices: Sequence[Choice]) -> dict[str, int]:
    done = sum(c.finished.completion_tokens for c in choices if c.finished)
    return api.usage(sum(len(p.ids) for p in prompts), done)


def stream(engine: Engine, req: api._Sampling, jobs: list[Generation], choices: list[Choice], chunk: Chunk) -> Response:
    """The jobs' events as server-sent chunks, `chunk` shaping each; an error ends the stream with its body."""
    kind = "chat.completion.chunk" if isinstance(req, api.ChatRequest) else "text_completion"
    head = api.envelope(kind, req.model) | ({"usage": None} if req.include_usage else {})  # every chunk's

    async def body() -> AsyncIterator[str]:
        if isinstance(req, api.ChatRequest):
            for i in range(len(choices)):
                yield sse(head | {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None}]})
        try:
            async for i, event in events(engine, jobs):
                apply(choices[i], event)
                piece = chunk(i, choices[i], event)
                if piece is not None:
                    yield sse(head | {"choices": [piece]})
        except ApiError as e:
            yield sse(e.body)
            return
        if req.include_usage:
            prompts = list({id(c.prompt): c.prompt for c in choices}.values())
            yield sse(head | {"choices": [], "usage": usage(prompts, choices)})
        yield SSE_DONE
    return event_stream(body())


def completion_chunk(tokenizer: Any, req: api.CompletionRequest) -> Chunk:
    k = req.logprobs

    def chunk(i: int, c: Choice, event: Event) -> dict[str, Any] | None:
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
                "logprobs": None if k is None else api.completion_logprobs(tokenizer, entries)}
    return chunk


def chat_chunk(tokenizer: Any, req: api.ChatRequest) -> Chunk:
    want = req.logprobs

    def chunk(i: int, c: Choice, event: Event) -> dict[str, Any] | None:
        if isinstance(event, Delta):
            return {"index": i, "delta": {"content": event.text}, "finish_reason": None,
                    "logprobs": {"content": api.chat_logprobs(tokenizer, event.tokens)} if want else None}
        if isinstance(event, Finished):
            return {"index": i, "delta": {}, "logprobs": None, "finish_reason": event.finish_reason}
        return None
    return chunk

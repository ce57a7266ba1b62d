"""HTTP plumbing of `evalkit serve`: what every route shares, before and after the serving itself.

The API key, one access-log line per request, OpenAI-shaped error bodies for every failure (404,
405, 500 and the API's own), the request body read within its limits (413 before reading an
announced oversize body; 400 for one that stalls, is not UTF-8 or not JSON, or holds a lone
surrogate), server-sent events, and noticing a client that went away.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from evalkit.errors import fmt_path
from evalkit.serve.protocol import ApiError, Limits

log = logging.getLogger("evalkit.serve")

CLIENT_GONE = 499  # nginx's status for a request whose client closed the connection (logged only)
SSE_DONE = "data: [DONE]\n\n"  # the last event of an OpenAI stream

Endpoint = Callable[[Request], Awaitable[Response]]
ErrorHandler = Callable[[Request, Exception], Awaitable[Response]]


def logged(endpoint: Endpoint, *, api_key: str | None, say: Callable[[str], None],
           open_paths: tuple[str, ...] = ()) -> Endpoint:
    """`endpoint` behind the API key (except on `open_paths`), saying one access-log line per request."""
    async def run(request: Request) -> Response:
        t0 = time.perf_counter()
        status = 500
        try:
            if request.url.path not in open_paths:
                authorize(request, api_key)
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
            say(f"{request.method} {request.url.path} {status} {time.perf_counter() - t0:.2f}s")
    return run


def authorize(request: Request, api_key: str | None) -> None:
    """A 401 unless the request carries the key (any request passes when the server has none)."""
    if api_key is None:
        return
    got = request.headers.get("authorization", "")
    if not hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
        raise ApiError(401, "invalid or missing API key (expected Authorization: Bearer ...)", code="invalid_api_key")


def error_handlers(say: Callable[[str], None]) -> dict[Any, ErrorHandler]:
    """Starlette's exception handlers: every failure answered with an OpenAI error body."""
    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            body = ApiError(405, f"method {request.method} is not allowed on {request.url.path} "
                                 f"(allowed: {(exc.headers or {}).get('Allow', '')})", code="method_not_allowed").body
        else:
            body = ApiError(exc.status_code, f"no route {request.method} {request.url.path}", code="not_found").body
        say(f"{request.method} {request.url.path} {exc.status_code}")
        return JSONResponse(body, exc.status_code, headers=exc.headers)

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return JSONResponse(exc.body, exc.status)

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(ApiError(500, "internal server error (see the server log)").body, 500)

    return {HTTPException: http_error, ApiError: api_error, Exception: internal_error}


async def read_json(request: Request, limits: Limits) -> Any:
    """The body as JSON, read within the limits: 413 before reading an announced oversize
    body, 400 for a body that stops short, is not UTF-8 or not JSON."""
    limit = limits.max_body_bytes
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
            chunk = await asyncio.wait_for(anext(chunks), limits.body_timeout_s)
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise ApiError(400, f"the request body stopped after {len(body)} of {announced or '?'} bytes "
                                f"(Content-Length) and nothing more came in {limits.body_timeout_s:g} s") from None
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


def sse(obj: Any) -> str:
    """One server-sent event holding `obj` as JSON."""
    return f"data: {json.dumps(obj)}\n\n"


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


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


async def disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: receive() waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass

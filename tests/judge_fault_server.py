"""A fault-injecting OpenAI-compatible server for judge tests (127.0.0.1, stdlib only).

Each POST /v1/chat/completions consumes the next scripted fault, if any:
  "429"     rate limited, with Retry-After: 0
  "500"     internal error
  "slow"    answers normally, but only after `slow_s` (past the client's timeout)
  "garbage" a 200 whose content is not JSON
  "drop"    closes the connection without a reply
then answers as a deterministic fake judge (see `verdict`); anything that is not a verdict request
(the judge's seed probe) gets random words, whatever the seed: a server that ignores seeds.
Every request is counted, and each chat request's body kept in `bodies`.
A wrong or missing bearer key gets 401 on every route, with the received key echoed back in
the message (as real providers partly do), so tests can check the client redacts it.
"""
from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def verdict(messages: list[dict], state: Counter) -> str:
    """The fake judge, keyed on markers in the graded text:
    rubric  — GOOD -> 5 / pass, BAD -> 1 / fail, else 3 / fail; GARBAGE -> never valid JSON;
              NOISY -> alternates 5 and 1 between calls (a flipping judge);
    pairwise — the response containing GOOD wins, else "A" (a judge with position bias)."""
    user = next(m["content"] for m in messages if m["role"] == "user")
    if "# Response" not in user:
        return " ".join(random.choice(["red", "green", "blue", "cat", "dog", "sun", "moon"]) for _ in range(10))
    if "# Response A" in user:
        a = user.split("# Response A", 1)[1].split("# Response B", 1)[0]
        b = user.split("# Response B", 1)[1].split("Which response", 1)[0]
        winner = "A" if "GOOD" in a and "GOOD" not in b else "B" if "GOOD" in b and "GOOD" not in a else "A"
        return json.dumps({"winner": winner, "reason": f"picked {winner}"})
    graded = user.split("# Response to grade", 1)[1]
    if "GARBAGE" in graded:
        return "I think it is fine, maybe a 4?"
    if "NOISY" in graded:
        state["noisy"] += 1
        good = state["noisy"] % 2 == 1
    else:
        good = "GOOD" in graded
    if '"verdict"' in graded:
        return json.dumps({"verdict": "pass" if good else "fail", "reason": "fake"})
    score = 5 if good else 1 if ("BAD" in graded or "NOISY" in graded) else 3
    return "```json\n" + json.dumps({"score": score, "reason": f"fake {score}"}) + "\n```"


class LocalServer(ThreadingHTTPServer):
    """A stdlib HTTP server on 127.0.0.1 (a free port), serving from a thread inside `with`."""

    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler]):
        super().__init__(("127.0.0.1", 0), handler)

    def __enter__(self):
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


class FaultServer(LocalServer):
    def __init__(self, *, key: str | None = None, models: Iterable[str] = ("judge",),
                 faults: Iterable[str] = (), slow_s: float = 1.0):
        super().__init__(_Handler)
        self.key, self.models, self.slow_s = key, list(models), slow_s
        self.faults: deque[str] = deque(faults)
        self.counts: Counter = Counter()  # "chat", "models", "401", and one per fault served
        self.bodies: list[dict] = []  # every chat request, as sent
        self.state: Counter = Counter()
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def script(self, *faults: str) -> None:
        with self.lock:
            self.faults.extend(faults)

    def next_fault(self) -> str | None:
        with self.lock:
            return self.faults.popleft() if self.faults else None


class _Handler(BaseHTTPRequestHandler):
    server: FaultServer

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            pass

    def _error(self, status: int, message: str, type_: str, headers: dict[str, str] | None = None) -> None:
        self._send(status, {"error": {"message": message, "type": type_, "param": None, "code": None}}, headers)

    def _authorized(self) -> bool:
        if self.server.key is None:
            return True
        got = self.headers.get("Authorization", "")
        if got == f"Bearer {self.server.key}":
            return True
        with self.server.lock:
            self.server.counts["401"] += 1
        self._error(401, f"Incorrect API key provided: {got.removeprefix('Bearer ')}", "invalid_request_error")
        return False

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.counts["models"] += 1
        if not self._authorized():
            return
        if self.path.rstrip("/") != "/v1/models":
            return self._error(404, f"no route {self.path}", "invalid_request_error")
        self._send(200, {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "test"}
                                                    for m in self.server.models]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        fault = self.server.next_fault()
        with self.server.lock:
            self.server.counts["chat"] += 1
            self.server.bodies.append(body)
            if fault:
                self.server.counts[fault] += 1
        if not self._authorized():
            return
        if fault == "429":
            return self._error(429, "rate limited", "rate_limit_error", {"Retry-After": "0"})
        if fault == "500":
            return self._error(500, "internal error", "server_error")
        if fault == "drop":
            self.close_connection = True
            self.connection.close()
            return
        if fault == "slow":
            time.sleep(self.server.slow_s)
        with self.server.lock:
            content = "Sure! Here is my verdict: great." if fault == "garbage" else verdict(
                body["messages"], self.server.state)
        self._send(200, {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": content}}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

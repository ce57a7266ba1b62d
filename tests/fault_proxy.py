"""A fault-injecting HTTP proxy in front of a real OpenAI-compatible server (127.0.0.1, stdlib only).

Every request is forwarded to `upstream` unchanged, except POST /v1/completions, which first
consumes the next scripted fault, if any:
  "429"     rate limited, with Retry-After: 0
  "500"     internal error
  "slow"    forwarded, but answered only after `slow_s` (past the client's timeout)
  "drop"    closes the connection without a reply
  "garbage" a 200 whose body is not JSON
With `down = True`, every completion request gets a 500 (a server that stays broken).
With `contaminate = (victim, culprit)`, a completion for model `victim` is answered by `culprit`
whenever a `culprit` request is in flight too (checked after holding each request `hold_s`, so a
burst is all in flight together): the mixed-traffic bug a server can have.
`counts` has the completion requests forwarded ("forwarded") and the faults served.
"""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, deque
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler

from judge_fault_server import LocalServer


class FaultProxy(LocalServer):

    def __init__(self, upstream: str, faults: Iterable[str] = (), slow_s: float = 1.0):
        super().__init__(_Handler)
        self.upstream = upstream.removesuffix("/v1").rstrip("/")
        self.faults: deque[str] = deque(faults)
        self.slow_s, self.down = slow_s, False
        self.contaminate: tuple[str, str] | None = None
        self.hold_s = 0.2
        self.in_flight: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def next_fault(self) -> str | None:
        with self._lock:
            if self.down:
                return "500"
            return self.faults.popleft() if self.faults else None


class _Handler(BaseHTTPRequestHandler):
    server: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _forward(self, body: bytes | None) -> tuple[int, bytes, dict[str, str]]:
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "authorization")}
        req = urllib.request.Request(self.server.upstream + self.path, data=body, method=self.command, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read(), {"Content-Type": r.headers.get("Content-Type", "application/json")}
        except urllib.error.HTTPError as e:
            return e.code, e.read(), {}

    def _contaminated(self, body: bytes) -> tuple[int, bytes, dict[str, str]]:
        victim, culprit = self.server.contaminate  # type: ignore[misc]
        request = json.loads(body)
        model = request.get("model")
        with self.server._lock:
            self.server.in_flight[model] += 1
        try:
            time.sleep(self.server.hold_s)
            with self.server._lock:
                mixed = model == victim and self.server.in_flight[culprit] > 0
            if mixed:
                self.server.counts["contaminated"] += 1
                request["model"] = culprit
            status, data, headers = self._forward(json.dumps(request).encode())
            if mixed:  # the reply still names the model asked for, as the real bug's does
                data = data.replace(f'"model":"{culprit}"'.encode(), f'"model":"{victim}"'.encode())
            return status, data, headers
        finally:
            with self.server._lock:
                self.server.in_flight[model] -= 1

    def do_GET(self) -> None:
        self._reply(*self._forward(None))

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        fault = self.server.next_fault() if self.path.startswith("/v1/completions") else None
        if fault is not None:
            self.server.counts[fault] += 1
        if fault == "429":
            return self._reply(429, b'{"error": {"message": "slow down"}}', {"Retry-After": "0"})
        if fault == "500":
            return self._reply(500, b'{"error": {"message": "boom"}}')
        if fault == "drop":
            self.close_connection = True
            self.connection.close()
            return None
        if fault == "garbage":
            return self._reply(200, b"<html>not json</html>")
        if self.path.startswith("/v1/completions"):
            self.server.counts["forwarded"] += 1
            if self.server.contaminate:
                return self._reply(*self._contaminated(body))
        status, data, headers = self._forward(body)
        if fault == "slow":
            time.sleep(self.server.slow_s)
        return self._reply(status, data, headers)

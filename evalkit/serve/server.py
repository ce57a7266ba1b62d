"""Loading what is served, and running the app under uvicorn (blocking, or from a thread)."""
from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import uvicorn

from evalkit.backends.hf import HFBackend
from evalkit.errors import ConfigError
from evalkit.models.adapters import AdapterInfo, inspect_adapter
from evalkit.models.base import BaseSpec, ResolvedBase, load_tokenizer, resolve_base
from evalkit.serve.app import Api
from evalkit.serve.engine import BASE, Engine
from evalkit.serve.protocol import Limits
from evalkit.types import stable_hash


def parse_base(ref: str) -> BaseSpec:
    """A command-line base: a .gguf file or pkg: resource, a local model folder, else a hub id."""
    if ref.startswith("pkg:") or ref.lower().endswith(".gguf"):
        return BaseSpec.of("gguf", ref)
    if Path(ref).expanduser().is_dir():
        return BaseSpec.of("path", ref)
    return BaseSpec.of("id", ref)


def _resolve(base: BaseSpec | ResolvedBase | str) -> ResolvedBase:
    if isinstance(base, ResolvedBase):
        return base
    return resolve_base(base if isinstance(base, BaseSpec) else parse_base(base))


def load_engine(base: BaseSpec | ResolvedBase | str, adapters: Mapping[str, str | Path], *,
                quantize: str | None = None, log: Callable[[str], None] = print, **engine_options: Any) -> Engine:
    """The base loaded once, each adapter attached by name (the hf backend owns the loading), and
    the engine that serves them."""
    if BASE in adapters:
        raise ConfigError(f"'{BASE}' names the model without adapters; give the adapter another name")
    infos = {name: inspect_adapter(Path(path)) for name, path in adapters.items()}  # fail before loading
    resolved = _resolve(base)
    hf = HFBackend(resolved, load_tokenizer(resolved), log=lambda message: log(f"evalkit serve: {message}"))
    model, tokenizer = hf.shared_model(quantize, infos), hf.tokenizer
    roots = {BASE: str(resolved.spec.ref), **{name: str(info.path) for name, info in infos.items()}}
    return Engine(model, tokenizer, list(infos), fingerprints=_fingerprints(resolved, infos, quantize), roots=roots,
                  **engine_options)


def _fingerprints(resolved: ResolvedBase, infos: Mapping[str, AdapterInfo], quantize: str | None) -> dict[str, str]:
    """What answers under each name, from the hashes already computed: the base (and its
    quantization), and for an adapter its own hash with its base's. A hub id's hash is only its
    name@revision, not content: then nothing is claimed."""
    if resolved.spec.kind == "id":
        return {}
    base = resolved.sha256 if quantize is None else stable_hash([resolved.sha256, quantize])
    return {BASE: base, **{name: stable_hash([base, info.sha256]) for name, info in infos.items()}}


class EvalkitServer:
    """A bound, not yet serving server: `.start()` serves from a thread (tests, notebooks) until
    `.close()`; `.serve_forever()` blocks until SIGINT/SIGTERM."""

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 8000, *, limits: Limits | None = None,
                 api_key: str | None = None, log: Callable[[str], None] = print, owns_engine: bool = True):
        self.engine, self.log, self.owns_engine = engine, log, owns_engine
        self.api = Api(engine, limits=limits or Limits(), api_key=api_key, say=log)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self._socket.bind((host, port))
        except OSError as e:
            self._socket.close()
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e})",
                              hint="is another server on that port? pick one with --port") from None
        config = uvicorn.Config(self.api.app(), log_level="warning", access_log=False, lifespan="off", ws="none",
                                timeout_graceful_shutdown=2, limit_concurrency=1024)
        self._uvicorn = _Uvicorn(config, engine.close if owns_engine else None)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._socket.getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"

    @property
    def counts(self) -> dict[str, int]:
        return self.api.counts

    def serve_forever(self) -> None:
        self._uvicorn.run(sockets=[self._socket])

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.serve_forever, name="evalkit-serve", daemon=True)
        self._thread.start()
        while not self._uvicorn.started and self._thread.is_alive():
            self._thread.join(0.01)
        return self._thread

    def close(self) -> None:
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        if self.owns_engine:
            self.engine.close()
        self._socket.close()


class _Uvicorn(uvicorn.Server):
    """uvicorn's Server, stopping the engine first on shutdown: running requests then end at
    once with 503 instead of holding the graceful shutdown until they finish."""

    def __init__(self, config: uvicorn.Config, stop_engine: Callable[[], None] | None):
        super().__init__(config)
        self.stop_engine = stop_engine

    async def shutdown(self, sockets: Any = None) -> None:
        if self.stop_engine is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.stop_engine)
        await super().shutdown(sockets)


def make_server(base: BaseSpec | ResolvedBase | str | None = None, adapters: Mapping[str, str | Path] | None = None,
                host: str = "127.0.0.1", port: int = 8000, *, engine: Engine | None = None,
                api_key_env: str | None = None, quantize: str | None = None, limits: Limits | None = None,
                log: Callable[[str], None] = print, **engine_options: Any) -> EvalkitServer:
    """A bound server (port 0 picks a free port). Pass a loaded `engine` to share a model: it is
    then the caller's to close."""
    import os

    key = None
    owns_engine = engine is None
    if api_key_env:
        key = os.environ.get(api_key_env)
        if not key:
            raise ConfigError(f"environment variable {api_key_env} is not set (--api-key-env)")
    if engine is None:
        if base is None:
            raise ConfigError("make_server needs a base model (or an engine)")
        engine = load_engine(base, adapters or {}, quantize=quantize, log=log, **engine_options)
    return EvalkitServer(engine, host, port, limits=limits, api_key=key, log=log, owns_engine=owns_engine)


def serve(server: EvalkitServer) -> int:
    """Serve until Ctrl-C or SIGTERM; either is a normal stop (exit 0)."""
    logging.getLogger("evalkit.serve").addHandler(logging.StreamHandler())
    # uvicorn handles both signals, then re-raises the one it caught once it has shut down
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.log(f"evalkit serve: {server.url}  models: {', '.join(server.engine.names)}  (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        server.log("evalkit serve: stopped")
    return 0

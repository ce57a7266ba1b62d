"""`evalkit serve ...` on the command line."""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

from evalkit.errors import ConfigError
from evalkit.models.base import BaseSpec, ResolvedBase, resolve_base
from evalkit.serve.protocol import Limits


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
    limits = p.add_argument_group("limits")
    limits.add_argument("--max-tokens-cap", type=int, default=Limits.max_tokens_cap,
                        help="upper bound on a request's max_tokens (default %(default)s)")
    limits.add_argument("--max-model-len", type=int, help="context window to enforce (default: the model's)")
    limits.add_argument("--max-body-mb", type=float, default=Limits.max_body_bytes / 2**20,
                        help="largest request body accepted, in MiB (default %(default)s); larger is a 413")
    limits.add_argument("--request-timeout", type=float, default=Limits.request_timeout_s, metavar="SECONDS",
                        help="a request still running after this fails with 504 (default %(default)s)")
    limits.add_argument("--max-batch", type=int, default=32, help="most sequences in one forward pass (default 32)")
    limits.add_argument("--batch-window-ms", type=float, default=20.0,
                        help="how long the first waiting request waits for others to share its batch (default 20)")


def _suite_models(suite_path: str, log: Callable[[str], None]) -> tuple[BaseSpec, Path, dict[str, Path]]:
    """A suite's base and the adapters of its variants (trained ones only; nothing is trained here)."""
    from evalkit.config import load_suite

    suite = load_suite(suite_path)
    adapters: dict[str, Path] = {}
    for v in suite.variants:
        path = v.adapter
        if v.sweep is not None:
            log(f"evalkit serve: skipping variant '{v.name}': a sweep's trials are not served from a suite "
                f"(give one with --adapter NAME=FOLDER: they are in the trials/ folder beside the recipe's output)")
            continue
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
    from evalkit.serve.server import make_server, serve

    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="evalkit serve")
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
    for flag, value in (("--max-tokens-cap", args.max_tokens_cap), ("--max-body-mb", args.max_body_mb),
                        ("--request-timeout", args.request_timeout), ("--max-batch", args.max_batch)):
        if value <= 0:
            raise ConfigError(f"{flag} must be positive, got {value}")
    limits = Limits(max_body_bytes=int(args.max_body_mb * 2**20), request_timeout_s=args.request_timeout,
                    max_tokens_cap=args.max_tokens_cap)
    server = make_server(base, adapters, args.host, args.port, api_key_env=args.api_key_env, quantize=args.quantize,
                         limits=limits, max_batch=args.max_batch, window_s=args.batch_window_ms / 1000,
                         max_model_len=args.max_model_len)
    return serve(server)

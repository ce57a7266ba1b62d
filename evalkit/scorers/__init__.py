"""Scorer registry: pure functions of (case, output) -> Score, named in YAML by `type` plus params.

A scorer is a plain function `fn(case, output, *, param=default, ...) -> Score` registered with
`@register(...)`. `build(name, params)` checks the params against the signature and binds them.
"""
from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any

from evalkit.errors import ConfigError, did_you_mean
from evalkit.fileio import read_json
from evalkit.scorers.registry import REGISTRY, ScorerDef
from evalkit.types import Scorer


def _ensure_loaded() -> None:
    from evalkit.scorers import structured, text  # noqa: F401  (registers the built-ins)


def get(name: str) -> ScorerDef:
    _ensure_loaded()
    if name not in REGISTRY:
        raise ConfigError(f"unknown scorer '{name}'{did_you_mean(name, REGISTRY)}")
    return REGISTRY[name]


def build(name: str, params: dict[str, Any], base_dir: Path | None = None) -> Scorer:
    """Bind validated params; path params are read here (the edge), so scoring stays pure."""
    sdef = get(name)
    allowed = sdef.params()
    bound: dict[str, Any] = {}
    for key, value in params.items():
        if key not in allowed:
            raise ConfigError(f"scorer '{name}' has no parameter '{key}'{did_you_mean(key, allowed)}")
        if key in sdef.path_params and isinstance(value, str):
            path = Path(value) if base_dir is None else (base_dir / value)
            try:
                value = read_json(path)
            except ConfigError as e:  # located in the suite by the caller: name the JSON file here
                raise ConfigError(f"{path}:{e.line}: {e.message}" if e.file else e.message) from None
        bound[key] = value
    missing = [n for n, p in allowed.items() if p.default is inspect.Parameter.empty and n not in bound]
    if missing:
        raise ConfigError(f"scorer '{name}' needs parameter(s): {', '.join(missing)}")
    fn = functools.partial(sdef.fn, **bound)
    functools.update_wrapper(fn, sdef.fn)
    _dry_run(fn)
    return fn


def _dry_run(fn: Scorer) -> None:
    """Call the scorer once on an empty case so bad params (a broken regex, an invalid schema)
    fail at config load, where the error can name the suite line, not mid-run."""
    from evalkit.types import Case, Output

    try:
        fn(Case(id="dry-run", prompt="", target=""), Output(text=""))
    except ConfigError:
        raise
    except Exception:
        pass

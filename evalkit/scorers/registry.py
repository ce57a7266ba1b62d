"""The registry the scorers add themselves to (`@register(...)`): a leaf, so a scorer module need not
import the package that loads it."""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ScorerDef:
    name: str
    fn: Callable[..., Any]
    primary: str | None = None  # param filled by the shorthand `{name: value}`
    binary: bool = True  # values are 0/1: exact intervals and Tango paired tests apply
    path_params: frozenset[str] = field(default_factory=frozenset)  # YAML value is a JSON file path
    needs_target: bool = False  # compares with each case's `target` (a row without one is refused at load)
    target_param: str | None = None  # a parameter that, when given, stands in for the target

    def uses_target(self, params: Mapping[str, Any]) -> bool:
        return self.needs_target and (self.target_param is None or params.get(self.target_param) is None)

    def params(self) -> dict[str, inspect.Parameter]:
        return {n: p for n, p in inspect.signature(self.fn).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}


REGISTRY: dict[str, ScorerDef] = {}


def register(name: str, *, primary: str | None = None, binary: bool = True,
             path_params: tuple[str, ...] = (), needs_target: bool = False, target_param: str | None = None):
    def deco(fn):
        REGISTRY[name] = ScorerDef(name, fn, primary, binary, frozenset(path_params), needs_target, target_param)
        return fn
    return deco

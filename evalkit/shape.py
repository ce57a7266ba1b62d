"""Typed configuration shapes: one pydantic model per shape (suite, variant, task kind, gate,
judge endpoint, recipe) gives validation, defaults, the shipped JSON Schema and located errors.

Every shape derives from `Shape`: frozen, strict types (YAML `"5"` is not the integer 5), unknown
keys refused with a suggestion. A validator that finds a semantic mistake raises `invalid(...)`,
which may point below the shape's own place (`at=("scorers", 1)`); `located_error` turns pydantic's
errors into evalkit's `FILE:LINE PATH: message` using the YAML line map.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, ValidationInfo, model_validator
from pydantic_core import PydanticCustomError

from evalkit.errors import ConfigError, YamlPath, did_you_mean, located

_INVALID = "evalkit"


def invalid(message: str, *, at: YamlPath = (), hint: str | None = None) -> PydanticCustomError:
    """A semantic error inside a validator, `at` a path below the shape being validated."""
    # the text travels in the context: pydantic would read braces in user text as format fields
    return PydanticCustomError(_INVALID, "{message}", {"message": message, "at": list(at), "hint": hint})


class Shape(BaseModel):
    """A configuration mapping: frozen, strict, closed."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid", arbitrary_types_allowed=True)
    # YAML keys the shape accepts besides its fields (none by default)
    extra_keys: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            allowed = [f.alias or n for n, f in cls.model_fields.items()] + list(cls.extra_keys)
            for key in data:
                if key not in allowed:
                    raise invalid(f"unknown key '{key}'{did_you_mean(str(key), allowed)}", at=(key,))
        return data


def context_dir(info: ValidationInfo) -> Path:
    """The folder relative paths resolve against (the suite's or recipe's), else the cwd."""
    ctx = info.context or {}
    return Path(ctx.get("base_dir") or Path.cwd())


def resolve(info: ValidationInfo, value: str | Path) -> Path:
    """`value` against the context's folder; a path no file can have is refused (a NUL byte, or
    `~user` for a user this machine does not know)."""
    try:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (context_dir(info) / p).resolve()
    except (RuntimeError, ValueError, OSError) as e:
        raise invalid(f"not a usable path: {shown(str(value), 80)} ({e})") from None


def shown(value: Any, limit: int = 300) -> str:
    """A user's value in an error message: its repr, cut when long; an integer past Python's
    4300-digit limit for printing (YAML's hex `0xfff...` makes them) is named, not printed."""
    try:
        text = repr(value)
    except ValueError:
        return f"an integer of {value.bit_length()} bits" if isinstance(value, int) else f"a huge {type(value).__name__}"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def existing(what: str, folder: bool = False) -> BeforeValidator:
    """A path field resolved against the context's folder that must exist: `{what} not found: PATH`."""
    def check(value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, str | Path):
            return value  # the type check reports it
        path = resolve(info, value)
        try:
            found = path.is_dir() if folder else path.is_file()
        except OSError as e:  # a name longer than the file system allows
            raise invalid(f"{what} not found: {e.strerror}: {shown(str(path), 80)}") from None
        if not found:
            raise invalid(f"{what} not found: {path}")
        return path
    return BeforeValidator(check)


# a path field resolved against the context's folder, which need not exist (an output)
resolved = BeforeValidator(lambda value, info: resolve(info, value) if isinstance(value, str) else value)


# ---------------------------------------------------------------- errors

_EXPECTED = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
             "list": "a list", "tuple": "a list", "dict": "a mapping", "model": "a mapping",
             "dataclass": "a mapping"}
_BOUNDS = {"greater_than": (">", "gt"), "greater_than_equal": (">=", "ge"), "less_than": ("<", "lt"),
           "less_than_equal": ("<=", "le")}


def yaml_path(loc: Sequence[str | int], data: Any) -> YamlPath:
    """pydantic's location, minus what is not a YAML key or index (union tags, validator names)."""
    out: list[str | int] = []
    for part in loc:
        if isinstance(data, list):
            if not (isinstance(part, int) and 0 <= part < len(data)):
                continue
            data = data[part]
        elif isinstance(data, Mapping) and part in data:
            data = data[part]
        else:
            continue
        out.append(part)
    return tuple(out)


def _message(err: Mapping[str, Any]) -> tuple[str, str | None]:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == _INVALID:
        return err["msg"], ctx.get("hint")
    if kind == "missing":
        return "missing required key", None
    if kind == "literal_error":
        choices = [c.strip("'") for c in ctx.get("expected", "").replace(" or ", ", ").split(", ")]
        close = did_you_mean(value, choices) if isinstance(value, str) else ""
        return f"{shown(value)} is not one of: {', '.join(choices)}" + (close if "did you mean" in close else ""), None
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        return f"unknown kind {ctx.get('tag')!r}; expected one of: {ctx.get('expected_tags', '')}", None
    if kind in _BOUNDS:
        op, key = _BOUNDS[kind]
        return f"must be {op} {ctx.get(key)}, got {shown(value)}", None
    head = kind.split("_")[0]
    if kind.endswith(("_type", "_parsing")) and head in _EXPECTED:
        return f"expected {_EXPECTED[head]}, got {shown(value)}", None
    if kind == "is_instance_of":  # a Path field given a number, a list, ...
        expected = "a path (a string)" if ctx.get("class") in ("Path", "PosixPath") else f"a {ctx.get('class')}"
        return f"expected {expected}, got {shown(value)}", None
    if kind == "string_pattern_mismatch":
        return f"{shown(value)} does not match the pattern {ctx.get('pattern')}", None
    return err["msg"], None


def error_parts(e: ValidationError, data: Any) -> tuple[YamlPath, str, str | None]:
    """The most useful of pydantic's errors as (YAML path, message, hint): an unknown key first
    (the commonest mistake), then the deepest (of a union's alternatives, the one that got
    furthest), then the first in document order."""
    errors = e.errors(include_url=False)
    unknown = [x for x in errors if x["type"] == _INVALID and str(x["msg"]).startswith("unknown key")]
    candidates = unknown or errors
    paths = [_path(x, data) for x in candidates]
    i = max(range(len(candidates)), key=lambda j: len(paths[j]))
    path, (message, hint) = paths[i], _message(candidates[i])
    expected = [_EXPECTED[x["type"].split("_")[0]] for x, p in zip(candidates, paths)
                if p == path and x["type"].endswith("_type") and x["type"].split("_")[0] in _EXPECTED]
    if len(set(expected)) > 1:  # a union's alternatives at one place: name them all
        message = f"expected {' or '.join(dict.fromkeys(expected))}, got {shown(candidates[i].get('input'))}"
    return path, message, hint


def _path(err: Mapping[str, Any], data: Any) -> YamlPath:
    path = yaml_path(err["loc"], data)
    if err["type"] == _INVALID:
        path += tuple((err.get("ctx") or {}).get("at") or ())
    elif err["type"] in ("union_tag_invalid", "missing"):  # name the key (its line: the mapping's)
        path += ("kind",) if err["type"] == "union_tag_invalid" else (err["loc"][-1],)
    return path


def located_error(e: ValidationError, data: Any, file: str | Path | None, lines: Mapping[YamlPath, int],
                  prefix: YamlPath = ()) -> ConfigError:
    """pydantic's error as evalkit's `FILE:LINE PATH: message` ConfigError."""
    path, message, hint = error_parts(e, data)
    return located(message, file, lines, prefix + path, hint)


S = TypeVar("S", bound=BaseModel)


def parse(shape: type[S], data: Any, *, file: str | Path | None = None, lines: Mapping[YamlPath, int] | None = None,
          base_dir: Path | None = None, prefix: YamlPath = ()) -> S:
    """Validate `data` as `shape`; a mistake is a ConfigError located in `file` (if given)."""
    try:
        return shape.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as e:
        raise located_error(e, data, file, lines or {}, prefix) from None

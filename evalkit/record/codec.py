"""The run record's JSON codec: parsed JSON to the record's types and back.

`decode` reads any record type from parsed JSON, naming the path of whatever does not fit
(`gates[2].passed`); `to_jsonable` writes one as strict JSON. Both are driven by the types' fields
alone, so they know nothing of any one record; fields marked transient (how a record was read) are
neither read nor written.
"""
from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping
from functools import cache
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

# ---- reading: JSON -> types, with the path of whatever does not fit

class RecordError(ValueError):
    """A results.json object that does not fit the record; the message names where (`gates[2].passed`)."""


def decode(tp: Any, value: Any, where: str = "") -> Any:
    """`value` (parsed JSON) as an instance of `tp`: dataclasses from objects (unknown keys ignored,
    missing ones defaulted when the type has a default), tuples from arrays, numbers checked
    (an integral float is an int, a non-finite float where null is allowed is null)."""
    if tp is Any:
        return value
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, float) and not math.isfinite(value) and type(None) in args):
            if type(None) in args:
                return None
            raise RecordError(f"{where or 'record'}: expected {_name(tp)}, got null")
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return decode(arg, value, where)
            except RecordError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else RecordError(f"{where}: expected {_name(tp)}, got {value_kind(value)}")
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise RecordError(f"{where}: expected one of {', '.join(map(repr, args))}, got {_short(value)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise RecordError(f"{where}: expected an array, got {value_kind(value)}")
        return tuple(decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is Mapping:
        if not isinstance(value, Mapping):
            raise RecordError(f"{where}: expected an object, got {value_kind(value)}")
        return {str(k): decode(args[1], v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _decode_object(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"the record has a field type decode does not know: {tp!r}")
    raise RecordError(f"{where}: expected {_name(tp)}, got {value_kind(value)}")


def _decode_object(cls: type, value: Any, where: str) -> Any:
    if not isinstance(value, Mapping):
        raise RecordError(f"{where or 'record'}: expected an object, got {value_kind(value)}")
    hints = field_types(cls)
    kwargs = {}
    for f in record_fields(cls):
        here = f"{where}.{f.name}" if where else f.name
        if f.name in value:
            kwargs[f.name] = decode(hints[f.name], value[f.name], here)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecordError(f"{here}: missing")
    return cls(**kwargs)


@cache
def field_types(cls: type) -> dict[str, Any]:
    """A record type's fields' types, resolved (the annotations are strings)."""
    return get_type_hints(cls)


def record_fields(cls: type) -> list[dataclasses.Field]:
    """A record type's fields as results.json holds them (transient ones left out)."""
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("transient")]


def _name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_name(a) for a in get_args(tp))
    if origin is tuple:
        return "an array"
    if origin is Mapping:
        return "an object"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def value_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {_short(value)}"
    return "an array" if isinstance(value, (list, tuple)) else "an object" if isinstance(value, Mapping) \
        else type(value).__name__


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- writing: types -> JSON

def to_jsonable(o: Any) -> Any:
    """A JSON-safe copy: records as objects (transient fields left out), tuples as arrays, NaN and
    infinities as null (strict JSON has no NaN), paths and other objects as strings."""
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return {f.name: to_jsonable(getattr(o, f.name)) for f in record_fields(type(o))}
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, Mapping):
        return {str(k): to_jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [to_jsonable(v) for v in o]
    if o is None or isinstance(o, (str, int, bool)):
        return o
    return str(o)


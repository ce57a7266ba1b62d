"""The JSON Schema of results.json, generated from the record's types.

The schema shipped in evalkit/schemas/results.schema.json is this generator's output:
`python -m evalkit.record --schema --write` regenerates it; a test checks the shipped file is the
generated one. Each field's description comes from its `doc` metadata, each object's from its
class docstring.
"""
from __future__ import annotations

import dataclasses
import json
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from evalkit.record.codec import field_types, record_fields
from evalkit.record.types import RunRecord
from evalkit.record.versions import SCHEMA_VERSION

SCHEMA_FILE = Path(__file__).parent.parent / "schemas" / "results.schema.json"


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the results.json this evalkit writes."""
    defs: dict[str, Any] = {}
    root = _object_schema(RunRecord, defs)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://evalkit.dev/schemas/results-{SCHEMA_VERSION}.json",
            "title": "evalkit run record (results.json)",
            **root,
            "$defs": dict(sorted(defs.items()))}


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


def _object_schema(cls: type, defs: dict[str, Any]) -> dict[str, Any]:
    hints = field_types(cls)
    props = {}
    for f in record_fields(cls):
        prop = _type_schema(hints[f.name], defs) | f.metadata.get("schema", {})
        if f.metadata.get("doc"):
            prop["description"] = f.metadata["doc"]
        props[f.name] = prop
    doc = " ".join((cls.__doc__ or "").split())
    return {"description": doc, "type": "object", "required": list(props), "additionalProperties": False,
            "properties": props}


def _type_schema(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    if tp is Any:
        return {}
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1 or len(args) != 2:
            return {"anyOf": [_type_schema(a, defs) for a in args]}
        sub = _type_schema(inner[0], defs)
        if isinstance(sub.get("type"), str):
            return sub | {"type": [sub["type"], "null"]}
        if "enum" in sub:
            return {"enum": [*sub["enum"], None]}
        return {"anyOf": [sub, {"type": "null"}]}
    if origin is Literal:
        return {"enum": list(args)}
    if origin is tuple:
        return {"type": "array", "items": _type_schema(args[0], defs)}
    if origin is Mapping:
        values = _type_schema(args[1], defs)
        return {"type": "object", "additionalProperties": values} if values else {"type": "object"}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if tp.__name__ not in defs:
            defs[tp.__name__] = {}  # placeholder: a type met again while being described
            defs[tp.__name__] = _object_schema(tp, defs)
        return {"$ref": f"#/$defs/{tp.__name__}"}
    names = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}
    if tp in names:
        return {"type": names[tp]}
    raise TypeError(f"no JSON Schema for {tp!r}")


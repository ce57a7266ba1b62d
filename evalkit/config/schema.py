"""The JSON Schema shipped for editors, generated from the typed shapes.

    python -m evalkit.config.schema     # rewrite evalkit/config/suite.schema.json
    python -m trainers.schema           # rewrite trainers/recipe.schema.json (trainers builds on this, not back)

A test regenerates them and compares, so the shipped files cannot drift from the types.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from evalkit.config.suite import Suite

HERE = Path(__file__).parent
REPO_FILES = HERE.parents[1]

# file (relative to the package root) -> (shape, $id, title)
Schemas = Mapping[str, tuple[Callable[[], type[BaseModel]], str, str]]
SCHEMAS: Schemas = {
    "evalkit/config/suite.schema.json": (lambda: Suite, "https://evalkit.dev/schemas/suite-1.json", "evalkit suite"),
}


def generate(shape: type[BaseModel], schema_id: str, title: str) -> dict[str, Any]:
    schema = shape.model_json_schema(mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": schema_id, **schema, "title": title}


def dump(schema: Mapping[str, Any]) -> str:
    return json.dumps(schema, indent=2) + "\n"


def render(name: str) -> str:
    shape, schema_id, title = SCHEMAS[name]
    return dump(generate(shape(), schema_id, title))


def write(schemas: Schemas, render: Callable[[str], str]) -> int:
    for name in schemas:
        (REPO_FILES / name).write_text(render(name))
        print(f"wrote {REPO_FILES / name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(write(SCHEMAS, render))

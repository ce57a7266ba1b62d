"""The JSON Schemas shipped for editors, generated from the typed shapes.

    python -m evalkit.config.schema     # rewrite suite.schema.json and trainers/recipe.schema.json

A test regenerates them and compares, so the shipped files cannot drift from the types.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from evalkit.config.suite import Suite

HERE = Path(__file__).parent
REPO_FILES = HERE.parents[1]


def _recipe() -> type[BaseModel]:
    from trainers.recipe import Recipe  # the bundled runners' shape; trainers depends on evalkit, not back

    return Recipe


def _extendable(schema: dict[str, Any]) -> dict[str, Any]:
    """A recipe may give `extends: OTHER.yml` and only the keys it changes (trainers.recipe)."""
    schema["properties"] = {"extends": {"type": "string", "description": "a recipe file (relative to this one) "
                                        "whose keys this one overrides"}, **schema["properties"]}
    schema["if"], schema["else"] = {"required": ["extends"]}, {"required": schema.pop("required", [])}
    return schema


# file (relative to the package root) -> (shape, $id, title)
SCHEMAS: dict[str, tuple[Callable[[], type[BaseModel]], str, str]] = {
    "evalkit/config/suite.schema.json": (lambda: Suite, "https://evalkit.dev/schemas/suite-1.json", "evalkit suite"),
    "trainers/recipe.schema.json": (_recipe, "https://evalkit.dev/schemas/recipe-1.json", "evalkit training recipe"),
}


def generate(shape: type[BaseModel], schema_id: str, title: str) -> dict[str, Any]:
    schema = shape.model_json_schema(mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": schema_id, **schema, "title": title}


def render(name: str) -> str:
    shape, schema_id, title = SCHEMAS[name]
    schema = generate(shape(), schema_id, title)
    return json.dumps(_extendable(schema) if name.startswith("trainers/") else schema, indent=2) + "\n"


def main() -> int:
    for name in SCHEMAS:
        (REPO_FILES / name).write_text(render(name))
        print(f"wrote {REPO_FILES / name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

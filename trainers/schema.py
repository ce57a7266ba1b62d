"""The recipe's JSON Schema shipped for editors, generated from `trainers.recipe.Recipe`:

    python -m trainers.schema     # rewrite trainers/recipe.schema.json

It lives here, not in `evalkit.config.schema`, because trainers builds on evalkit and not back.
"""
from __future__ import annotations

import sys
from typing import Any

from evalkit.config.schema import Schemas, dump, generate, write
from trainers.recipe import Recipe

SCHEMAS: Schemas = {
    "trainers/recipe.schema.json": (lambda: Recipe, "https://evalkit.dev/schemas/recipe-1.json", "evalkit training recipe"),
}


def _extendable(schema: dict[str, Any]) -> dict[str, Any]:
    """A recipe may give `extends: OTHER.yml` and only the keys it changes (trainers.recipe)."""
    schema["properties"] = {"extends": {"type": "string", "description": "a recipe file (relative to this one) "
                                        "whose keys this one overrides"}, **schema["properties"]}
    schema["if"], schema["else"] = {"required": ["extends"]}, {"required": schema.pop("required", [])}
    return schema


def render(name: str) -> str:
    shape, schema_id, title = SCHEMAS[name]
    return dump(_extendable(generate(shape(), schema_id, title)))


if __name__ == "__main__":
    sys.exit(write(SCHEMAS, render))

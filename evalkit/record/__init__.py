"""The run record (results.json): the one typed, versioned definition of what a run found.

The package has one module per job: `types` (the record's dataclasses, `RunRecord` at the top),
`codec` (parsed JSON to those types and back), `versions` (the schema version, its policy and the
migration of older records) and `schema` (the JSON Schema generated from the types). Here: the
names the README and the record's readers use, and `python -m evalkit.record --schema [--write]`.
"""
from __future__ import annotations

import argparse
import sys

from evalkit.record.codec import RecordError
from evalkit.record.schema import SCHEMA_FILE, json_schema, schema_text
from evalkit.record.types import GateRecord, RunRecord
from evalkit.record.versions import SCHEMA_VERSION, migrate

__all__ = ["SCHEMA_FILE", "SCHEMA_VERSION", "GateRecord", "RecordError", "RunRecord", "json_schema", "main", "migrate",
           "schema_text"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evalkit.record", description="The run record's JSON Schema.")
    p.add_argument("--schema", action="store_true", required=True, help="print the schema generated from the types")
    p.add_argument("--write", action="store_true", help="write it to evalkit/schemas/results.schema.json")
    args = p.parse_args(argv)
    text = schema_text()
    if args.write:
        SCHEMA_FILE.write_text(text, encoding="utf-8")
        print(f"wrote {SCHEMA_FILE}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0

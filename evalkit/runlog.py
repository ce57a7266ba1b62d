"""The on-disk run record: results.json (versioned schema) + samples.jsonl, written atomically."""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from evalkit.environment import environment  # noqa: F401  (the record's block; imported from here by the runner)
from evalkit.fileio import atomic_write  # the reports import it from here too

SCHEMA_VERSION = "1.1"  # 1.1: gate bounds and levels, invalid counts, Holm p, excludes_drop


@dataclass
class RunLog:
    results: dict[str, Any]
    run_dir: Path
    exit_code: int


@cache
def results_schema() -> dict[str, Any]:
    return json.loads(resources.files("evalkit.schemas").joinpath("results.schema.json").read_text())


def write_run(run_dir: Path, results: dict[str, Any], samples: Iterable[dict[str, Any]]) -> None:
    atomic_write(run_dir / "samples.jsonl", (json.dumps(clean(s), ensure_ascii=False) + "\n" for s in samples))
    atomic_write(run_dir / "results.json", [json.dumps(clean(results), indent=2, ensure_ascii=False)])


def clean(o: Any) -> Any:
    """JSON-safe copy: NaN/inf -> null (strict JSON has no NaN), paths and other objects -> str."""
    if isinstance(o, float):
        return o if o == o and o not in (float("inf"), float("-inf")) else None
    if isinstance(o, dict):
        return {str(k): clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [clean(v) for v in o]
    if o is None or isinstance(o, (str, int, bool)):
        return o
    return str(o)

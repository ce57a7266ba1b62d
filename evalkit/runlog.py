"""The run folder on disk: results.json (the record, `evalkit.record`) + samples.jsonl, written atomically."""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache, cached_property
from importlib import resources
from pathlib import Path
from typing import Any

from evalkit import environment as env
from evalkit.fileio import atomic_write  # the reports import it from here too
from evalkit.record.codec import to_jsonable
from evalkit.record.types import Environment, RunRecord


@dataclass(frozen=True)
class RunResult:
    """What `evaluate` returns: the run's record, the folder it was written to, the CLI's exit code."""

    record: RunRecord
    run_dir: Path
    exit_code: int

    @cached_property
    def results(self) -> dict[str, Any]:
        """The record as results.json holds it (plain JSON); `record` is the typed view."""
        return self.record.to_json()


@cache
def results_schema() -> dict[str, Any]:
    return json.loads(resources.files("evalkit.schemas").joinpath("results.schema.json").read_text())


def environment(device: str) -> Environment:
    """The record's `environment` block."""
    return Environment(**env.environment(device))


def write_run(run_dir: Path, record: RunRecord, samples: Iterable[dict[str, Any]]) -> None:
    atomic_write(run_dir / "samples.jsonl", (json.dumps(to_jsonable(s), ensure_ascii=False) + "\n" for s in samples))
    atomic_write(run_dir / "results.json", [json.dumps(record.to_json(), indent=2, ensure_ascii=False)])

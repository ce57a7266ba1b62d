"""The run folder on disk: results.json (the record, `evalkit.record`) + samples.jsonl, written atomically."""
from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache, cached_property
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from evalkit.record import Environment, RunRecord

PACKAGES = ("evalkit", "torch", "transformers", "peft", "trl", "bitsandbytes", "lm_eval", "datasets", "openai",
            "jsonschema", "safetensors", "accelerate")


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
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[name] = None
    return Environment(python=sys.version.split()[0], platform=platform.platform(), device=device,
                       packages=versions)


def atomic_write(path: Path, data: str | bytes | Iterable[str]) -> None:
    """Write to a temp file in the same folder, then rename: readers never see half a file, and a
    killed run leaves the previous file whole. The file gets the usual permissions (umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in [data] if isinstance(data, (str, bytes)) else data:
                f.write(chunk.encode("utf-8") if isinstance(chunk, str) else chunk)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: a run folder is shared (CI artifacts)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@cache
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_run(run_dir: Path, record: RunRecord, samples: Iterable[dict[str, Any]]) -> None:
    atomic_write(run_dir / "samples.jsonl", (json.dumps(clean(s), ensure_ascii=False) + "\n" for s in samples))
    atomic_write(run_dir / "results.json", [json.dumps(record.to_json(), indent=2, ensure_ascii=False)])


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

"""Frozen decode outputs (goldens): what a refactor of the decoder must leave unchanged.

A golden file holds, per task, variant and case of a run's generating tasks, the output text, its
token count and its finish_reason, with the sha256 over them all. `make goldens` runs the demo and
the pitfalls suite uncached and checks them against tests/fixtures/goldens/ (on the demo's trained
adapters); tests/test_goldens.py checks the cheap part on every `make test`.

    python -m tests.goldens write RUN_DIR FILE   # freeze a run's outputs
    python -m tests.goldens check RUN_DIR FILE   # exit 1 listing every case that changed
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

Outputs = dict[str, dict[str, dict[str, list[Any]]]]  # task -> variant -> case id -> [text, tokens, finish]


def digest(outputs: Any) -> str:
    return hashlib.sha256(json.dumps(outputs, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def from_run(run_dir: Path) -> Outputs:
    """The generated outputs of a run folder's samples.jsonl (tasks whose samples carry a finish_reason)."""
    out: Outputs = {}
    for line in (run_dir / "samples.jsonl").read_text(encoding="utf-8").splitlines():
        s = json.loads(line)
        meta = s.get("meta") or {}
        if "finish_reason" in meta:
            out.setdefault(s["task"], {}).setdefault(s["variant"], {})[str(s["case_id"])] = [
                s["output"], meta["output_tokens"], meta["finish_reason"]]
    return out


def load(path: Path) -> Outputs:
    return json.loads(path.read_text(encoding="utf-8"))["outputs"]


def write(path: Path, outputs: Outputs, **about: Any) -> None:
    path.write_text(json.dumps({**about, "sha256": digest(outputs), "outputs": outputs}, indent=1, sort_keys=True,
                               ensure_ascii=False) + "\n", encoding="utf-8")


def changes(before: Outputs, after: Outputs) -> list[str]:
    """Every case whose output differs, as `task/variant/case: before -> after`."""
    found = []
    for task in sorted(set(before) | set(after)):
        for variant in sorted(set(before.get(task, {})) | set(after.get(task, {}))):
            b, a = before.get(task, {}).get(variant, {}), after.get(task, {}).get(variant, {})
            found += [f"{task}/{variant}/{case}: {b.get(case)!r} -> {a.get(case)!r}"
                      for case in sorted(set(b) | set(a)) if b.get(case) != a.get(case)]
    return found


def main(argv: list[str]) -> int:
    verb, run_dir, path = argv[0], Path(argv[1]), Path(argv[2])
    outputs = from_run(run_dir)
    if verb == "write":
        write(path, outputs, run=run_dir.name)
        print(f"{path}: sha256 {digest(outputs)}")
        return 0
    before = load(path)
    diff = changes(before, outputs)
    print(f"{path}: golden sha256 {digest(before)}, this run {digest(outputs)}: {len(diff)} case(s) changed")
    for d in diff:
        print("  " + d)
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The record's schema version and the migration of older records to it.

Version policy (`schema_version` is "MAJOR.MINOR"):
- a MINOR bump only adds fields; an older 1.x reader (which ignores what it does not know) still
  reads the record;
- a MAJOR bump renames, removes or redefines a field, or adds a value to an enum;
- `RunRecord.from_json` reads every 1.x record: an older minor is migrated to this shape first
  (`migrate`: what each version lacked is filled in or derived, never guessed), a newer minor loads
  with its unknown fields ignored, another major is refused with a message.

History: 1.0 the first record. 1.1 gate bounds and levels, invalid counts, Holm p, excludes_drop.
1.2 the typed record: `reference` (the variant comparisons are made against, as the suite resolved
it) and every field written, null where it does not apply (a fully cached variant's cost).
1.3 each variant's `backend`: where it ran (engine, endpoints, served name and identity).
1.4 each task's `settings` (what its scores depend on besides the cases) and the run's `baseline`
(the promoted variant it was compared with, read from a baseline store, and the store's history).
1.5 `skipped` on checks and gates: a check that did not apply (an adapter without provenance).
1.6 each task's `rendering`: whether its prompts went through the chat template or as raw text.
1.7 each variant's `trial`: the sweep trial or kept checkpoint it is.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from evalkit.record.codec import RecordError

SCHEMA_VERSION = "1.7"  # what this evalkit writes (see the policy above)
MAJOR = int(SCHEMA_VERSION.split(".")[0])  # what it reads


def parse_version(version: Any) -> tuple[int, int]:
    try:
        major, minor = str(version).split(".")
        return int(major), int(minor)
    except ValueError:
        raise RecordError(f"schema_version {version!r} is not a MAJOR.MINOR version") from None


def migrate(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A results.json object of any 1.x version as a copy in this version's shape. Each step fills in
    what its version lacked, from what the record itself says; odd values are left for `decode` to
    report."""
    version = obj.get("schema_version")
    if version is None:
        raise RecordError("schema_version: missing")
    major, minor = parse_version(version)
    if major != MAJOR:
        raise RecordError(f"schema_version {version!r} is not supported (this evalkit reads {MAJOR}.x)")
    out = copy.deepcopy(dict(obj))
    for to_minor, step in ((1, _from_1_0), (2, _from_1_1), (3, _from_1_2)):  # 1.4 to 1.7 only added fields
        if minor < to_minor:
            step(out)
    out["schema_version"] = SCHEMA_VERSION
    return out


def _objects(r: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    items = r.get(key)
    return [x for x in items if isinstance(x, dict)] if isinstance(items, list) else []


def _from_1_0(r: dict[str, Any]) -> None:
    """1.0 -> 1.1. 1.0 dropped every pair with an invalid side and scored nothing invalid as a loss
    (the policy 1.1 calls `invalid: drop`); its comparisons named their test, not a method, and
    counted no differing pairs (for 0/1 metrics they are the lost plus the gained). Gate bounds,
    Holm p and excluded drops were not computed: they stay null."""
    for t in _objects(r, "tasks"):
        t.setdefault("invalid", "drop")
    for c in _objects(r, "comparisons"):
        c.setdefault("method", c.get("test"))
        c.setdefault("n_invalid_as_loss", 0)
        lost, gained = c.get("n_ref_only"), c.get("n_cand_only")
        if "n_nonzero" not in c and isinstance(lost, (int, float)) and isinstance(gained, (int, float)):
            c["n_nonzero"] = lost + gained


def _from_1_1(r: dict[str, Any]) -> None:
    """1.1 -> 1.2: the reference variant, by the suite loader's rule (`reference:` if the suite set
    one, else `base` when a variant has that name, else the first variant)."""
    if "reference" in r:
        return
    config = r.get("config")
    if not isinstance(config, dict):
        config = {}
    names = [v.get("name") for v in _objects(r, "variants")]
    if isinstance(config.get("reference"), str):
        r["reference"] = config["reference"]
    elif "base" in names or not names or not isinstance(names[0], str):
        r["reference"] = "base"
    else:
        r["reference"] = names[0]


def _from_1_2(r: dict[str, Any]) -> None:
    """1.2 -> 1.3: before backends every variant ran in process."""
    for v in _objects(r, "variants"):
        v.setdefault("backend", {"engine": "hf"})


"""The baseline store: promoting a run's variant into it as a bundle, and reading bundles back verified.

A store is a plain folder (a CI artifact, a git checkout):

    history.jsonl              one PromotionRecord per line, oldest first; appended to, never rewritten
    bundles/NNNN-VARIANT/      one per promotion; its files are read-only once written
        manifest.json          every other file's sha256 (its own is in the history line)
        promotion.json         the PromotionRecord
        results.json           the promoted run's record, as it was
        cases.jsonl            the variant's cases: task, case_id, prompt and target sha256, output,
                               scores, meta
"""
from __future__ import annotations

import contextlib
import dataclasses
import getpass
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from evalkit.errors import ConfigError, did_you_mean
from evalkit.fileio import atomic_write, iter_jsonl, read_jsonl
from evalkit.formatting import fmt_number
from evalkit.models.base import file_sha256
from evalkit.record.codec import RecordError, decode, to_jsonable
from evalkit.record.types import PromotionRecord, RunRecord, VariantRecord
from evalkit.types import stable_hash

HISTORY, BUNDLES, MANIFEST = "history.jsonl", "bundles", "manifest.json"
BUNDLE_FORMAT = 1


class BaselineError(ConfigError):
    """A store or bundle evalkit refuses (missing, changed after promotion) or a run that does not
    match its bundle: exit 4, with what is wrong."""


# ---------------------------------------------------------------- promoting

def promote(run_dir: Path, variant: str, store: Path, *, force: bool = False, by: str | None = None,
            now: datetime | None = None) -> PromotionRecord:
    """Write `variant` of the run in `run_dir` into `store` as a new bundle and append it to the
    store's history. Only a complete run whose gates passed, unless `force` (recorded)."""
    from evalkit.report.data import iter_samples, load_record

    run_dir, store = Path(run_dir), Path(store)
    record = load_record(run_dir)
    if record.status != "complete":
        raise BaselineError(f"{run_dir}: the run is {record.status}; only a complete run can be promoted")
    names = [v.name for v in record.variants]
    chosen = next((v for v in record.variants if v.name == variant), None)
    if chosen is None:
        raise BaselineError(f"{run_dir}: no variant '{variant}'{did_you_mean(variant, names)} "
                            f"(the run has {', '.join(names)})")
    if chosen.backend.engine == "baseline":
        raise BaselineError(f"'{variant}' is the run's promoted baseline, read from a store: promote a live variant")
    if record.verdict != "pass" and not force:
        failed = [g.id for g in record.gates if not g.passed]
        raise BaselineError(f"{run_dir}: the run's gates failed ({', '.join(failed[:5])}"
                            f"{', ...' if len(failed) > 5 else ''}); it cannot be promoted",
                            hint="--force promotes it anyway (recorded as forced in the store's history)")
    if any(t.settings is None for t in record.tasks):
        raise BaselineError(f"{run_dir}: the run was recorded by an older evalkit (results.json "
                            f"{record.source_version}), without task settings",
                            hint="rerun the suite (the cache answers it) and promote the new run")
    cases = [_case_row(s) for s in iter_samples(run_dir) if s.get("variant") == variant]
    missing = sorted({t.name for t in record.tasks} - {c["task"] for c in cases})
    if missing:
        raise BaselineError(f"{run_dir}/samples.jsonl has no cases of '{variant}' for task(s) {', '.join(missing)}")

    store.mkdir(parents=True, exist_ok=True)
    history = read_history(store)
    gated = sorted({g.metric for g in record.gates if g.metric and g.variant == variant})
    values = {f"{m.task}.{m.metric}": m.value for m in record.metrics if m.variant == variant}
    promotion = PromotionRecord(
        bundle="", promoted_at=(now or datetime.now(UTC)).isoformat(timespec="seconds"),
        by=by or os.environ.get("GITHUB_ACTOR") or _user(), run_id=record.run_id, suite=record.suite.name,
        variant=variant, verdict=record.verdict, forced=record.verdict != "pass", base_sha256=record.base.sha256,
        adapter_sha256=chosen.adapter_sha256, fingerprint=chosen.fingerprint,
        metrics=values, gated=tuple(gated))
    with tempfile.TemporaryDirectory(dir=store, prefix=".promoting-") as tmp:
        staging = Path(tmp) / "bundle"
        staging.mkdir()
        shutil.copyfile(run_dir / "results.json", staging / "results.json")
        atomic_write(staging / "cases.jsonl", (json.dumps(c, ensure_ascii=False, allow_nan=False) + "\n"
                                               for c in cases))
        bundles = store / BUNDLES
        bundles.mkdir(exist_ok=True)
        n = len(history) + 1
        while (bundles / f"{n:04d}-{variant}").exists():  # a bundle left by an unfinished promotion
            n += 1
        promotion = dataclasses.replace(promotion, bundle=f"{n:04d}-{variant}")
        atomic_write(staging / "promotion.json", json.dumps(to_jsonable(promotion), indent=2) + "\n")
        files = {p.name: file_sha256(p) for p in sorted(staging.iterdir())}
        manifest = json.dumps({"format": BUNDLE_FORMAT, "bundle": promotion.bundle, "files": files}, indent=2) + "\n"
        atomic_write(staging / MANIFEST, manifest)
        promotion = dataclasses.replace(promotion, manifest_sha256=hashlib.sha256(manifest.encode()).hexdigest())
        for p in staging.iterdir():
            p.chmod(0o444)  # immutable once written: a change is refused by the manifest anyway
        staging.rename(bundles / promotion.bundle)  # whole or not at all
    with open(store / HISTORY, "a", encoding="utf-8") as f:  # one write: a line whole or not at all
        f.write(json.dumps(to_jsonable(promotion), ensure_ascii=False) + "\n")
    return promotion


def _user() -> str:
    with contextlib.suppress(Exception):
        return getpass.getuser()
    return "unknown"


def case_hashes(prompt: Any, target: Any) -> tuple[str, str]:
    """The prompt as sent and the target, as a bundle keeps them (hashes: a case's text stays in
    the run folder it came from)."""
    return stable_hash(prompt), stable_hash(target)


def _case_row(s: Mapping[str, Any]) -> dict[str, Any]:
    prompt_sha, target_sha = case_hashes(s.get("prompt"), s.get("target"))
    return {"task": s["task"], "case_id": s["case_id"], "prompt_sha256": prompt_sha, "target_sha256": target_sha,
            "output": s.get("output", ""), "scores": s.get("scores", {}), "meta": s.get("meta", {})}


# ---------------------------------------------------------------- reading a store

def read_history(store: Path) -> list[PromotionRecord]:
    """The store's promotions, oldest first."""
    if not Path(store).is_dir():
        raise BaselineError(f"baseline store not found: {store}",
                            hint="evalkit promote RUN_DIR --variant NAME --store DIR creates one")
    path = Path(store) / HISTORY
    if not path.exists():
        return []
    out = []
    for lineno, row in iter_jsonl(path):
        try:
            out.append(decode(PromotionRecord, row))
        except RecordError as e:
            raise BaselineError(f"not a promotion: {e}", file=path, line=lineno) from None
    return out


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its promotion, the promoted run's record and the variant's cases."""

    store: Path
    promotion: PromotionRecord
    record: RunRecord
    cases: Mapping[str, Mapping[str, Mapping[str, Any]]]  # task -> case_id -> case row
    history: tuple[PromotionRecord, ...] = field(default=())

    @property
    def variant(self) -> VariantRecord:
        return next(v for v in self.record.variants if v.name == self.promotion.variant)


def open_bundle(store: Path, bundle: str | None = None) -> Bundle:
    """The store's latest bundle (or the one named), refused unless every file is the one the
    manifest lists and the manifest the one the history recorded."""
    store = Path(store)
    history = read_history(store)
    if not history:
        raise BaselineError(f"baseline store {store} has no promotion yet",
                            hint="evalkit promote RUN_DIR --variant NAME --store " + str(store))
    if bundle is None:
        promotion = history[-1]
    else:
        promotion = next((p for p in reversed(history) if p.bundle == bundle), None)  # type: ignore[assignment]
        if promotion is None:
            raise BaselineError(f"baseline store {store} has no bundle '{bundle}' "
                                f"(it has {', '.join(p.bundle for p in history)})")
    folder = store / BUNDLES / promotion.bundle
    changed = _verify(folder, promotion)
    if changed:
        raise BaselineError(f"baseline bundle {folder} was changed after promotion: {changed}; it is refused",
                            hint="restore the store from where CI keeps it, or promote again")
    record = RunRecord.from_json(json.loads((folder / "results.json").read_text(encoding="utf-8")))
    cases: dict[str, dict[str, Mapping[str, Any]]] = {}
    for _, r in read_jsonl(folder / "cases.jsonl"):
        cases.setdefault(str(r["task"]), {})[str(r["case_id"])] = r
    return Bundle(store, promotion, record, cases, tuple(history))


def _verify(folder: Path, promotion: PromotionRecord) -> str:
    """What does not match (empty when the bundle is whole)."""
    if not folder.is_dir():
        return "its folder is missing"
    try:
        manifest_bytes = (folder / MANIFEST).read_bytes()
    except OSError:
        return f"{MANIFEST} is missing"
    if hashlib.sha256(manifest_bytes).hexdigest() != promotion.manifest_sha256:
        return f"{MANIFEST} is not the one recorded in {HISTORY}"
    files = json.loads(manifest_bytes).get("files", {})
    present = {p.name for p in folder.iterdir()} - {MANIFEST}
    if extra := sorted(present - set(files)):
        return f"{', '.join(extra)} not in the manifest"
    for name, sha in files.items():
        if name not in present:
            return f"{name} is missing"
        if file_sha256(folder / name) != sha:
            return f"{name} does not match its sha256 in the manifest"
    try:
        saved = decode(PromotionRecord, json.loads((folder / "promotion.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, RecordError):
        return "promotion.json is unreadable"
    if dataclasses.replace(saved, manifest_sha256=promotion.manifest_sha256) != promotion:
        return f"promotion.json differs from its line in {HISTORY}"
    return ""


def history_lines(history: Iterable[PromotionRecord]) -> Iterator[str]:
    """`evalkit history`: one line per promotion with its gated metrics."""
    for p in history:
        metrics = "  ".join(f"{k}={fmt_number(p.metrics.get(k), '.4g')}" for k in p.gated or p.metrics)
        flag = " (forced)" if p.forced else ""
        yield (f"{p.bundle:<24} {p.promoted_at:<26} {p.by:<12} {p.suite}/{p.variant} from {p.run_id}: "
               f"{p.verdict}{flag}  {metrics}")

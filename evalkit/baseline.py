"""Promoted baselines: what is in production, paired case by case without recomputing it.

`evalkit promote RUN --variant NAME` writes that variant of a finished run into a store as an
immutable bundle; a later run with `baseline: STORE` (or `--baseline STORE`) reads it back as a
read-only variant whose per-case scores pair with the live variants' through the same statistics
as any other pair. What the scores depend on (the base, each task's settings, each case's prompt
as sent and its target) must match the bundle's, or the run stops listing what differs (exit 4),
unless the suite says `baseline_mismatch: intersect`.

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
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from evalkit.config.suite import Suite
from evalkit.errors import ConfigError, did_you_mean
from evalkit.fileio import atomic_write, iter_jsonl, read_jsonl
from evalkit.formatting import fmt_number
from evalkit.models.base import file_sha256
from evalkit.record import (
    BackendRecord,
    BaselineRecord,
    Cost,
    GateRecord,
    PromotionRecord,
    RecordError,
    RunRecord,
    VariantRecord,
    decode,
    to_jsonable,
)
from evalkit.tasks.base import SampleResult, TaskResult
from evalkit.types import Score, stable_hash

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


# ---------------------------------------------------------------- matching a run

@dataclass(frozen=True)
class TaskMatch:
    """One task's cases against the bundle's: those paired, and what is left out and why."""

    common: tuple[str, ...] = ()
    added: int = 0  # in the run, not in the bundle
    removed: int = 0  # in the bundle, not in the run
    changed: int = 0  # same id, another prompt or target
    settings: tuple[str, ...] = ()  # settings that differ: then no case pairs

    @property
    def paired(self) -> int:
        return 0 if self.settings else len(self.common)

    @property
    def dropped(self) -> int:
        return self.added + self.removed + self.changed + (len(self.common) if self.settings else 0)

    def describe(self) -> str:
        parts = [f"{k} {v} case{'s' if v != 1 else ''}" for k, v in
                 (("added", self.added), ("removed", self.removed), ("changed", self.changed)) if v]
        return "; ".join(parts + list(self.settings))


def base_difference(bundle: Bundle, suite: Suite, base_sha256: str) -> list[str]:
    """The base differs: then no case pairs, whatever the suite says."""
    if bundle.promotion.base_sha256 == base_sha256:
        return []
    return [f"base: the bundle's is {bundle.record.base.ref} (sha256 {bundle.promotion.base_sha256[:12]}), "
            f"this run's is {suite.base.ref} (sha256 {base_sha256[:12]})"]


def settings_differences(bundle: Bundle, suite: Suite) -> dict[str, list[str]]:
    """Per task, what differs before any case runs: its settings (scorers, generation, judge), or its
    absence from the bundle."""
    tasks = {t.name: t for t in bundle.record.tasks}
    per_task: dict[str, list[str]] = {}
    for t in suite.tasks:
        if t.name not in tasks:
            per_task[t.name] = [f"not in the bundle (it has {', '.join(tasks) or 'no task'})"]
        elif t.kind != tasks[t.name].kind:
            per_task[t.name] = [f"kind {t.kind} here, {tasks[t.name].kind} in the bundle"]
        else:
            per_task[t.name] = _diff(_plain(tasks[t.name].settings), _plain(t.settings()))
    return {k: v for k, v in per_task.items() if v}


def _plain(x: Any) -> Any:
    return json.loads(json.dumps(x, sort_keys=True, default=str))


def _diff(before: Any, now: Any, path: str = "") -> list[str]:
    if isinstance(before, dict) and isinstance(now, dict):
        return [d for k in sorted(set(before) | set(now))
                for d in _diff(before.get(k), now.get(k), f"{path}.{k}" if path else k)]
    if isinstance(before, list) and isinstance(now, list) and len(before) == len(now):
        return [d for i, (a, b) in enumerate(zip(before, now)) for d in _diff(a, b, f"{path}[{i}]")]
    if before == now:
        return []
    a, b = json.dumps(before), json.dumps(now)
    return [f"{path}: {a} in the bundle, {b} here" if len(a) + len(b) < 120 else f"{path} differs"]


def match_cases(bundle: Bundle, results: Mapping[str, TaskResult], settings: Mapping[str, list[str]],
                live: Iterable[str]) -> dict[str, TaskMatch]:
    """Each task's cases (as the live variants ran them) against the bundle's."""
    live = set(live)
    out = {}
    for task, tr in results.items():
        run: dict[str, tuple[str, str]] = {}
        for s in tr.samples:
            if s.variant in live and s.case_id not in run:
                run[s.case_id] = case_hashes(s.prompt, s.target)
        saved = {cid: (r["prompt_sha256"], r["target_sha256"]) for cid, r in bundle.cases.get(task, {}).items()}
        changed = [cid for cid in run if cid in saved and saved[cid] != run[cid]]
        out[task] = TaskMatch(common=tuple(cid for cid in run if saved.get(cid) == run[cid]),
                              added=sum(cid not in saved for cid in run), removed=sum(cid not in run for cid in saved),
                              changed=len(changed), settings=tuple(settings.get(task, ())))
    return out


def mismatch_error(bundle: Bundle, run_wide: list[str], per_task: Mapping[str, str]) -> str:
    lines = [f"the run does not match baseline bundle {bundle.promotion.bundle} "
             f"('{bundle.promotion.variant}' of run {bundle.promotion.run_id}):"]
    lines += [f"  - {d}" for d in run_wide] + [f"  - task {t}: {d}" for t, d in per_task.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------- the baseline as a variant of a run

def promoted_samples(bundle: Bundle, name: str, results: Mapping[str, TaskResult],
                     matches: Mapping[str, TaskMatch]) -> dict[str, list[SampleResult]]:
    """The bundle's cases that pair, as samples of the variant `name` (prompt and target as this run
    has them: they are equal by hash)."""
    out: dict[str, list[SampleResult]] = {}
    for task, tr in results.items():
        m = matches[task]
        if m.settings:
            continue
        live = {s.case_id: s for s in reversed(tr.samples)}
        rows = bundle.cases[task]  # every common case is in the bundle
        out[task] = [SampleResult(task=task, variant=name, case_id=cid, prompt=live[cid].prompt,
                                  output=rows[cid]["output"], target=live[cid].target, cached=True,
                                  scores={k: Score(v.get("value"), v.get("reason", "")) for k, v in
                                          rows[cid]["scores"].items()},
                                  meta={**rows[cid].get("meta", {}), "baseline": bundle.promotion.bundle})
                     for cid in m.common]
    return out


def variant_record(bundle: Bundle, name: str) -> VariantRecord:
    """The promoted variant as this run records it: the bundle's, renamed, that ran nowhere."""
    return dataclasses.replace(bundle.variant, name=name, cost=Cost(), backend=BackendRecord(
        engine="baseline", served={"store": str(bundle.store), "bundle": bundle.promotion.bundle,
                                   "variant": bundle.promotion.variant, "run_id": bundle.promotion.run_id}))


# ---------------------------------------------------------------- a run with a baseline

_MISMATCH_HINT = ("`baseline_mismatch: intersect` pairs the cases both sides have (a task whose settings differ "
                  "pairs none), each gate stating its counts")


@dataclass(frozen=True)
class Baseline:
    """A suite's promoted baseline during a run: its verified bundle and the tasks whose settings
    differ from the bundle's (each step refuses a mismatch unless `baseline_mismatch: intersect`)."""

    suite: Suite
    bundle: Bundle
    settings: Mapping[str, list[str]]

    @classmethod
    def open(cls, suite: Suite, log: Callable[[str], None]) -> Baseline | None:
        """Before any training or model load: the bundle, verified, and the task settings compared."""
        if suite.baseline is None:
            return None
        bundle = open_bundle(suite.baseline.store, suite.baseline.bundle)
        p = bundle.promotion
        log(f"baseline {suite.baseline.name}: bundle {p.bundle} ('{p.variant}' of run {p.run_id}, promoted "
            f"{p.promoted_at} by {p.by})")
        settings = settings_differences(bundle, suite)
        if settings and suite.baseline_mismatch == "refuse":
            raise suite.error(("baseline",), mismatch_error(bundle, [], {t: "; ".join(d) for t, d in settings.items()}),
                              hint=_MISMATCH_HINT)
        return cls(suite, bundle, settings)

    @property
    def name(self) -> str:
        assert self.suite.baseline is not None  # opened from it
        return self.suite.baseline.name

    def check_base(self, base_sha256: str) -> None:
        """Once the base resolves: another base pairs nothing, whatever the suite says."""
        if other := base_difference(self.bundle, self.suite, base_sha256):
            raise self.suite.error(("baseline",), mismatch_error(self.bundle, other, {}),
                                   hint="a bundle pairs with runs on its own base only")

    def join(self, results: dict[str, TaskResult], live: Iterable[str]) -> Joined:
        """Once the tasks ran: the bundle's cases join the results as the baseline variant's where
        they pair (same id, same prompt as sent, same target)."""
        matches = match_cases(self.bundle, results, self.settings, live)
        differ = {t: m.describe() for t, m in matches.items() if m.describe()}
        if differ and self.suite.baseline_mismatch == "refuse":
            raise self.suite.error(("baseline",), mismatch_error(self.bundle, [], differ), hint=_MISMATCH_HINT)
        for task, samples in promoted_samples(self.bundle, self.name, results, matches).items():
            results[task].samples.extend(samples)
        record = BaselineRecord(
            name=self.name, store=str(self.bundle.store), promotion=self.bundle.promotion,
            mismatch=self.suite.baseline_mismatch, cases=sum(m.paired for m in matches.values()),
            dropped=sum(m.dropped for m in matches.values()),
            differences=tuple(f"task {t}: {d}" for t, d in differ.items()), history=self.bundle.history)
        return Joined(variant_record(self.bundle, self.name), record, matches)


@dataclass(frozen=True)
class Joined:
    """A promoted baseline in a run's record: its variant, its record, and each task's pairing."""

    variant: VariantRecord
    record: BaselineRecord
    matches: Mapping[str, TaskMatch]

    def with_counts(self, g: GateRecord) -> GateRecord:
        """Under `baseline_mismatch: intersect` a gate that involves the baseline says what it stands on."""
        name = self.record.name
        match = self.matches.get(g.metric.partition(".")[0]) if g.metric else None
        if name not in (g.vs, g.variant) or match is None:
            return g
        why = f": {match.describe()}" if match.describe() else ""
        return dataclasses.replace(g, message=f"{g.message} [{name}: {match.paired} cases paired, "
                                              f"{match.dropped} dropped{why}]")


def history_lines(history: Iterable[PromotionRecord]) -> Iterator[str]:
    """`evalkit history`: one line per promotion with its gated metrics."""
    for p in history:
        metrics = "  ".join(f"{k}={fmt_number(p.metrics.get(k), '.4g')}" for k in p.gated or p.metrics)
        flag = " (forced)" if p.forced else ""
        yield (f"{p.bundle:<24} {p.promoted_at:<26} {p.by:<12} {p.suite}/{p.variant} from {p.run_id}: "
               f"{p.verdict}{flag}  {metrics}")

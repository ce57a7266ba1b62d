"""Pairing a run with its promoted baseline: the bundle's cases matched against the run's, and joined
as a variant of the run.

Before any case runs, each task's settings are compared with the bundle's; once the tasks ran, each
case is matched by id, prompt as sent and target (by hash), and the matching ones join the results
as the baseline variant's samples. A mismatch is refused unless the suite says
`baseline_mismatch: intersect`, when each gate on the baseline states what it stands on.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from evalkit.baseline.store import Bundle, case_hashes, open_bundle
from evalkit.config.suite import Suite
from evalkit.record.types import BackendRecord, BaselineRecord, Cost, GateRecord, VariantRecord
from evalkit.tasks.base import SampleResult, TaskResult
from evalkit.types import Score

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


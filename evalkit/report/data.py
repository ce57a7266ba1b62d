"""Reading a run folder and the views every output shares (HTML, Markdown, JUnit, pytest messages).

Only the standard library here: the pytest plugin formats gate failures with these helpers.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from evalkit.errors import EvalkitError, ExitCode
from evalkit.record.codec import RecordError
from evalkit.record.types import ComparisonRecord, GateRecord, RunRecord

RESULTS, SAMPLES = "results.json", "samples.jsonl"


# (task kind, metric) whose smaller values are the better ones: a drop there is an improvement
LOWER_IS_BETTER = frozenset({("drift", "kl"), ("drift", "ppl_ratio")})


def load_record(run_dir: Path) -> RunRecord:
    """The run folder's results.json as a record, whichever 1.x version wrote it."""
    path = Path(run_dir) / RESULTS
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _usage(f"not a run folder: {run_dir} (no {RESULTS})") from None
    except (OSError, ValueError) as e:
        raise _usage(f"cannot read {path}: {e}") from None
    try:
        return RunRecord.from_json(obj)
    except RecordError as e:
        raise _usage(f"cannot read {path}: {e}") from None


def iter_samples(run_dir: Path) -> Iterator[dict[str, Any]]:
    """samples.jsonl records; a torn last line (interrupted run) or a missing file yields what is there."""
    path = Path(run_dir) / SAMPLES
    if not path.exists():
        return
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                yield rec


def _usage(message: str) -> EvalkitError:
    err = EvalkitError(message)
    err.exit_code = ExitCode.USAGE_ERROR
    return err


# ---- number formatting: one style everywhere, so a value reads the same in HTML, Markdown and CI

def is_num(x: Any) -> TypeGuard[float]:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt(x: Any, digits: int = 3) -> str:
    if not is_num(x):
        return "—"
    if float(x).is_integer() and abs(x) >= 10:
        return str(int(x))
    if 0 < abs(x) < 0.01:  # small graded values (a drift canary's KL) keep their significant digits
        return f"{x:.{digits}g}"
    return f"{x:.{digits}f}" if abs(x) < 1000 else f"{x:.4g}"


def fmt_delta(x: Any, digits: int = 3) -> str:
    return fmt(x, digits) if not is_num(x) or x < 0 else "+" + fmt(x, digits)


def fmt_interval(low: Any, high: Any) -> str:
    return f"[{fmt(low)}, {fmt(high)}]" if is_num(low) and is_num(high) else ""


def fmt_p(p: Any) -> str:
    if not is_num(p):
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def fmt_p_eq(p: Any) -> str:
    """`p=0.042` or `p<0.001`, for running text."""
    text = fmt_p(p)
    return "p" + (text if text.startswith("<") else "=" + text)


# ---- gates

def gate_threshold(g: GateRecord) -> str:
    """`min 0.800`, `max_drop 2.000 vs base`, or the check's limit."""
    th = fmt(g.threshold)
    if g.kind == "max_drop" and g.vs:
        return f"max_drop {th} pts vs {g.vs}"
    return f"{g.kind} {th}" if is_num(g.threshold) else g.kind


def gate_bound(g: GateRecord) -> str:
    """`upper 95% one-sided bound 4.31 (Tango score)`, or how a gate without `confidence:` decides."""
    if not is_num(g.bound):
        return "point estimate" if g.kind in ("min", "max", "max_drop", "max_invalid") else ""
    unit = " pts of drop" if g.kind == "max_drop" else ""
    if not is_num(g.confidence):
        return f"bound {fmt(g.bound)}"
    return (f"{g.side or ''} {g.confidence:.0%} one-sided bound {fmt(g.bound)}{unit}"
            + (f" ({g.method})" if g.method else ""))


def gate_numbers(g: GateRecord) -> str:
    """The gate's numbers on one line: what a CI failure message or a pytest failure shows."""
    parts = [f"value {fmt(g.value)}"]
    if is_num(g.low) and is_num(g.high):
        conf = g.interval_confidence
        parts.append(f"{fmt_interval(g.low, g.high)}" + (f" ({conf:.0%} two-sided)" if is_num(conf) else ""))
    if bound := gate_bound(g):
        parts.append(bound)
    if g.n_invalid:
        parts.append(f"{g.n_invalid} invalid")
    parts.append(f"threshold {gate_threshold(g)}")
    if is_num(g.p_value):
        parts.append(fmt_p_eq(g.p_value))
    return ", ".join(parts)


def excludes_line(c: ComparisonRecord) -> str:
    """What a paired comparison rules out: the smallest drop its one-sided upper bound excludes
    (rounded up to 0.01 pts, so the line never claims more than the bound)."""
    head = f"{c.task}.{c.metric} {c.variant} vs {c.vs}"
    if not is_num(c.excludes_drop) or not is_num(c.excludes_level):
        return f"{head}: no valid pairs, nothing ruled out"
    nonzero = c.n_nonzero or 0
    differ = f"{nonzero} discordant pair{'s' * (nonzero != 1)}" if c.test == "tango" else f"{nonzero} differing"
    invalid = f", {c.n_invalid} invalid" if c.n_invalid else ""
    bound, level = math.ceil(round(c.excludes_drop * 1e4, 6)) / 100, f"{c.excludes_level:.0%}"
    if bound >= 100:
        what = f"rules out no drop at {level}"
    elif bound <= 0:
        what = f"rules out any drop at {level}: {c.variant} is at least {-bound:.2f} pts better"
    else:
        what = f"excludes a drop of {bound:.2f} pts or more at {level}"
    return f"{head}: with {c.n} cases and {differ}{invalid}, this run {what} ({c.method}, one-sided)"


def ruled_out(record: RunRecord) -> list[ComparisonRecord]:
    """The comparisons whose excluded drop is worth a line: those a `max_drop` gate tests, and the canary's."""
    gated = {(g.metric, g.variant, g.vs) for g in record.gates if g.kind == "max_drop"}
    canary = {t.name for t in record.tasks if t.kind in ("mmlu", "lm_eval")}
    return [c for c in record.comparisons
            if (f"{c.task}.{c.metric}", c.variant, c.vs) in gated or c.task in canary]


def gate_text(g: GateRecord) -> str:
    return f"{g.id} {'passed' if g.passed else 'FAILED'}: {g.message} ({gate_numbers(g)})"


def gate_counts(record: RunRecord) -> tuple[int, int]:
    return sum(1 for g in record.gates if g.passed), len(record.gates)


def verdict_line(record: RunRecord) -> str:
    passed, total = gate_counts(record)
    tail = "" if record.status == "complete" else f" (run {record.status})"
    return f"{record.verdict.upper()}: {passed} of {total} gates passed{tail}"


# ---- variant x metric matrix

@dataclass
class Cell:
    """One variant x metric: the metric's value and interval, the paired difference vs the reference."""

    value: float | None = None
    low: float | None = None
    high: float | None = None
    n: int | None = None
    n_invalid: int = 0
    confidence: float | None = None
    delta: float | None = None
    dlow: float | None = None
    dhigh: float | None = None
    p_value: float | None = None
    p_holm: float | None = None
    test: str = ""
    method: str = ""
    n_invalid_as_loss: int = 0
    significant: bool = False

    @property
    def direction(self) -> str:
        """"up"/"down" for a significant change (higher is better for every metric evalkit reports)."""
        if not self.significant or not is_num(self.delta) or self.delta == 0:
            return ""
        return "up" if self.delta > 0 else "down"


@dataclass
class Matrix:
    reference: str
    columns: list[tuple[str, str]]  # (task, metric), in run order
    variants: list[str]
    cells: dict[tuple[str, str, str], Cell] = field(default_factory=dict)  # (variant, task, metric)

    def cell(self, variant: str, task: str, metric: str) -> Cell | None:
        return self.cells.get((variant, task, metric))


def metric_matrix(record: RunRecord) -> Matrix:
    """Every metric of every variant; the paired difference against the reference beside it
    (comparisons against another variant a gate names are not what the matrix shows)."""
    variants = [v.name for v in record.variants]
    columns: list[tuple[str, str]] = []
    cells: dict[tuple[str, str, str], Cell] = {}
    for m in record.metrics:
        key = (m.task, m.metric)
        if key not in columns:
            columns.append(key)
        if m.variant not in variants:
            variants.append(m.variant)
        cells[(m.variant, *key)] = Cell(value=m.value, low=m.low, high=m.high, n=m.n, n_invalid=m.n_invalid,
                                        confidence=m.confidence)
    for c in record.comparisons:
        if c.vs != record.reference:
            continue
        cell = cells.setdefault((c.variant, c.task, c.metric), Cell())
        cell.delta, cell.dlow, cell.dhigh, cell.p_value, cell.p_holm = c.delta, c.low, c.high, c.p_value, c.p_holm
        cell.test, cell.method, cell.significant = c.test, c.method, c.significant
        cell.n_invalid_as_loss = c.n_invalid_as_loss
    return Matrix(record.reference, columns, variants, cells)


# ---- two runs (candidate vs baseline): unpaired, so only values and their difference

@dataclass
class BaselineRow:
    task: str
    metric: str
    variant: str
    now: Cell | None
    then: Cell | None

    @property
    def delta(self) -> float | None:
        if self.now and self.then and is_num(self.now.value) and is_num(self.then.value):
            return self.now.value - self.then.value
        return None

    @property
    def disjoint(self) -> bool:
        """Intervals that do not overlap: a conservative sign of a real change between unpaired runs."""
        a, b = self.now, self.then
        if not (a and b and is_num(a.low) and is_num(a.high) and is_num(b.low) and is_num(b.high)):
            return False
        return a.low > b.high or b.low > a.high


def baseline_rows(now: RunRecord, then: RunRecord) -> list[BaselineRow]:
    a, b = metric_matrix(now), metric_matrix(then)
    keys = [(v, t, m) for (t, m) in a.columns for v in a.variants if (v, t, m) in a.cells]
    keys += [k for k in b.cells if k not in a.cells and is_num(b.cells[k].value)]
    return [BaselineRow(t, m, v, a.cells.get((v, t, m)), b.cells.get((v, t, m))) for (v, t, m) in keys]

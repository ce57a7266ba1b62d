"""Reading a run folder and the views every output shares (HTML, Markdown, JUnit, pytest messages).

Only the standard library here: the pytest plugin formats gate failures with these helpers.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evalkit.errors import EvalkitError, ExitCode

RESULTS, SAMPLES = "results.json", "samples.jsonl"


def load_results(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / RESULTS
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _usage(f"not a run folder: {run_dir} (no {RESULTS})") from None
    except (OSError, ValueError) as e:
        raise _usage(f"cannot read {path}: {e}") from None
    major = str(results.get("schema_version", "")).split(".")[0]
    if major != "1":
        raise _usage(f"{path}: schema_version {results.get('schema_version')!r} is not supported (expected 1.x)")
    return results


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

def is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt(x: Any, digits: int = 3) -> str:
    if not is_num(x):
        return "—"
    if float(x).is_integer() and abs(x) >= 10:
        return str(int(x))
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

def reference_variant(results: dict[str, Any]) -> str:
    vs = {c.get("vs") for c in results.get("comparisons") or []}
    if len(vs) == 1:
        return str(vs.pop())
    return str((results.get("config") or {}).get("reference", "base"))


def gate_threshold(g: dict[str, Any]) -> str:
    """`min 0.800`, `max_drop 2.000 vs base`, or the check's limit."""
    kind, th = g.get("kind", ""), fmt(g.get("threshold"))
    if kind == "max_drop" and g.get("vs"):
        return f"max_drop {th} pts vs {g['vs']}"
    return f"{kind} {th}" if is_num(g.get("threshold")) else kind


def gate_bound(g: dict[str, Any]) -> str:
    """`upper 95% one-sided bound 4.31 (Tango score)`, or how a gate without `confidence:` decides."""
    if not is_num(g.get("bound")):
        return "point estimate" if g.get("kind") in ("min", "max", "max_drop", "max_invalid") else ""
    level = g.get("confidence")
    unit = " pts of drop" if g.get("kind") == "max_drop" else ""
    return (f"{g.get('side', '')} {level:.0%} one-sided bound {fmt(g['bound'])}{unit}"
            + (f" ({g['method']})" if g.get("method") else "")) if is_num(level) else f"bound {fmt(g['bound'])}"


def gate_numbers(g: dict[str, Any]) -> str:
    """The gate's numbers on one line: what a CI failure message or a pytest failure shows."""
    parts = [f"value {fmt(g.get('value'))}"]
    if is_num(g.get("low")) and is_num(g.get("high")):
        conf = g.get("interval_confidence")
        parts.append(f"{fmt_interval(g['low'], g['high'])}" + (f" ({conf:.0%} two-sided)" if is_num(conf) else ""))
    if bound := gate_bound(g):
        parts.append(bound)
    if g.get("n_invalid"):
        parts.append(f"{g['n_invalid']} invalid")
    parts.append(f"threshold {gate_threshold(g)}")
    if is_num(g.get("p_value")):
        parts.append(fmt_p_eq(g["p_value"]))
    return ", ".join(parts)


def excludes_line(c: dict[str, Any]) -> str:
    """What a paired comparison rules out: the smallest drop its one-sided upper bound excludes
    (rounded up to 0.01 pts, so the line never claims more than the bound)."""
    head = f"{c['task']}.{c['metric']} {c['variant']} vs {c['vs']}"
    if not is_num(c.get("excludes_drop")):
        return f"{head}: no valid pairs, nothing ruled out"
    differ = (f"{c['n_nonzero']} discordant pair{'s' * (c['n_nonzero'] != 1)}" if c["test"] == "tango"
              else f"{c['n_nonzero']} differing")
    invalid = f", {c['n_invalid']} invalid" if c.get("n_invalid") else ""
    bound, level = math.ceil(round(c["excludes_drop"] * 1e4, 6)) / 100, f"{c['excludes_level']:.0%}"
    if bound >= 100:
        what = f"rules out no drop at {level}"
    elif bound <= 0:
        what = f"rules out any drop at {level}: {c['variant']} is at least {-bound:.2f} pts better"
    else:
        what = f"excludes a drop of {bound:.2f} pts or more at {level}"
    return f"{head}: with {c['n']} cases and {differ}{invalid}, this run {what} ({c['method']}, one-sided)"


def ruled_out(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The comparisons whose excluded drop is worth a line: those a `max_drop` gate tests, and the canary's."""
    gated = {(g.get("metric"), g.get("variant"), g.get("vs")) for g in results.get("gates") or []
             if g.get("kind") == "max_drop"}
    canary = {t.get("name") for t in results.get("tasks") or [] if t.get("kind") == "mmlu"}
    return [c for c in results.get("comparisons") or []
            if (f"{c.get('task')}.{c.get('metric')}", c.get("variant"), c.get("vs")) in gated
            or c.get("task") in canary]


def gate_text(g: dict[str, Any]) -> str:
    status = "passed" if g.get("passed") else "FAILED"
    return f"{g.get('id', '?')} {status}: {g.get('message', '')} ({gate_numbers(g)})"


def gate_counts(results: dict[str, Any]) -> tuple[int, int]:
    gates = results.get("gates") or []
    return sum(1 for g in gates if g.get("passed")), len(gates)


def verdict_line(results: dict[str, Any]) -> str:
    passed, total = gate_counts(results)
    verdict = str(results.get("verdict", "error")).upper()
    status = results.get("status", "")
    tail = "" if status == "complete" else f" (run {status})"
    return f"{verdict}: {passed} of {total} gates passed{tail}"


# ---- variant x metric matrix

@dataclass
class Cell:
    value: Any = None
    low: Any = None
    high: Any = None
    n: int | None = None
    n_invalid: int = 0
    confidence: Any = None
    delta: Any = None
    dlow: Any = None
    dhigh: Any = None
    p_value: Any = None
    p_holm: Any = None
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


def metric_matrix(results: dict[str, Any]) -> Matrix:
    variants = [v.get("name", "") for v in results.get("variants") or []]
    columns: list[tuple[str, str]] = []
    cells: dict[tuple[str, str, str], Cell] = {}
    for m in results.get("metrics") or []:
        key = (m.get("task", ""), m.get("metric", ""))
        if key not in columns:
            columns.append(key)
        if m.get("variant") not in variants:
            variants.append(m.get("variant", ""))
        cells[(m.get("variant", ""), *key)] = Cell(
            value=m.get("value"), low=m.get("low"), high=m.get("high"), n=m.get("n"),
            n_invalid=m.get("n_invalid", 0), confidence=m.get("confidence"))
    for c in results.get("comparisons") or []:
        cell = cells.setdefault((c.get("variant", ""), c.get("task", ""), c.get("metric", "")), Cell())
        cell.delta, cell.dlow, cell.dhigh = c.get("delta"), c.get("low"), c.get("high")
        cell.p_value, cell.test, cell.significant = c.get("p_value"), c.get("test", ""), bool(c.get("significant"))
        cell.p_holm, cell.method = c.get("p_holm"), c.get("method") or c.get("test", "")
        cell.n_invalid_as_loss = c.get("n_invalid_as_loss") or 0
    return Matrix(reference_variant(results), columns, variants, cells)


# ---- two runs (candidate vs baseline): unpaired, so only values and their difference

@dataclass
class BaselineRow:
    task: str
    metric: str
    variant: str
    now: Cell | None
    then: Cell | None

    @property
    def delta(self) -> Any:
        if self.now and self.then and is_num(self.now.value) and is_num(self.then.value):
            return self.now.value - self.then.value
        return None

    @property
    def disjoint(self) -> bool:
        """Intervals that do not overlap: a conservative sign of a real change between unpaired runs."""
        a, b = self.now, self.then
        if not (a and b and all(is_num(x) for x in (a.low, a.high, b.low, b.high))):
            return False
        return a.low > b.high or b.low > a.high


def baseline_rows(now: dict[str, Any], then: dict[str, Any]) -> list[BaselineRow]:
    a, b = metric_matrix(now), metric_matrix(then)
    keys = [(v, t, m) for (t, m) in a.columns for v in a.variants if (v, t, m) in a.cells]
    keys += [k for k in b.cells if k not in a.cells and is_num(b.cells[k].value)]
    return [BaselineRow(t, m, v, a.cells.get((v, t, m)), b.cells.get((v, t, m))) for (v, t, m) in keys]

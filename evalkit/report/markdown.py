"""A Markdown summary for `$GITHUB_STEP_SUMMARY`: verdict line, gate table, variant x metric table."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from evalkit.record import RunRecord
from evalkit.report import data
from evalkit.report.data import fmt, fmt_delta, fmt_interval, fmt_p
from evalkit.runlog import atomic_write


def _cell(text: Any) -> str:
    """Table-safe: GitHub renders inline HTML in summaries, so markup in data must stay text."""
    s = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return s.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def render_summary(record: RunRecord) -> str:
    icon = "✅" if record.verdict == "pass" else "❌"
    lines = [f"## {icon} evalkit `{_cell(record.suite.name)}`: {_cell(data.verdict_line(record))}", ""]
    if record.baseline is not None:
        lines += _vs_production(record)
    lines += [f"Run `{_cell(record.run_id)}` · reference variant `{_cell(record.reference)}`"
              " · full report: `report.html` in the run folder", ""]
    if record.gates:
        lines += ["### Gates", "", "| | Gate | Value | Threshold | Interval | p | Message |", "|---|---|---:|---|---|---:|---|"]
        lines += [_row(["⏭️" if g.skipped else "✅" if g.passed else "❌", g.id, fmt(g.value), data.gate_threshold(g),
                        fmt_interval(g.low, g.high), fmt_p(g.p_value), g.message])
                  for g in record.gates]
        lines.append("")
    m = data.metric_matrix(record)
    if m.columns:
        lines += ["### Variants × metrics", "",
                  f"Value [interval]; Δ = paired difference vs `{_cell(m.reference)}`, ▲/▼ significant.", "",
                  _row(["variant"] + [f"{t}.{metric}" for t, metric in m.columns]),
                  "|---" + "|---:" * len(m.columns) + "|"]
        for v in m.variants:
            cells = []
            for t, metric in m.columns:
                c = m.cell(v, t, metric)
                text = "—" if c is None else f"{fmt(c.value)} {fmt_interval(c.low, c.high)}".strip()
                if c is not None and data.is_num(c.delta):
                    text += f" (Δ {fmt_delta(c.delta)}{' ▲' if c.direction == 'up' else ' ▼' if c.direction == 'down' else ''})"
                cells.append(text)
            lines.append(_row([v] + cells))
        lines.append("")
    return "\n".join(lines)


def _vs_production(record: RunRecord) -> list[str]:
    """The verdict against what is in production first: the gates on the promoted baseline, then
    each paired delta."""
    b = record.baseline
    assert b is not None  # called for runs with a baseline
    gates = [g for g in record.gates if b.name in (g.vs, g.variant)]
    failed = sum(not g.passed for g in gates)
    head = ("no gate compares with it" if not gates else
            f"{'✅' if not failed else '❌'} {len(gates) - failed} of {len(gates)} gates against it pass")
    p = b.promotion
    lines = [f"**Against production** (`{_cell(b.name)}` = `{_cell(p.variant)}` of run `{_cell(p.run_id)}`, "
             f"bundle `{_cell(p.bundle)}`, promoted {_cell(p.promoted_at)}): {head}; {b.cases} cases paired, "
             f"{b.dropped} dropped.", ""]
    lines += [f"- ⚠ {_cell(d)}" for d in b.differences] + ([""] if b.differences else [])
    rows = [c for c in record.comparisons if c.vs == b.name]
    if rows:
        lines += ["| Variant | Metric | Δ vs production | Interval | p | n |", "|---|---|---:|---|---:|---:|"]
        lines += [_row([c.variant, f"{c.task}.{c.metric}", fmt_delta(c.delta), fmt_interval(c.low, c.high),
                        fmt_p(c.p_value), c.n]) for c in rows]
        lines.append("")
    return lines


def write_summary(record: RunRecord, path: Path) -> Path:
    atomic_write(path, render_summary(record))
    return Path(path)

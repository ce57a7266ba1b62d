"""A Markdown summary for `$GITHUB_STEP_SUMMARY`: verdict line, gate table, variant x metric table."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from evalkit.report import data
from evalkit.report.data import fmt, fmt_delta, fmt_interval, fmt_p
from evalkit.runlog import atomic_write


def _cell(text: Any) -> str:
    """Table-safe: GitHub renders inline HTML in summaries, so markup in data must stay text."""
    s = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return s.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def render_summary(results: dict[str, Any]) -> str:
    verdict = results.get("verdict", "error")
    icon = "✅" if verdict == "pass" else "❌"
    name = (results.get("suite") or {}).get("name", "")
    lines = [f"## {icon} evalkit `{_cell(name)}`: {_cell(data.verdict_line(results))}", "",
             f"Run `{_cell(results.get('run_id', ''))}` · reference variant `{_cell(data.reference_variant(results))}`"
             " · full report: `report.html` in the run folder", ""]
    gates = results.get("gates") or []
    if gates:
        lines += ["### Gates", "", "| | Gate | Value | Threshold | Interval | p | Message |", "|---|---|---:|---|---|---:|---|"]
        lines += [_row(["✅" if g.get("passed") else "❌", g.get("id", ""), fmt(g.get("value")), data.gate_threshold(g),
                        fmt_interval(g.get("low"), g.get("high")), fmt_p(g.get("p_value")), g.get("message", "")])
                  for g in gates]
        lines.append("")
    m = data.metric_matrix(results)
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


def write_summary(results: dict[str, Any], path: Path) -> Path:
    atomic_write(path, render_summary(results))
    return Path(path)

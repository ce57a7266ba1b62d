"""Where the verdict is read: report.html, junit.xml and summary.md in every run folder."""
from __future__ import annotations

from pathlib import Path

from evalkit.record import RunRecord
from evalkit.report.data import load_record
from evalkit.report.html import render_report, write_report
from evalkit.report.junit import write_junit
from evalkit.report.markdown import write_summary

__all__ = ["render_report", "write_all", "write_junit", "write_summary"]


def write_all(run_dir: Path, record: RunRecord, baseline: Path | None = None) -> dict[str, Path]:
    """Every output the runner leaves beside results.json + samples.jsonl; returns name -> path."""
    run_dir = Path(run_dir)
    return {"junit": write_junit(record, run_dir / "junit.xml"),
            "summary": write_summary(record, run_dir / "summary.md"),
            "report": write_report(run_dir, record, load_record(Path(baseline)) if baseline else None)}

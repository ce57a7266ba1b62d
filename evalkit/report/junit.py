"""junit.xml: one testcase per gate, so CI dashboards show the verdict like any test run."""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from evalkit.record import RunRecord
from evalkit.report.data import gate_numbers, is_num
from evalkit.runlog import atomic_write

# XML 1.0 cannot carry most control characters, and model output reaches gate messages
_INVALID_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _clean(text: Any) -> str:
    return _INVALID_XML.sub("\ufffd", str(text))


def write_junit(record: RunRecord, path: Path) -> Path:
    suite = _clean(record.suite.name)
    failures = sum(1 for g in record.gates if not g.passed)
    errors = int(record.status != "complete")
    duration = record.duration_s if is_num(record.duration_s) else 0.0
    tests = str(len(record.gates) + errors)
    root = ET.Element("testsuites", name="evalkit", tests=tests, failures=str(failures), errors=str(errors),
                      time=f"{duration:.3f}")
    skipped = str(sum(1 for g in record.gates if g.skipped))
    ts = ET.SubElement(root, "testsuite", name=suite, tests=tests, failures=str(failures), errors=str(errors),
                       skipped=skipped, time=f"{duration:.3f}", timestamp=_clean(record.started_at or ""))
    props = ET.SubElement(ts, "properties")
    for name, value in (("run_id", record.run_id), ("verdict", record.verdict), ("status", record.status),
                        ("suite_sha256", record.suite.sha256)):
        ET.SubElement(props, "property", name=name, value=_clean(value))
    # gates are judged together after the run: the run's time belongs to the suite, not to one gate
    for g in record.gates:
        case = ET.SubElement(ts, "testcase", classname=suite, name=_clean(g.id), time="0.000")
        if g.skipped:
            ET.SubElement(case, "skipped", message=_clean(g.skipped))
        elif not g.passed:
            failure = ET.SubElement(case, "failure", message=_clean(f"{g.message} ({gate_numbers(g)})"),
                                    type=_clean(g.kind))
            failure.text = _clean(f"{g.message}\n{gate_numbers(g)}")
    if errors:
        case = ET.SubElement(ts, "testcase", classname=suite, name="run", time=f"{duration:.3f}")
        ET.SubElement(case, "error", message=f"run {_clean(record.status)}: gates may be missing or incomplete",
                      type=_clean(record.status))
    ET.indent(root)
    atomic_write(path, ET.tostring(root, encoding="utf-8", xml_declaration=True))
    return Path(path)

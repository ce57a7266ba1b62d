"""junit.xml: one testcase per gate, so CI dashboards show the verdict like any test run."""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from evalkit.report.data import gate_numbers, is_num
from evalkit.runlog import atomic_write

# XML 1.0 cannot carry most control characters, and model output reaches gate messages
_INVALID_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _clean(text: Any) -> str:
    return _INVALID_XML.sub("\ufffd", str(text))


def write_junit(results: dict[str, Any], path: Path) -> Path:
    suite = _clean((results.get("suite") or {}).get("name", "evalkit"))
    gates = results.get("gates") or []
    status = results.get("status", "complete")
    failures = sum(1 for g in gates if not g.get("passed"))
    errors = int(status != "complete")
    duration = results.get("duration_s") if is_num(results.get("duration_s")) else 0.0
    root = ET.Element("testsuites", name="evalkit", tests=str(len(gates) + errors), failures=str(failures),
                      errors=str(errors), time=f"{duration:.3f}")
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(gates) + errors), failures=str(failures),
                       errors=str(errors), skipped="0", time=f"{duration:.3f}",
                       timestamp=_clean(results.get("started_at", "")))
    props = ET.SubElement(ts, "properties")
    for name, value in (("run_id", results.get("run_id", "")), ("verdict", results.get("verdict", "")),
                        ("status", status), ("suite_sha256", (results.get("suite") or {}).get("sha256", ""))):
        ET.SubElement(props, "property", name=name, value=_clean(value))
    # gates are judged together after the run: the run's time belongs to the suite, not to one gate
    for g in gates:
        case = ET.SubElement(ts, "testcase", classname=suite, name=_clean(g.get("id", "")), time="0.000")
        if not g.get("passed"):
            failure = ET.SubElement(case, "failure", message=_clean(f"{g.get('message', '')} ({gate_numbers(g)})"),
                                    type=_clean(g.get("kind", "gate")))
            failure.text = _clean(f"{g.get('message', '')}\n{gate_numbers(g)}")
    if errors:
        case = ET.SubElement(ts, "testcase", classname=suite, name="run", time=f"{duration:.3f}")
        ET.SubElement(case, "error", message=f"run {_clean(status)}: gates may be missing or incomplete",
                      type=_clean(status))
    ET.indent(root)
    atomic_write(path, ET.tostring(root, encoding="utf-8", xml_declaration=True))
    return Path(path)

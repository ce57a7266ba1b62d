"""YAML suite -> typed Suite. Every user mistake becomes `FILE:LINE PATH: message` (exit 4).

yaml.safe_load gives the data; yaml.compose (same safe loader) gives the node tree, from which
we map each YAML path to its line. The shapes in `evalkit.config.suite` check everything else
(types, unknown keys, files, names); their errors are located with the line map.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from evalkit.config.suite import Suite
from evalkit.errors import ConfigError, YamlPath, line_of
from evalkit.fileio import read_text
from evalkit.shape import parse


def _line_map(node: yaml.Node, path: YamlPath = (), lines: dict[YamlPath, int] | None = None) -> dict[YamlPath, int]:
    lines = {} if lines is None else lines
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value
            lines[path + (key,)] = k.start_mark.line + 1
            _line_map(v, path + (key,), lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _line_map(v, path + (i,), lines)
    return lines


def read_yaml(file: Path, what: str = "file") -> tuple[Any, dict[YamlPath, int]]:
    """safe_load + line map; a YAML syntax error names the file, line and column."""
    text = read_text(file, what)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = mark.line + 1 if mark else None
        problem = getattr(e, "problem", None) or str(e)
        col = f" (column {mark.column + 1})" if mark else ""
        raise ConfigError(f"invalid YAML: {problem}{col}", file=file, line=line) from None
    return data, (_line_map(node) if node is not None else {})


def load_suite(path: str | Path, *, baseline: Path | None = None) -> Suite:
    """`baseline`: a baseline store given on the command line (`--baseline`), in place of the
    suite's `baseline:` store."""
    file = Path(path)
    data, lines = read_yaml(file, "suite file")
    if not isinstance(data, dict):
        raise ConfigError("a suite must be a YAML mapping with name, base, variants and tasks", file=file,
                          line=line_of(lines, ()))
    if baseline is not None:
        given = data.get("baseline")
        data = {**data, "baseline": {**(given if isinstance(given, dict) else {}), "store": str(baseline.resolve())}}
    suite = parse(Suite, data, file=file, lines=lines, base_dir=file.resolve().parent)
    suite._path, suite._lines, suite._raw = file.resolve(), lines, data
    for group in ("variants", "tasks", "gates"):
        written = data.get(group)
        for i, item in enumerate(getattr(suite, group)[:len(written) if isinstance(written, list) else 0]):
            item._line = line_of(lines, (group, i))  # a gate on by default has no line
    return suite

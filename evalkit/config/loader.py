"""YAML suite -> typed Suite. Every user mistake becomes `FILE:LINE PATH: message` (exit 4).

`Loader` (PyYAML's safe loader, numbers read as YAML 1.2 does) gives the data and the node tree, from which
we map each YAML path to its line. The shapes of `evalkit.config` (`Suite` and its parts) check everything
else (types, unknown keys, files, names); their errors are located with the line map.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from evalkit.config.suite import Suite
from evalkit.errors import ConfigError, YamlPath, fmt_path, line_of
from evalkit.fileio import read_text
from evalkit.shape import parse


class Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers as YAML 1.2 (and JSON) do: `2e-4` and `1E3`, which YAML 1.1
    reads as text for want of a dot, are floats (how the guides, trl and transformers write a
    learning rate)."""


_EXPONENT = re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$")
for _first in "-+0123456789":
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT, [_first])
    # add_implicit_resolver appends: this form must be tried before the int and timestamp forms
    _resolvers = Loader.yaml_implicit_resolvers[_first]
    _resolvers.insert(0, _resolvers.pop())

# A YAML file expands to at most this many nodes (aliases repeat nodes: `&a [*a]` recurses, and
# nested aliases multiply, a "billion laughs"): far above any suite, far below a hang.
MAX_NODES = 200_000


def _line_map(node: yaml.Node, file: Path) -> dict[YamlPath, int]:
    """Each YAML path's line; a duplicate key, a recursive or exploding alias is refused at its line."""
    lines: dict[YamlPath, int] = {}
    on_path: set[int] = set()

    def walk(node: yaml.Node, path: YamlPath) -> None:
        if id(node) in on_path:
            raise ConfigError("a recursive alias: this node contains itself (`&a [*a]`)", file=file,
                              line=node.start_mark.line + 1, path=fmt_path(path))
        if len(lines) > MAX_NODES:
            raise ConfigError(f"the YAML expands to more than {MAX_NODES} values (aliases that repeat aliases)",
                              file=file, line=node.start_mark.line + 1, path=fmt_path(path))
        lines.setdefault(path, node.start_mark.line + 1)
        on_path.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for k, v in node.value:
                key, line = k.value, k.start_mark.line + 1
                if (k.tag, key) in seen and key != "<<":  # YAML keeps the last silently: an edit that does nothing
                    raise ConfigError(f"duplicate key '{key}' (first at line {seen[k.tag, key]})", file=file,
                                      line=line, path=fmt_path(path + (key,)))
                seen[k.tag, key] = lines[path + (key,)] = line
                walk(v, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, path + (i,))
        on_path.discard(id(node))

    walk(node, ())
    return lines


def read_yaml(file: Path, what: str = "file") -> tuple[Any, dict[YamlPath, int]]:
    """The data (safe loader) + line map; a YAML syntax error names the file, line and column, and so do the
    values PyYAML cannot build (nesting deeper than Python's recursion limit, an integer of more
    than 4300 digits)."""
    text = read_text(file, what)
    try:
        data = yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader). First: it refuses what the line map cannot walk
        node = yaml.compose(text, Loader=Loader)
        lines = _line_map(node, file) if node is not None else {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = mark.line + 1 if mark else None
        problem = getattr(e, "problem", None) or str(e)
        col = f" (column {mark.column + 1})" if mark else ""
        raise ConfigError(f"invalid YAML: {problem}{col}", file=file, line=line) from None
    except RecursionError:
        raise ConfigError("invalid YAML: lists or mappings nested too deeply", file=file) from None
    except ValueError as e:  # int_max_str_digits, on a huge integer literal
        raise ConfigError(f"invalid YAML: {str(e).split(';')[0]}", file=file) from None
    return data, lines


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

"""Errors a user can act on, and the stable exit codes of the CLI."""
from __future__ import annotations

import difflib
import enum
from collections.abc import Iterable, Mapping
from pathlib import Path


class ExitCode(enum.IntEnum):
    OK = 0
    GATE_FAILED = 1
    INTERRUPTED = 2
    INTERNAL_ERROR = 3
    USAGE_ERROR = 4
    NOTHING_TO_EVALUATE = 5


class EvalkitError(Exception):
    """A failure evalkit can explain; the CLI prints it without a traceback."""

    exit_code: ExitCode = ExitCode.INTERNAL_ERROR


class ConfigError(EvalkitError):
    """A user mistake in a suite, recipe or command line: printed as `FILE:LINE PATH: message`."""

    exit_code = ExitCode.USAGE_ERROR

    def __init__(self, message: str, *, file: str | Path | None = None, line: int | None = None,
                 path: str = "", hint: str | None = None):
        self.message, self.file, self.line, self.path, self.hint = message, file, line, path, hint
        super().__init__(self.format())

    def format(self) -> str:
        where = ""
        if self.file is not None:
            where = Path(self.file).name if self.line is None else f"{Path(self.file).name}:{self.line}"
        head = " ".join(p for p in (where, self.path) if p)
        text = f"{head}: {self.message}" if head else self.message
        return f"{text}\n  hint: {self.hint}" if self.hint else text


YamlPath = tuple[str | int, ...]


def fmt_path(path: YamlPath) -> str:
    """("tasks", 0, "scorers", 1) -> "tasks[0].scorers[1]"."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def line_of(lines: Mapping[YamlPath, int], path: YamlPath) -> int | None:
    """The line of `path`, or of its nearest ancestor the YAML line map knows."""
    while path not in lines and path:
        path = path[:-1]
    return lines.get(path)


def located(message: str, file: str | Path | None, lines: Mapping[YamlPath, int], path: YamlPath,
            hint: str | None = None) -> ConfigError:
    return ConfigError(message, file=file, line=line_of(lines, path), path=fmt_path(path), hint=hint)


class ModelError(EvalkitError):
    """A model or adapter that cannot be used as asked (wrong base, corrupt file, unsafe format)."""

    exit_code = ExitCode.USAGE_ERROR


class NothingToEvaluate(EvalkitError):
    exit_code = ExitCode.NOTHING_TO_EVALUATE


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`; did you mean 'x'?` when a close match exists, else the list of valid names."""
    choices = sorted(set(choices))
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; expected one of: {', '.join(choices)}" if choices else ""


def missing_extra(package: str, extra: str) -> EvalkitError:
    err = EvalkitError(f"this feature needs the '{package}' package: pip install 'evalkit[{extra}]'")
    err.exit_code = ExitCode.USAGE_ERROR
    return err

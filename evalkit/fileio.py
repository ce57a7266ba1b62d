"""Reading and writing evalkit's files: text, JSON and JSON Lines input with located errors, atomic output.

Every jsonl file evalkit or its trainers read (suite data, judge anchors, training rows, MMLU
rows) goes through `iter_jsonl`; each caller then checks its own row shape. Every record
evalkit writes (results, samples, reports, provenance, hash memos) goes through `atomic_write`.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

from evalkit.errors import ConfigError


def read_text(file: Path, what: str = "file") -> str:
    """A config file's text: a missing file, a folder or bytes that are not UTF-8 text are
    config errors naming the file (and the line of the first bad byte)."""
    try:
        if file.is_dir():
            raise ConfigError(f"{file} is a folder, not a {what}")
        if not file.is_file():
            raise ConfigError(f"{what} not found: {file}")
        data = file.read_bytes()
    except (OSError, ValueError) as e:  # a name too long for the file system, a NUL byte, no permission
        raise ConfigError(f"cannot read the {what} {str(file)[:200]!r}: {getattr(e, 'strerror', None) or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                          f"is this the {what}?", file=file, line=line) from None
    if "\x00" in text:
        line = text[:text.index("\x00")].count("\n") + 1
        raise ConfigError(f"binary data (a NUL byte); is this the {what}?", file=file, line=line)
    return text


def read_json(file: Path, what: str = "file") -> Any:
    """A JSON file's value; bad text or bad JSON is a ConfigError naming the file and line."""
    return _loads(read_text(file, what), file, None)


def _loads(text: str, file: Path, lineno: int | None) -> Any:
    """json.loads, its failures as ConfigErrors: bad syntax (at its line), and the values the json
    module cannot hold, which it raises as other errors (nesting deeper than Python's recursion
    limit; an integer of more than 4300 digits)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        line = e.lineno if lineno is None else lineno
        raise ConfigError(f"invalid JSON: {e.msg} (column {e.colno})", file=file, line=line) from None
    except RecursionError:
        raise ConfigError("invalid JSON: arrays or objects nested too deeply", file=file, line=lineno) from None
    except ValueError as e:  # int_max_str_digits
        raise ConfigError(f"invalid JSON: {str(e).split(';')[0]}", file=file, line=lineno) from None


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of a JSON Lines file, read lazily.

    A missing file, a line that is not UTF-8 text and a line that is not valid JSON each raise a
    ConfigError that names the file (and the line): the CLI prints it without a traceback. Lines
    end at "\\n" only, as JSON Lines says (a U+2028 inside a string does not split a row), and a
    UTF-8 byte order mark at the start of the file is ignored.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:  # bytes: a decoding error can then be pinned to its line
            yield from _parse_lines(path, f)
    except FileNotFoundError:
        raise ConfigError(f"file not found: {path}") from None
    except (IsADirectoryError, PermissionError) as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None


def _parse_lines(path: Path, f: Iterable[bytes]) -> Iterator[tuple[int, Any]]:
    for lineno, raw in enumerate(f, 1):
        try:
            text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"not UTF-8 text: byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line",
                              file=path, line=lineno, hint="JSON Lines files must be UTF-8: re-save it as UTF-8"
                              ) from None
        if not text.strip():
            continue
        yield lineno, _loads(text, path, lineno)


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """Every row of a JSON Lines file of objects, with its line number (see `iter_jsonl`); a row
    that is not a JSON object is a ConfigError at its line."""
    rows = []
    for lineno, row in iter_jsonl(path):
        if not isinstance(row, dict):
            raise ConfigError(f"each line must be a JSON object, not {_json_kind(row)}", file=path, line=lineno)
        rows.append((lineno, row))
    return rows


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return "a number"


def atomic_write(path: str | Path, data: str | bytes | Iterable[str | bytes]) -> None:
    """Write to a temp file in the same folder, then rename: readers never see half a file, and a
    killed run leaves the previous file whole. The file gets the usual permissions (umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in [data] if isinstance(data, (str, bytes)) else data:
                f.write(chunk.encode("utf-8") if isinstance(chunk, str) else chunk)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: a run folder is shared (CI artifacts)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@cache
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask

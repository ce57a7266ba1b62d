"""Property-based fuzzing of everything a user writes: every shipped suite and recipe, and the jsonl
data files they use, mutated at random (types, keys, values, nesting, YAML syntax, encodings).

The invariant, for every mutation: `evalkit validate` (run in process through `evalkit.cli.main`)
exits 0 (it validated) or 4 with an error that names a file, never 3, never a traceback, never an
exception out of `main`; the loaders a run uses (`trainers.recipe.load_recipe`,
`evalkit.tasks.generation.load_cases`, `trainers.data.load_training_rows`) return or raise
evalkit's ConfigError, naming the file.

Bounded and seeded: FUZZ_EXAMPLES examples per test (default 100: the four fuzz tests and the
replayed findings take about 20 s on 2 cores), FUZZ_SEED replays a run (printed at the start),
FUZZ_SHRINK=1 shrinks a failure to a small example. `make fuzz` runs them long (2000 each).
FUZZ_COLLECT=FILE records every failure as a JSON line in FILE and goes on, to list all the bugs
of a long run instead of stopping at the first.
"""
from __future__ import annotations

import difflib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import yaml
from fuzz_strategies import (
    DATA,
    FUZZ_SEED,
    RECIPES,
    REPO,
    SUITES,
    announce,
    copy_project,
    fuzz_examples,
    fuzz_settings,
    mutated_jsonl,
    mutated_yaml,
)
from fuzz_strategies import shipped_text as shipped
from hypothesis import event, given, seed
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from evalkit.cli import main
from evalkit.errors import EvalkitError, ExitCode

pytestmark = pytest.mark.fuzz

COLLECT = os.environ.get("FUZZ_COLLECT")


# ---------------------------------------------------------------- what refers to what

def _named_files(file: Path) -> set[Path]:
    """The repo files a suite or recipe names (any string value that resolves to one), recursively."""
    out: set[Path] = set()

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, str) and (file.parent / v).is_file():
            out.add((file.parent / v).resolve())

    walk(yaml.safe_load(file.read_text()))
    for f in list(out):
        if f.suffix == ".yml":
            out |= _named_files(f)
    return out


def _users() -> dict[str, list[str]]:
    """repo-relative file -> the shipped suites that use it (directly, or through a recipe)."""
    users: dict[str, list[str]] = {}
    for s in SUITES:
        for f in _named_files(REPO / s):
            users.setdefault(f.relative_to(REPO).as_posix(), []).append(s)
    return users


USERS = _users()
TASK_DATA = sorted({(REPO / s).parent.joinpath(t["data"]).resolve().relative_to(REPO).as_posix()
                    for s in SUITES for t in yaml.safe_load((REPO / s).read_text())["tasks"] if "data" in t})
TRAIN_DATA = sorted({(REPO / r).parent.joinpath(d).resolve().relative_to(REPO).as_posix()
                     for r in RECIPES for d in [(yaml.safe_load((REPO / r).read_text()).get("data") or {}).get("train")]
                     if d})
EXTENDS = {r: [c for c in RECIPES if yaml.safe_load((REPO / c).read_text()).get("extends") == Path(r).name]
           for r in RECIPES}


def test_fuzz_targets_found() -> None:
    """The fuzzers below cover every shipped suite, recipe and data file (a new one is picked up)."""
    assert len(SUITES) >= 5 and len(RECIPES) >= 5
    assert "suites/data/extract_test.jsonl" in TASK_DATA and "suites/data/extract_train.jsonl" in TRAIN_DATA
    assert all(r in USERS for r in RECIPES), "a recipe no shipped suite uses"
    assert all(d in USERS for d in DATA), "a data file no shipped suite uses"
    assert EXTENDS["trainers/recipes/lora.yml"]


# ---------------------------------------------------------------- seed, copies, checks

@pytest.fixture(scope="module", autouse=True)
def _announce(request: pytest.FixtureRequest) -> None:
    announce(request, __file__, fuzz_examples())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@contextmanager
def project(workdir: Path) -> Iterator[Path]:
    """A fresh copy of the shipped files per example: a mutation never leaks into the next."""
    root = Path(tempfile.mkdtemp(dir=workdir))
    try:
        yield copy_project(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _show(blob: bytes, limit: int = 1500) -> str:
    text = blob.decode("utf-8", errors="backslashreplace")
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _diff(rel: str, blob: bytes, limit: int = 2500) -> str:
    """What the mutation changed in a shipped file, as a unified diff (the whole file is long)."""
    new = blob.decode("utf-8", errors="backslashreplace")
    lines = difflib.unified_diff(shipped(rel).splitlines(), new.splitlines(), rel, f"{rel} (mutated, {len(blob)} bytes)",
                                 n=1, lineterm="")
    text = "\n".join(line if len(line) < 300 else line[:300] + f"... ({len(line)} characters)" for line in lines)
    return text if len(text) <= limit else text[:limit] + "\n..."


def problem(kind: str, signature: str, detail: str, mutated: dict[str, bytes]) -> None:
    """A broken invariant: an assertion (hypothesis shrinks it), or a JSON line in FUZZ_COLLECT."""
    if COLLECT:
        with open(COLLECT, "a") as f:
            f.write(json.dumps({"kind": kind, "signature": signature, "detail": detail[-3000:],
                                "mutated": {k: _show(v) for k, v in mutated.items()}}) + "\n")
        return
    files = "\n".join(_diff(k, v) for k, v in mutated.items())
    raise AssertionError(f"{kind} [{signature}] (FUZZ_SEED={FUZZ_SEED})\n{detail[-3000:]}\n{files}")


def _frame_signature(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames if "/evalkit/" in f.filename or "/trainers/" in f.filename] or frames
    last = own[-1]
    return f"{type(exc).__name__} at {Path(last.filename).name}:{last.lineno} {last.name}"


def _stderr_signature(err: str) -> str:
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', err)
    own = [f for f in frames if "/evalkit/" in f[0] or "/trainers/" in f[0]] or frames
    exc = [line for line in err.splitlines() if re.match(r"^[A-Za-z_.]+(Error|Exception|Exit)\b", line)]
    where = f"{Path(own[-1][0]).name}:{own[-1][1]} {own[-1][2]}" if own else "?"
    return f"{exc[-1].split(':')[0] if exc else '?'} at {where}"


FILE_NAME = re.compile(r"[\w.+-]+\.(?:ya?ml|jsonl?|md|gguf|bin|txt)\b")


def names_a_file(message: str, root: Path) -> bool:
    """`demo.yml:12 tasks[0].data: ...`, or a path under the project copy."""
    return bool(FILE_NAME.search(message)) or str(root) in message


def check_validate(root: Path, suite: str, mutated: dict[str, bytes]) -> int:
    """`evalkit validate SUITE` exits 0, or 4 with a located error; never a traceback or exit 3."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            rc = main(["validate", str(root / suite)])
    except (Exception, SystemExit) as e:
        problem("exception out of main", _frame_signature(e), "".join(traceback.format_exception(e)), mutated)
        return -1
    text = err.getvalue()
    if currently_in_test_context():
        event(f"validate: exit {rc}")  # --hypothesis-show-statistics: how many mutations validate accepted
    if "Traceback" in text or rc == ExitCode.INTERNAL_ERROR:
        problem(f"exit {rc} with a traceback", _stderr_signature(text), text, mutated)
    elif rc not in (ExitCode.OK, ExitCode.USAGE_ERROR):
        problem(f"exit {rc}", f"exit {rc}", text, mutated)
    elif rc == ExitCode.USAGE_ERROR and not (text.startswith("evalkit: error: ") and names_a_file(text, root)):
        problem("exit 4 naming no file", "unlocated: " + re.sub(r"\d+|'[^']*'", "_", text)[:80], text, mutated)
    elif rc == ExitCode.USAGE_ERROR and not FILE_LINE.search(text):
        # allowed (a missing file has no line), but counted, and listed by a FUZZ_COLLECT run
        if currently_in_test_context():
            event("validate: exit 4 naming a file but no line")
        note("exit 4 without a line", re.sub(r"\d+|'[^']*'|/\S+", "_", text)[:90], text, mutated)
    return rc


FILE_LINE = re.compile(r"[\w.+-]+\.(?:ya?ml|jsonl?|md):\d+")


def note(kind: str, signature: str, detail: str, mutated: dict[str, bytes]) -> None:
    """Not a failure: a line in the FUZZ_COLLECT file, for a person to read."""
    if COLLECT:
        with open(COLLECT, "a") as f:
            f.write(json.dumps({"kind": "note: " + kind, "signature": signature, "detail": detail[-1000:],
                                "mutated": {k: _show(v, 300) for k, v in mutated.items()}}) + "\n")


def check_loader(fn: Any, file: Path, mutated: dict[str, bytes], *args: Any) -> None:
    """A loader returns, or raises an EvalkitError with exit 4 that names `file`."""
    try:
        fn(file, *args)
    except EvalkitError as e:
        if e.exit_code != ExitCode.USAGE_ERROR:
            problem(f"{fn.__name__}: exit {int(e.exit_code)}", _frame_signature(e), str(e), mutated)
        elif not any(Path(f).name in str(e) for f in [file, *mutated]) and str(file) not in str(e):
            problem(f"{fn.__name__}: error naming no file", f"unlocated {fn.__name__}: {str(e)[:60]}", str(e), mutated)
    except Exception as e:
        problem(f"{fn.__name__} raised {type(e).__name__}", _frame_signature(e),
                "".join(traceback.format_exception(e)), mutated)


def _load_recipe(file: Path) -> None:
    from trainers.recipe import load_recipe

    load_recipe(file)


def _load_cases(file: Path, limit: int | None = None) -> None:
    from evalkit.tasks.generation import load_cases

    load_cases(file, limit)


def _load_training_rows(file: Path) -> None:
    from trainers.data import load_training_rows

    load_training_rows(file)


# ---------------------------------------------------------------- the fuzz tests

@seed(FUZZ_SEED)
@fuzz_settings()
@given(data=st.data())
def test_fuzz_suite(data: st.DataObject, workdir: Path) -> None:
    """A shipped suite, mutated (structure, YAML text, encoding): validate refuses it at its place or accepts it."""
    rel = data.draw(st.sampled_from(SUITES), label="suite")
    blob = data.draw(mutated_yaml(rel), label="suite bytes")
    with project(workdir) as root:
        (root / rel).write_bytes(blob)
        check_validate(root, rel, {rel: blob})


@seed(FUZZ_SEED)
@fuzz_settings()
@given(data=st.data())
def test_fuzz_recipe(data: st.DataObject, workdir: Path) -> None:
    """A shipped recipe, mutated: load_recipe (and the recipes extending it) refuse it at its place or
    load it, and validate of a suite that trains from it exits 0 or 4."""
    rel = data.draw(st.sampled_from(RECIPES), label="recipe")
    blob = data.draw(mutated_yaml(rel), label="recipe bytes")
    with project(workdir) as root:
        (root / rel).write_bytes(blob)
        for r in [rel, *EXTENDS[rel]]:
            check_loader(_load_recipe, root / r, {rel: blob})
        check_validate(root, data.draw(st.sampled_from(USERS[rel]), label="suite"), {rel: blob})


@seed(FUZZ_SEED)
@fuzz_settings()
@given(data=st.data())
def test_fuzz_data_lines(data: st.DataObject, workdir: Path) -> None:
    """A shipped jsonl data file with lines replaced by random JSON, wrong shapes or bad bytes: the
    loaders a run uses refuse it at its line or load it, and validate exits 0 or 4."""
    rel = data.draw(st.sampled_from(DATA), label="data file")
    blob = data.draw(mutated_jsonl(rel), label="data bytes")
    with project(workdir) as root:
        (root / rel).write_bytes(blob)
        if rel in TASK_DATA:
            check_loader(_load_cases, root / rel, {rel: blob})
            check_loader(_load_cases, root / rel, {rel: blob}, data.draw(st.sampled_from([1, 2, 50]), label="limit"))
        if rel in TRAIN_DATA:
            check_loader(_load_training_rows, root / rel, {rel: blob})
        check_validate(root, data.draw(st.sampled_from(USERS[rel]), label="suite"), {rel: blob})


@seed(FUZZ_SEED)
@fuzz_settings()
@given(data=st.data())
def test_fuzz_suite_with_its_files(data: st.DataObject, workdir: Path) -> None:
    """A suite and the files it uses mutated together (a bad suite line over a bad recipe over bad data):
    the first mistake validate meets is refused at its place."""
    suite = data.draw(st.sampled_from(SUITES), label="suite")
    files = [suite] + [f for f in USERS if suite in USERS[f] and f.endswith((".yml", ".jsonl"))]
    chosen = data.draw(st.lists(st.sampled_from(files), min_size=1, max_size=3, unique=True), label="mutated files")
    mutated = {}
    for rel in chosen:
        mutated[rel] = data.draw(mutated_jsonl(rel) if rel.endswith(".jsonl") else mutated_yaml(rel), label=rel)
    with project(workdir) as root:
        for rel, blob in mutated.items():
            (root / rel).write_bytes(blob)
        check_validate(root, suite, mutated)


# ---------------------------------------------------------------- what the fuzzers found, replayed

LONG_NAME = "x" * 5000
BIG_INT = "1" * 5000  # past Python's 4300-digit limit for int(str)


def _replace(rel: str, old: str, new: str) -> tuple[str, Any]:
    def change(text: str) -> str:
        assert old in text, f"{rel} no longer has {old!r}: update this reproducer"
        return text.replace(old, new, 1)
    return rel, change


def _data_line(rel: str, line: str) -> tuple[str, Any]:
    return rel, lambda text: line + "\n" + text


# (id, (file, change)): each bug the fuzzers found, replayed
FINDINGS: list[tuple[str, tuple[str, Any]]] = [
    # found by the fuzzers, fixed in evalkit/config/loader.py and trainers/recipe.py
    ("recursive-alias", _replace("suites/demo.yml", "name: demo\n", "name: &r [*r]\n")),
    ("recursive-alias-recipe", _replace("trainers/recipes/lora.yml", "seed: 0\n", "seed: &r {k: *r}\n")),
    ("alias-bomb", _replace("suites/demo.yml", "name: demo\n", "name: demo\n" + "\n".join(
        [f"l0: &l0 [{', '.join(['x'] * 9)}]"] + [f"l{k}: &l{k} [{', '.join([f'*l{k - 1}'] * 9)}]" for k in range(1, 9)]) + "\n")),
    ("yaml-int-over-4300-digits", _replace("suites/demo.yml", "limit: 50\n", f"limit: {BIG_INT}\n")),
    ("yaml-nested-3000-deep", _replace("suites/demo.yml", "name: demo\n", "name: " + "[" * 3000 + "]" * 3000 + "\n")),
    ("extends-name-too-long", _replace("trainers/recipes/lora-short.yml", "extends: lora.yml", f"extends: {LONG_NAME}")),
    ("mapping-as-key", _replace("suites/candidate.yml", "name: candidate\n", "name: candidate\n[a, b]: 1\n")),
    ("extends-huge-hex-int", _replace("trainers/recipes/lora-short.yml", "extends: lora.yml", f"extends: 0x{'f' * 5000}")),
    # fixed: evalkit/shape.py prints a huge integer (YAML hex has no digit limit) without repr's ValueError
    ("name-huge-hex-int", _replace("suites/demo.yml", "name: demo\n", f"name: 0x{'f' * 5000}\n")),
    # fixed: evalkit/shape.py resolves paths without RuntimeError / OSError / ValueError escaping
    ("path-of-unknown-user", _replace("suites/demo.yml", "data: data/extract_test.jsonl", "data: ~no_such_user_fuzz/x")),
    ("path-too-long", _replace("suites/demo.yml", "data: data/extract_test.jsonl", f"data: {LONG_NAME}")),
    ("path-with-nul", _replace("suites/demo.yml", "data: data/extract_test.jsonl", 'data: "a\\0b"')),
    ("recipe-path-too-long", _replace("suites/pitfalls.yml", "train: ../trainers/recipes/lora.yml",
                                      f"train: {LONG_NAME}")),
    # fixed: evalkit/fileio.py turns json's RecursionError and int-digits ValueError into located errors
    ("jsonl-nested-100000-deep", _data_line("suites/data/extract_test.jsonl", "[" * 100_000 + "]" * 100_000)),
    ("jsonl-int-over-4300-digits", _data_line("suites/data/extract_test.jsonl", f'{{"id": {BIG_INT}, "prompt": "x"}}')),
    ("train-jsonl-nested-deep", _data_line("suites/data/extract_train.jsonl", '{"prompt": ' + "[" * 100_000)),
]


@pytest.mark.parametrize("rel, change", [pytest.param(*fix, id=name) for name, fix in FINDINGS])
def test_fuzz_finding(rel: str, change: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A minimal reproducer of each bug the fuzzers found: refused at its place (or accepted), never exit 3."""
    monkeypatch.setattr(sys.modules[__name__], "COLLECT", None)
    root = copy_project(tmp_path)
    blob = change(shipped(rel)).encode()
    (root / rel).write_bytes(blob)
    if rel in RECIPES:
        check_loader(_load_recipe, root / rel, {rel: blob})
    if rel in TASK_DATA:
        check_loader(_load_cases, root / rel, {rel: blob})
    if rel in TRAIN_DATA:
        check_loader(_load_training_rows, root / rel, {rel: blob})
    suite = rel if rel in SUITES else USERS[rel][0]
    assert check_validate(root, suite, {rel: blob}) == ExitCode.USAGE_ERROR

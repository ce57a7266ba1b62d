"""Train a recipe under its `launcher:` (`accelerate launch`, `torchrun`, ...): several processes (DDP).

The launcher's command runs `python -m trainers.launched JOB` in each process it starts; JOB is a JSON
file (in the temp folder the adapter is trained into) holding the validated recipe (with where each key is written, so an error in
the child is still located in the recipe file), the resolved base and the folder to train into. Every
process trains (trl/transformers handle DDP: gloo on CPU, NCCL on GPU), the main one saves the adapter
and writes the run record beside JOB, which the parent reads to write provenance as for a training in
its own process. Errors come back whole: a ConfigError raised in the child is raised here with its file,
line and path; a launcher that fails before training is a ConfigError at the recipe's `launcher` line
with its last output lines.

    launcher: [accelerate, launch, --multi_gpu, --num_processes, 2, --main_process_port, 0]

(accelerate's `--cpu` runs one process; `--multi_gpu` is its torchrun launcher, which on a machine
without GPUs runs CPU processes over gloo.) This module imports neither torch nor the trainer: it is
imported by trainers.sft, and the child's entry (trainers.launched) imports both.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from evalkit.errors import ConfigError, EvalkitError, ExitCode, ModelError
from evalkit.fileio import atomic_write
from evalkit.models.base import BaseSpec, ResolvedBase
from evalkit.shape import error_parts
from trainers.recipe import Recipe
from trainers.recipe import _located as located

Log = Callable[[str], Any]
ENTRY = ("-m", "trainers.launched")  # appended to the launcher: accelerate, torchrun and python all take `-m MODULE`
TAIL_LINES = 15  # of the launcher's output, in the error when it fails
STOP_GRACE_S = 15  # between SIGTERM and SIGKILL of the launcher's process group
JOB_FOLDER, JOB_FILE, RUN_FILE = "_launch", "job.json", "run.json"


def train_launched(recipe: Recipe, resolved: ResolvedBase, out_dir: Path, *, log: Log = print,
                   checkpoint_every: int | None = None) -> dict[str, Any]:
    """`train_adapter`'s run record, trained into `out_dir` by the processes `recipe.launcher` starts."""
    assert recipe.launcher is not None  # called for a recipe that has one
    folder = out_dir / JOB_FOLDER  # in the temp adapter folder: whatever kills evalkit, the next run removes it
    folder.mkdir()
    try:
        job = {"recipe": recipe_state(recipe), "base": {"spec": resolved.spec.model_dump(mode="json"),
                                                        "path": resolved.path, "sha256": resolved.sha256},
               "out_dir": str(out_dir), "checkpoint_every": checkpoint_every, "parent_pid": os.getpid()}
        atomic_write(folder / JOB_FILE, json.dumps(job))
        cmd = [_program(recipe, recipe.launcher[0]), *recipe.launcher[1:], *ENTRY, str(folder / JOB_FILE)]
        log(f"launching: {shlex.join(cmd)}")
        code, tail = _run(recipe, cmd, log)
        if error := _child_error(folder, recipe.launcher, tail):
            raise error
        if code != 0 or not (folder / RUN_FILE).is_file():
            lines = "\n".join("    " + line for line in tail) or "    (no output)"
            raise recipe.error(("launcher",), f"training under `{shlex.join(recipe.launcher)}` failed (exit {code}); "
                                              f"its last lines:\n{lines}")
        return _run_record(json.loads((folder / RUN_FILE).read_text()))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _program(recipe: Recipe, name: str) -> str:
    """The launcher's program. A path: against the recipe's folder, like the recipe's other paths. A
    name: beside this Python first (the venv's `accelerate`, whose processes run this Python; one found
    first on PATH may run another, without evalkit), else on PATH."""
    hint = "accelerate comes with evalkit's `train` extra; or give the program's path"
    if "/" in name or os.sep in name:
        path = Path(name).expanduser()
        path = path if path.is_absolute() else recipe.base_dir / path
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise recipe.error(("launcher",), f"launcher program not found or not executable: {path}", hint=hint)
        return str(path)
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise recipe.error(("launcher",), f"launcher program '{name}' not found (on PATH or beside {sys.executable})",
                           hint=hint)
    return found


def _run(recipe: Recipe, cmd: list[str], log: Log) -> tuple[int, list[str]]:
    """Run the launcher in a process group of its own, stopped (the whole group) when this process is
    interrupted. Its output lines (what the trainer logs) go to `log` as they come, its error lines
    (libraries' warnings) to this process's stderr, as when training here. Returns its exit code and
    last lines."""
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    package_root = str(Path(__file__).resolve().parent.parent)  # `-m trainers.launched` from a checkout
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), package_root) if p)}
    with _sigterm_exits():
        try:
            process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                       text=True, errors="replace", env=env, start_new_session=True)
        except OSError as e:
            raise recipe.error(("launcher",), f"cannot start `{cmd[0]}`: {e.strerror or e}") from None
        assert process.stdout is not None and process.stderr is not None
        errors = threading.Thread(target=_copy_errors, args=(process.stderr, tail), daemon=True)
        errors.start()
        try:
            for line in process.stdout:
                tail.append(line.rstrip("\n"))
                log(line.rstrip("\n"))
            code = process.wait()
            errors.join(timeout=STOP_GRACE_S)  # the last error lines, for the message
            return code, list(tail)
        finally:
            _stop(process)


def _copy_errors(stream: IO[str], tail: deque[str]) -> None:
    with contextlib.suppress(OSError, ValueError):  # this process's stderr closed, or the pipe
        for line in stream:
            tail.append(line.rstrip("\n"))
            sys.stderr.write(line)
            sys.stderr.flush()


def _stop(process: subprocess.Popen[str]) -> None:
    """SIGTERM to the launcher's process group (torchrun stops its workers on it), SIGKILL after a
    grace. Workers in sessions of their own that outlive it stop on their own: trainers.launched
    watches this process."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM raises SystemExit while the launcher runs, so `_stop` and the temp folders' cleanup
    run; Python's default would end this process at once and leave the trainers running. Only where
    a handler can be set (the main thread) and none is set already."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def exit_on_sigterm(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# ----------------------------------------------------------------------------------------------
# what crosses between the processes


def recipe_state(recipe: Recipe) -> dict[str, Any]:
    """The validated recipe with what locates its errors (`Recipe.error`), as JSON."""
    return {"fields": recipe.model_dump(mode="json"), "base_dir": str(recipe.base_dir),
            "source": str(recipe.source) if recipe.source else None,
            "origins": [[list(path), str(file), line] for path, (file, line) in recipe._origins.items()],
            "overridden": sorted(recipe._overridden)}


def recipe_from_state(state: dict[str, Any]) -> Recipe:
    """`recipe_state` read back, validated again (its paths are absolute)."""
    source = Path(state["source"]) if state["source"] else None
    origins = {tuple(path): (Path(file), line) for path, file, line in state["origins"]}
    try:  # a file the recipe names may have gone since the parent validated it
        recipe = Recipe.model_validate(state["fields"], context={"base_dir": Path(state["base_dir"])})
    except ValidationError as e:
        path, message, hint = error_parts(e, state["fields"])
        raise located(message, path, source, origins, set(state["overridden"]), hint) from None
    recipe._base_dir, recipe._source = Path(state["base_dir"]), source
    recipe._origins, recipe._overridden = origins, set(state["overridden"])
    return recipe


def job_recipe(job: dict[str, Any]) -> tuple[Recipe, ResolvedBase]:
    base = ResolvedBase(BaseSpec.model_validate(job["base"]["spec"]), job["base"]["path"], job["base"]["sha256"])
    return recipe_from_state(job["recipe"]), base


def write_run(job_file: Path, run: dict[str, Any]) -> None:
    """The main process's run record (its checkpoint marks are dataclasses), beside the job."""
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.asdict(value)
        if isinstance(value, Path):
            return str(value)
        raise TypeError(f"not JSON: {type(value).__name__}")

    atomic_write(job_file.parent / RUN_FILE, json.dumps(run, default=plain))


def _run_record(run: dict[str, Any]) -> dict[str, Any]:
    if "checkpoint_marks" in run:  # trainers.checkpoints' Mark, whose perf_counter clock is the machine's
        from trainers.checkpoints import Mark

        run["checkpoint_marks"] = [Mark(**m) for m in run["checkpoint_marks"]]
    return run


def write_error(job_file: Path, error: BaseException) -> None:
    """What a process's exception needs to be raised again in the parent (one file per process)."""
    record: dict[str, Any] = {"kind": type(error).__name__, "message": str(error)}
    if isinstance(error, ConfigError):
        record |= {"kind": "ConfigError", "message": error.message, "file": str(error.file) if error.file else None,
                   "line": error.line, "path": error.path, "hint": error.hint}
    elif isinstance(error, EvalkitError):
        record |= {"kind": "ModelError" if isinstance(error, ModelError) else "EvalkitError",
                   "exit_code": int(error.exit_code)}
    atomic_write(job_file.parent / f"error-{os.getpid()}.json", json.dumps(record))


def _child_error(folder: Path, launcher: tuple[str, ...], tail: list[str]) -> EvalkitError | None:
    """The exception a process raised, to raise here: a ConfigError or evalkit's own error as it was
    (all processes make the same mistake), anything else a ModelError with the output's last lines."""
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("error-*.json"))]
    if not records:
        return None
    order = {"ConfigError": 0, "ModelError": 1, "EvalkitError": 2}
    r = min(records, key=lambda r: order.get(r["kind"], 3))
    if r["kind"] == "ConfigError":
        return ConfigError(r["message"], file=r["file"], line=r["line"], path=r["path"], hint=r["hint"])
    if r["kind"] == "ModelError":
        return ModelError(r["message"])
    if r["kind"] == "EvalkitError":
        error = EvalkitError(r["message"])
        error.exit_code = ExitCode(r["exit_code"])
        return error
    lines = "\n".join("    " + line for line in tail)
    return ModelError(f"training under `{shlex.join(launcher)}` failed: {r['kind']}: {r['message']}; "
                      f"the last lines:\n{lines}")

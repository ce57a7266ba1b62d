"""What a recipe's `launcher:` runs in each process: `python -m trainers.launched JOB` (see trainers.launch).

Every process trains; the main one logs, saves the adapter and writes the run record. The recipe's
`launcher` is not looked at here: this trains in this process, it never launches again. A module of its
own because it imports the trainer (trainers.sft), which imports trainers.launch.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

from evalkit.errors import EvalkitError
from trainers.launch import job_recipe, write_error, write_run

WATCH_S = 1.0  # how often a process checks that the evalkit process that launched it is alive


def _rank() -> int:
    """This process's rank as the launchers set it (torchrun; mpirun's for accelerate's MPI mode)."""
    for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def _watch(parent_pid: int) -> None:
    """End this process when the evalkit process that launched it is gone (killed with SIGKILL: it
    could not stop its launcher), so no trainer outlives it. torchrun starts each worker in a session
    of its own, out of reach of the signal to the launcher's process group."""
    def watch() -> None:
        while True:
            time.sleep(WATCH_S)
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                with contextlib.suppress(OSError):  # the pipe to evalkit has likely gone with it
                    print(f"trainers.launched: evalkit (pid {parent_pid}) is gone; stopping", file=sys.stderr, flush=True)
                os._exit(1)
            except PermissionError:  # alive (another user's process would be a reused pid: unlikely)
                pass

    threading.Thread(target=watch, name="evalkit-watch", daemon=True).start()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m trainers.launched JOB (a recipe's launcher runs it; see trainers/launch.py)", file=sys.stderr)
        return 2
    job_file = Path(argv[0])
    job = json.loads(job_file.read_text())
    _watch(job["parent_pid"])
    main_process = _rank() == 0
    try:
        from trainers.data import load_training_rows
        from trainers.sft import train_adapter

        recipe, resolved = job_recipe(job)
        rows = load_training_rows(recipe.data.train, recipe.data.template)
        run = train_adapter(recipe, resolved, rows, Path(job["out_dir"]), checkpoint_every=job["checkpoint_every"],
                            log=(lambda m: print(m, flush=True)) if main_process else (lambda m: None))
        from accelerate import PartialState

        if PartialState().is_main_process:  # the trainer's own notion of the main process
            write_run(job_file, run)
    except BaseException as e:
        write_error(job_file, e)
        if isinstance(e, EvalkitError) or not isinstance(e, Exception):
            return 1  # raised again by the parent, which prints it: no traceback here
        traceback.print_exc()
        return 1
    # the adapter and the run record are written: skip the interpreter's teardown of torch, trl and the
    # process group (2 of the 5 s between the last step and the launcher's exit, on 2 cores)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Command line: the only place that calls sys.exit; `evalkit run` prints its summary (`evalkit.console_summary`).

Exit codes (stable, pytest-like): 0 all gates pass, 1 a gate failed, 2 interrupted,
3 internal error, 4 usage or config error, 5 nothing to evaluate.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import NoReturn

from evalkit import __version__
from evalkit.console_summary import print_summary
from evalkit.errors import ConfigError, EvalkitError, ExitCode, missing_extra


def _err(msg: str) -> None:
    print(f"evalkit: error: {msg}", file=sys.stderr, flush=True)


def _log(msg: str) -> None:
    print(f"evalkit: {msg}", file=sys.stderr, flush=True)


def cmd_run(args: argparse.Namespace) -> int:
    from evalkit.runner import evaluate

    run = evaluate(args.suite, out=args.out, use_cache=not args.no_cache, cache_path=args.cache,
                   progress=not args.quiet and sys.stderr.isatty(), log=_log, baseline=args.baseline)
    print_summary(run.record, run.run_dir)
    return run.exit_code


def cmd_promote(args: argparse.Namespace) -> int:
    from evalkit.baseline.store import promote

    p = promote(Path(args.run_dir), args.variant, Path(args.store), force=args.force, by=args.by)
    forced = " (forced: the run's gates did not pass)" if p.forced else ""
    print(f"promoted '{p.variant}' of run {p.run_id} as bundle {p.bundle} in {args.store}{forced}")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from evalkit.baseline.store import history_lines, read_history

    history = read_history(Path(args.store))
    if not history:
        print(f"{args.store}: no promotion yet")
    for line in history_lines(history):
        print(line)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Each suite, and everything it names that can be checked without a model; the worst exit code."""
    from evalkit.config import load_suite
    from evalkit.preflight import check_inputs

    code = 0
    for path in args.suites:
        try:
            suite = load_suite(path)
            checked = check_inputs(suite)
        except EvalkitError as e:
            _err(str(e))
            code = max(code, int(e.exit_code))
            continue
        print(f"{path}: ok ({len(suite.variants)} variants, {len(suite.tasks)} tasks, {len(suite.gates)} gates)")
        for line in checked:
            print(f"  checked {line}")
    return code


def cmd_train(args: argparse.Namespace) -> int:
    import trainers

    result = trainers.ensure_adapter(Path(args.recipe), force=args.force, log=_log)
    print(f"adapter: {result.adapter_dir} ({'reused' if result.reused else 'trained'})")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Train a suite's sweeps (no scoring: `evalkit run` scores them). `--worker`: join the sweep's
    study and train what is left, as one of many workers (other machines, or `parallel:`)."""
    import signal

    from evalkit.config import load_suite
    from evalkit.models.base import cache_root
    from evalkit.preflight import check_inputs
    from evalkit.runner import sweep_objective
    from trainers.pool import run_sweep, trial_table
    from trainers.sweep import SweepPlan, work

    suite = load_suite(args.suite)
    swept = [v for v in suite.variants if v.sweep and args.variant in (None, v.name)]
    if not swept:
        names = [v.name for v in suite.variants if v.sweep]
        raise ConfigError(f"{args.suite}: no sweep{f' named {args.variant!r}' if args.variant else ''}"
                          + (f"; its sweeps: {', '.join(names)}" if names else ": no variant has `sweep:`"))
    check_inputs(suite, baseline=False)
    # a worker stopped by its coordinator (SIGTERM) fails its trial at once instead of leaving it
    # to look alive until its heartbeat goes stale
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    for v in swept:
        objective = sweep_objective(suite, _log, cache_root() / "results.sqlite") if v.sweep and v.sweep.objective else None
        with suite.locating(("variants", v._index, "sweep")):
            if args.worker:
                work(SweepPlan.of(suite, v), log=_log, objective=objective)
            else:
                for line in trial_table(run_sweep(suite, v, log=_log, objective=objective)):
                    print(line)
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    import shlex

    from evalkit.init import init
    from evalkit.preflight import shown_path

    given = [("--data", args.data), ("--test", args.test), ("--base", args.base)]
    command = shlex.join(["evalkit", "init", *(x for flag, value in given if value for x in (flag, value))])
    result = init(Path(args.data), test=Path(args.test) if args.test else None, base=args.base, folder=Path(args.dir),
                  force=args.force, command=command)
    for line in result.detected:
        print(f"detected {line}")
    for path, what in result.written:
        print(f"wrote {shown_path(path)}: {what}")
    print(f"validated {shown_path(result.suite)}: ok")
    for line in result.checked:
        print(f"  checked {line}")
    suite = shown_path(result.suite)
    print(f"next:\n  evalkit validate {suite}\n  evalkit run {suite}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from evalkit.report import render_report

    path = render_report(Path(args.run_dir), Path(args.baseline) if args.baseline else None)
    print(f"report: {path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from evalkit.serve.cli import serve_main
        from evalkit.serve.server import EvalkitServer  # noqa: F401  # the web stack, before loading a model
    except ImportError as e:
        raise missing_extra(e.name or "uvicorn", "serve") from None
    return serve_main(args)


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on a usage error, which is "interrupted" in evalkit's contract: raise a
    ConfigError (exit 4) instead, after the usage line argparse would print."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise ConfigError(message, hint=f"{self.prog} --help")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="evalkit", description="Evaluate and gate fine-tuned LLM adapters.")
    p.add_argument("--version", action="version", version=f"evalkit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="score base and every variant of a suite, apply gates")
    r.add_argument("suite")
    r.add_argument("--out", type=Path, help="run folder (default reports/<suite>-<timestamp>)")
    r.add_argument("--no-cache", action="store_true", help="recompute everything")
    r.add_argument("--cache", type=Path, help="results cache file (default $EVALKIT_CACHE_DIR/results.sqlite)")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    r.add_argument("--baseline", type=Path, metavar="STORE",
                   help="compare with the latest promotion of this baseline store (in place of the suite's)")
    r.set_defaults(fn=cmd_run)
    pr = sub.add_parser("promote", help="make a variant of a passing run the baseline later runs compare with")
    pr.add_argument("run_dir")
    pr.add_argument("--variant", required=True, help="the variant to promote")
    pr.add_argument("--store", default="baselines", help="the baseline store folder (default: baselines)")
    pr.add_argument("--force", action="store_true", help="promote a run whose gates failed (recorded as forced)")
    pr.add_argument("--by", help="who promotes (default: $GITHUB_ACTOR, else the user name)")
    pr.set_defaults(fn=cmd_promote)
    h = sub.add_parser("history", help="the promotions of a baseline store, one line each")
    h.add_argument("store")
    h.set_defaults(fn=cmd_history)
    v = sub.add_parser("validate", help="check suites and the files they name (recipes, data, schemas, rubrics) "
                                        "without running anything")
    v.add_argument("suites", nargs="+", metavar="suite")
    v.set_defaults(fn=cmd_validate)
    t = sub.add_parser("train", help="train an adapter from a recipe (reused when up to date)")
    t.add_argument("recipe")
    t.add_argument("--force", action="store_true", help="retrain even when the adapter is up to date")
    t.set_defaults(fn=cmd_train)
    sw = sub.add_parser("sweep", help="train a suite's sweeps (`evalkit run` trains and scores them); --worker "
                                      "joins a sweep as one of its workers, on this machine or another")
    sw.add_argument("suite")
    sw.add_argument("--worker", action="store_true", help="train trials of the sweep's shared study until none is "
                                                          "left (start one per machine or GPU)")
    sw.add_argument("--variant", help="only this swept variant (default: every sweep of the suite)")
    sw.set_defaults(fn=cmd_sweep)
    i = sub.add_parser("init", help="write a starter suite.yml and recipe.yml (and a train/test split) for a data file")
    i.add_argument("--data", required=True, metavar="ROWS.jsonl",
                   help="rows: messages or prompt, with target or completion (split into data/train.jsonl and "
                        "data/test.jsonl unless --test is given)")
    i.add_argument("--test", metavar="TEST.jsonl", help="the test rows (then --data is all training rows)")
    i.add_argument("--base", help="a .gguf file, pkg:PACKAGE/FILE.gguf, a local model folder, or a hub id "
                                  "(default: the embedded SmolLM2-135M-Instruct)")
    i.add_argument("--dir", default=".", help="where to write (default: the current folder)")
    i.add_argument("--force", action="store_true", help="overwrite files written before")
    i.set_defaults(fn=cmd_init)
    rep = sub.add_parser("report", help="re-render report.html for a run folder")
    rep.add_argument("run_dir")
    rep.add_argument("--baseline", help="another run folder to compare against")
    rep.set_defaults(fn=cmd_report)
    s = sub.add_parser("serve", help="OpenAI-compatible server for a base model and its adapters")
    from evalkit.serve.cli import add_arguments

    add_arguments(s)
    s.set_defaults(fn=cmd_serve)
    return p


def _quiet_libraries() -> None:
    """Library chatter (weight-loading bars, optional-kernel notices) drowns the run's own output."""
    import logging
    import os
    import warnings

    # deprecation notices between transformers / peft / trl versions are for their developers, not ours
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|trl)\b")

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("bitsandbytes", "transformers", "peft", "lm_eval", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except ConfigError as e:
        _err(str(e))
        return int(e.exit_code)
    except SystemExit as e:  # --help, --version
        return int(e.code or 0)
    _quiet_libraries()
    try:
        code = args.fn(args)
    except EvalkitError as e:
        _err(str(e))
        code = e.exit_code
    except KeyboardInterrupt:
        _err("interrupted; finished work is cached: rerun the same command to resume")
        code = ExitCode.INTERRUPTED
    except Exception:
        traceback.print_exc()
        _err("internal error (this is a bug in evalkit; please report it with the traceback above)")
        code = ExitCode.INTERNAL_ERROR
    return int(code)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()

"""Command line: the only place that prints summaries and calls sys.exit.

Exit codes (stable, pytest-like): 0 all gates pass, 1 a gate failed, 2 interrupted,
3 internal error, 4 usage or config error, 5 nothing to evaluate.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from evalkit import __version__
from evalkit.errors import ConfigError, EvalkitError, ExitCode, missing_extra
from evalkit.formatting import fmt_number

if TYPE_CHECKING:
    from evalkit.record import RunRecord


def _err(msg: str) -> None:
    print(f"evalkit: error: {msg}", file=sys.stderr, flush=True)


def _log(msg: str) -> None:
    print(f"evalkit: {msg}", file=sys.stderr, flush=True)


def _fmt(x: Any, pct: bool = True) -> str:
    return fmt_number(x, "5.1f", scale=100) if pct else fmt_number(x, ".3g")


def print_summary(record: RunRecord, run_dir: Path) -> None:
    """Metrics per task and variant with intervals and paired deltas, then the gate table."""
    from evalkit.report.data import excludes_line, ruled_out

    ref = record.reference
    cmp = {(c.task, c.metric, c.variant): c for c in record.comparisons if c.vs == ref}
    width = max([14] + [len(v.name) for v in record.variants])
    print(f"\n{record.suite.name}: {len(record.variants)} variant(s) on base {record.base.ref}")
    for task in record.tasks:
        if task.kind == "drift":
            print(f"\n  task {task.name} (drift, {task.n_cases} passages)   mean per passage [95% CI]")
            _print_drift(record, task.name, task.extras.get("vs"), width)
        else:
            print(f"\n  task {task.name} ({task.kind}, {task.n_cases} cases)   value % [95% CI]   "
                  f"delta vs {ref} (pts) [95% CI] p")
        for m in [m for m in record.metrics if m.task == task.name and task.kind != "drift"]:
            c = cmp.get((m.task, m.metric, m.variant))
            delta = ""
            if c and c.delta is not None:
                assert c.low is not None and c.high is not None  # set with delta
                mark = " *" if c.significant else ""
                counts = f" ({c.n_ref_only} lost / {c.n_cand_only} gained)" if c.n_ref_only is not None else ""
                delta = (f"{c.delta * 100:+6.1f} [{c.low * 100:+.1f}, {c.high * 100:+.1f}] "
                         f"p={c.p_value:.3g}{mark}{counts}")
            inv = f" ({m.n_invalid} invalid)" if m.n_invalid else ""
            print(f"    {m.metric:<16} {m.variant:<{width}} {_fmt(m.value)} "
                  f"[{_fmt(m.low)}, {_fmt(m.high)}]   {delta}{inv}")
        for c in ruled_out(record):
            if c.task == task.name:
                print(f"    {excludes_line(c)}")
        for what, table in (("subject", task.extras.get("per_subject")), ("lm-eval task", task.extras.get("per_task"))):
            if isinstance(table, dict) and table:
                _print_changed(what, table, ref)
        judge = task.extras.get("judge")  # the judge task's extras
        if judge:
            print("    " + _judge_noise(judge))
    if record.baseline is not None:
        _print_vs_baseline(record)
    for check in record.checks:
        if not check.passed:  # gated or not: a failed check is worth a look
            print(f"\n  check {check.name}[{check.variant}] FAILED: {check.message}")
    if record.gates:
        print("\n  gates:")
        _print_gates(record)
    if any(c.significant for c in record.comparisons):
        print(f"\n  * significant at 5% after Holm's adjustment over the run's "
              f"{len(record.comparisons)} comparisons")
    print(f"\n{verdict_line(record)}   (run folder: {run_dir})")


def verdict_line(record: RunRecord) -> str:
    """PASS only when some gate was checked, with the gates each variant got: a gate that applied
    to nothing cannot read as a pass."""
    n_fail = sum(not g.passed for g in record.gates)
    n_skip = sum(bool(g.skipped) for g in record.gates)
    n_pass = len(record.gates) - n_fail - n_skip
    if not record.gates:
        return "NO GATES: nothing was checked (the suite has no gates; scores are in the report)"
    per_variant = Counter(g.variant for g in record.gates if not g.skipped)
    skipped = f", {n_skip} skipped" if n_skip else ""
    if not per_variant:
        return f"NOTHING CHECKED: all {n_skip} gates were skipped"
    verdict = "PASS" if record.verdict == "pass" else "FAIL"
    return (f"{verdict}: {n_pass} passed, {n_fail} failed{skipped} "
            f"({', '.join(f'{v} {n}' for v, n in per_variant.items())})")


def _print_vs_baseline(record: RunRecord) -> None:
    """Each candidate against the promoted variant, paired per case, one line per metric."""
    b = record.baseline
    assert b is not None  # called for runs with a baseline
    p = b.promotion
    print(f"\n  vs {b.name}: '{p.variant}' of run {p.run_id} (bundle {p.bundle}, promoted {p.promoted_at[:16]} "
          f"by {p.by}); {b.cases} cases paired, {b.dropped} dropped")
    for d in b.differences:
        print(f"    differs: {d}")
    drift = {t.name for t in record.tasks if t.kind == "drift"}  # KL, ratios: not shares, not in points
    for c in (c for c in record.comparisons if c.vs == b.name):
        name = f"{c.task}.{c.metric}"
        if c.delta is None:
            print(f"    {name:<28} {c.variant:<12} no paired cases")
            continue
        assert c.low is not None and c.high is not None  # set with delta
        counts = f" ({c.n_ref_only} lost / {c.n_cand_only} gained)" if c.n_ref_only is not None else ""
        delta = (f"{c.delta:+.3g} [{c.low:+.3g}, {c.high:+.3g}]" if c.task in drift else
                 f"{c.delta * 100:+6.1f} [{c.low * 100:+.1f}, {c.high * 100:+.1f}] pts")
        print(f"    {name:<28} {c.variant:<12} {delta} p={c.p_value:.3g} n={c.n}{counts}")


def _print_drift(record: RunRecord, task: str, vs: Any, width: int) -> None:
    """One line per variant: mean KL from its reference (with its interval), top-1 agreement and
    the perplexity ratio; a reference itself (0, 100%, x1 by definition) is left out."""
    values = {(m.metric, m.variant): m for m in record.metrics if m.task == task}
    labels = vs if isinstance(vs, dict) else {}
    for v in dict.fromkeys(m.variant for m in record.metrics if m.task == task):
        kl, agree, ratio = (values.get((k, v)) for k in ("kl", "top1_agreement", "ppl_ratio"))
        label = labels.get(v, "its base, when promoted" if record.baseline and v == record.baseline.name else "?")
        if label in ("itself", v) or kl is None:
            continue
        print(f"    {v:<{width}} KL {_fmt(kl.value, False)} [{_fmt(kl.low, False)}, {_fmt(kl.high, False)}] "
              f"nats/token vs {label}   top-1 agreement {_fmt(agree.value if agree else None).strip()}%   "
              f"perplexity x{fmt_number(ratio.value if ratio else None, '.3f')}")


def _print_changed(what: str, table: dict[str, Any], ref: str) -> None:
    """A canary's breakdown (per subject, per lm-eval task), only the rows where some variant's value
    differs from the reference's: the whole table is in report.html."""
    def value(cell: Any) -> Any:
        return cell.get("value", cell.get("accuracy")) if isinstance(cell, dict) else None

    names = [n for n in table if isinstance(table[n], dict)]
    rows = sorted({r for n in names for r in table[n]})
    changed = [r for r in rows if any(value(table[n].get(r)) != value(table.get(ref, {}).get(r)) for n in names)]
    print(f"    {what}s where a variant differs from {ref}: {len(changed)} of {len(rows)} (all in report.html)")
    if changed:
        print("      " + f"{what:<36}" + "".join(f"{n[:12]:>13}" for n in names))
    for r in changed:
        print("      " + f"{r[:36]:<36}" + "".join(f"{_fmt(value(table[n].get(r))):>13}" for n in names))


def _print_gates(record: RunRecord) -> None:
    """A failing gate with its whole message; the passing results of a gate on one line, with the
    variants they cover (each message is in report.html, summary.md and junit.xml)."""
    passed: dict[str, list[str]] = {}
    for g in record.gates:
        if g.passed and not g.skipped:
            passed.setdefault(g.id.removesuffix(f"[{g.variant}]"), []).append(g.variant)
    for gate, variants in passed.items():
        print(f"    PASS  {gate:<40} {', '.join(variants)}")
    for g in record.gates:
        if g.skipped:
            print(f"    SKIP  {g.id:<40} {g.skipped}")
    for g in record.gates:
        if not g.passed:
            print(f"    FAIL  {g.id:<40} {g.message}")


def _judge_noise(j: dict[str, Any]) -> str:
    """How far to trust a judge: its calls, invalid verdicts, flip rate over k samples, position
    bias in pairwise mode, and agreement with the human-labelled anchors."""
    def rates(by_variant: dict[str, float | None]) -> str:
        return ", ".join(f"{v} {_fmt(r).strip()}%" for v, r in by_variant.items() if r is not None)

    parts = [f"judge {j['model']}: {j['calls']} calls ({j['cached']} cached), {j['invalid']} invalid"]
    if flips := rates(j.get("flip_rate") or {}):
        parts.append(f"flip rate over {j['samples']} samples: {flips}")
    if bias := rates(j.get("position_bias_rate") or {}):
        parts.append(f"position bias (orders disagree): {bias}")
    anchors = j.get("anchors")
    if anchors:
        parts.append(f"anchors: accuracy {_fmt(anchors['accuracy']).strip()}%, kappa {_fmt(anchors['kappa'], False)} "
                     f"(n={anchors['n']})")
    endpoint = j.get("endpoint")
    if endpoint:
        parts.append(f"weights {endpoint['fingerprint'][:12]}" if j.get("endpoint_verified") else
                     f"{endpoint['base_url']} lists no content fingerprint for '{endpoint['id']}': weights "
                     "unverified (cached verdicts keyed on URL + name only)")
    probe = (j.get("seeds") or {}).get("probe")
    if probe == "ignored":
        parts.append(f"the endpoint ignores seeds: verdicts at temperature {j['temperature']} are not reproducible")
    elif probe and probe not in ("honoured", "not needed at temperature 0"):
        parts.append(f"seed support unknown ({probe})")
    return "; ".join(parts)


def cmd_run(args: argparse.Namespace) -> int:
    from evalkit.runner import evaluate

    run = evaluate(args.suite, out=args.out, use_cache=not args.no_cache, cache_path=args.cache,
                   progress=not args.quiet and sys.stderr.isatty(), log=_log, baseline=args.baseline)
    print_summary(run.record, run.run_dir)
    return run.exit_code


def cmd_promote(args: argparse.Namespace) -> int:
    from evalkit.baseline import promote

    p = promote(Path(args.run_dir), args.variant, Path(args.store), force=args.force, by=args.by)
    forced = " (forced: the run's gates did not pass)" if p.forced else ""
    print(f"promoted '{p.variant}' of run {p.run_id} as bundle {p.bundle} in {args.store}{forced}")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from evalkit.baseline import history_lines, read_history

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

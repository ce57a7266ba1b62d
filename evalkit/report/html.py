"""report.html: one self-contained page per run folder (inline CSS, JS and SVG; no network, opens from disk).

Safety: Jinja autoescapes every value; charts are geometry computed here and drawn by template
macros (so their labels are escaped too); samples travel as JSON in a non-executed script block with
`<`, `>` and `&` escaped, and the page's own script renders them with textContent only. A CSP that
allows only that script (by hash) stops anything injected from running even if escaping ever failed.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from evalkit.record.types import BaseRecord, RunRecord, SuiteRecord, TaskRecord
from evalkit.report import data
from evalkit.report.data import fmt, fmt_delta, fmt_interval, fmt_p, fmt_p_eq, is_num
from evalkit.runlog import atomic_write

REPORT = "report.html"
PALETTE = ("#6b7280", "#2563eb", "#d97706", "#059669", "#7c3aed", "#db2777", "#0891b2", "#65a30d")


@cache
def _env() -> Environment:
    env = Environment(loader=PackageLoader("evalkit.report", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(fmt=fmt, fmt_delta=fmt_delta, fmt_p=fmt_p, fmt_p_eq=fmt_p_eq, short=lambda s: (s or "")[:12])
    env.globals.update(fmt_interval=fmt_interval, is_num=is_num)
    return env


def render_report(run_dir: Path, baseline: Path | None = None) -> Path:
    """Write run_dir/report.html from results.json + samples.jsonl (and a baseline run's results.json)."""
    run_dir = Path(run_dir)
    return write_report(run_dir, data.load_record(run_dir),
                        data.load_record(Path(baseline)) if baseline else None)


def write_report(run_dir: Path, record: RunRecord, baseline: RunRecord | None = None) -> Path:
    html = render_html(record, data.iter_samples(run_dir), baseline)
    path = Path(run_dir) / REPORT
    atomic_write(path, html)  # a reader never opens half a page
    return path


def render_html(record: RunRecord, samples: Iterable[dict[str, Any]], baseline: RunRecord | None = None) -> str:
    env = _env()
    assert env.loader is not None  # _env sets it
    script = env.loader.get_source(env, "report.js")[0]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    matrix = data.metric_matrix(record)
    colors = {v: PALETTE[i % len(PALETTE)] for i, v in enumerate(matrix.variants)}
    payload = _samples_payload(record, samples, matrix)
    return env.get_template("report.html.j2").render(
        r=record, matrix=matrix, colors=colors,
        confidence=f"{next((m.confidence for m in record.metrics if is_num(m.confidence)), 0.95):.0%}",
        verdict_line=data.verdict_line(record),
        gates=sorted(record.gates, key=lambda g: g.passed),  # failures first, order kept otherwise
        failed=[g for g in record.gates if not g.passed],
        threshold=data.gate_threshold, bound=data.gate_bound,
        n_comparisons=len(record.comparisons),
        ruled_out=[data.excludes_line(c) for c in data.ruled_out(record)],
        baseline=_baseline(record, baseline),
        canaries=[(t.name, _subject_chart(table, matrix.reference, colors))
                  for t in record.tasks for table in (t.extras.get("per_subject"), t.extras.get("per_task"))
                  if isinstance(table, Mapping)],
        training=_training(record),
        lengths=_prompt_lengths(record),
        task_details=[(t, _task_details(t)) for t in record.tasks],
        promoted=_vs_promoted(record, payload),
        samples_json=_script_json(payload),
        script=Markup(script),
        csp=f"default-src 'none'; style-src 'unsafe-inline'; img-src data:; script-src 'sha256-{digest}'",
    )


def _script_json(obj: Any) -> Markup:
    """JSON that cannot end its <script> block or open a comment: <, > and & become \\u escapes."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return Markup(text)


def _num(x: Any) -> float | None:
    return float(x) if is_num(x) else None


def _text(x: Any) -> str:
    return x if isinstance(x, str) else json.dumps(x, ensure_ascii=False, default=str)


# ---- sample browser data: one entry per (task, case), every variant's output inside

def _samples_payload(record: RunRecord, samples: Iterable[dict[str, Any]], matrix: data.Matrix) -> dict[str, Any]:
    variants = list(matrix.variants)
    tasks = [t.name for t in record.tasks]
    kinds = {t.name: t.kind for t in record.tasks}
    metrics: dict[str, list[str]] = defaultdict(list)
    for task, metric in matrix.columns:
        metrics[task].append(metric)
    cases: dict[tuple[str, str], dict[str, Any]] = {}
    for s in samples:
        task, variant = str(s.get("task", "")), str(s.get("variant", ""))
        for names, name in ((tasks, task), (variants, variant)):
            if name not in names:
                names.append(name)
        case = cases.setdefault((task, str(s.get("case_id", ""))), {
            "t": tasks.index(task), "id": str(s.get("case_id", "")), "p": _text(s.get("prompt", "")),
            "y": "" if s.get("target") is None else _text(s.get("target")),
            "m": _text(s["meta"]) if s.get("meta") else "", "o": {}})
        scores: Mapping[str, Any] = s["scores"] if isinstance(s.get("scores"), dict) else {}
        out: dict[str, Any] = {"o": _text(s.get("output", "")), "c": bool(s.get("cached")),
                               "s": {str(m): [_num(sc.get("value")), _text(sc.get("reason", ""))]
                                     for m, sc in scores.items() if isinstance(sc, dict)}}
        if _text(s.get("prompt", "")) != case["p"]:
            out["p"] = _text(s.get("prompt", ""))
        for m in out["s"]:
            if m not in metrics[task]:
                metrics[task].append(m)
        case["o"][variant] = out
    return {"variants": variants, "reference": matrix.reference, "baseline": record.baseline.name if record.baseline else None,
            "colors": [PALETTE[i % len(PALETTE)] for i in range(len(variants))],
            "tasks": [{"name": t, "metrics": metrics.get(t, []),
                       "lower": [m for m in metrics.get(t, []) if (kinds.get(t), m) in data.LOWER_IS_BETTER]}
                      for t in tasks], "cases": list(cases.values())}


# ---- charts: geometry only; the template draws it (and escapes every label)

def _ticks(lo: float, hi: float, count: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / count))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if (hi - lo) / (step * m) <= count)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _subject_chart(per_subject: Mapping[str, Any], reference: str, colors: dict[str, str]) -> dict[str, Any] | None:
    """Dot plot: one row per subject (or lm-eval task), one dot per variant; the worst drop vs the
    reference on top."""
    acc: dict[str, dict[str, float]] = defaultdict(dict)
    counts: dict[str, int] = {}
    for variant, subjects in per_subject.items():
        if not isinstance(subjects, Mapping):
            continue
        for subject, cell in subjects.items():
            if not isinstance(cell, dict):
                continue
            a = cell.get("value", cell.get("accuracy"))  # per lm-eval task: its headline metric
            if not is_num(a) and is_num(cell.get("correct")) and cell.get("n"):
                a = cell["correct"] / cell["n"]
            if is_num(a):
                acc[str(subject)][str(variant)] = float(a)
                counts[str(subject)] = max(counts.get(str(subject), 0), int(cell.get("n") or 0))
    if not acc:
        return None
    scale = 100.0 if any(a > 1 for row in acc.values() for a in row.values()) else 1.0

    def worst(subject: str) -> float:
        row = acc[subject]
        drops = [row[v] - row[reference] for v in row if v != reference and reference in row]
        return min(drops, default=0.0)

    variants = list(per_subject)
    left, width, row_h, top = 250, 460, 18, 28
    rows = []
    for i, subject in enumerate(sorted(acc, key=lambda s: (worst(s), s))):
        y = top + i * row_h + row_h / 2
        dots: list[dict[str, Any]] = [
            {"x": round(left + width * a / scale, 1), "y": round(y + (k - (len(variants) - 1) / 2) * 2.5, 1),
             "color": colors.get(v, PALETTE[0]), "title": f"{subject} · {v}: {a / scale:.0%} (n={counts[subject]})"}
            for k, v in enumerate(variants) if (a := acc[subject].get(v)) is not None]
        xs = [d["x"] for d in dots]
        rows.append({"label": subject if len(subject) <= 36 else subject[:35] + "…", "full": subject, "y": y,
                     "x0": min(xs), "x1": max(xs), "dots": dots, "n": counts[subject],
                     "worst": worst(subject) / scale, "stripe": i % 2 == 0, "top": y - row_h / 2})
    return {"w": left + width + 120, "h": top + len(rows) * row_h + 22, "left": left, "right": left + width,
            "top": top, "bottom": top + len(rows) * row_h, "row_h": row_h, "rows": rows,
            "ticks": [{"x": left + width * t, "label": f"{t:.0%}"} for t in (0, .25, .5, .75, 1)],
            "legend": [{"name": v, "color": colors.get(v, PALETTE[0])} for v in variants], "reference": reference}


def _loss_series(prov: Mapping[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """Train and eval loss by step from whichever history a trainer recorded (the bundled trainers' `log`,
    HF log_history, or a list)."""
    rows: list[Any] = next((prov[k] for k in ("log", "log_history", "loss", "history", "losses") if isinstance(prov.get(k), list)), [])
    train: list[tuple[float, float]] = []
    train_alt: list[tuple[float, float]] = []
    evals: list[tuple[float, float]] = []
    for i, row in enumerate(rows):
        if is_num(row):  # a bare list of losses
            train.append((i + 1.0, float(row)))
            continue
        if not isinstance(row, dict):
            continue
        step = row.get("step", row.get("epoch", i + 1))
        if not is_num(step):
            continue
        for key, series in (("loss", train), ("train_loss", train_alt), ("eval_loss", evals)):
            if is_num(row.get(key)):
                series.append((float(step), float(row[key])))
    # HF closes its log with an average `train_loss`: only a curve when no per-step `loss` exists
    return {name: pts for name, pts in (("train", train or train_alt), ("eval", evals)) if pts}


def _line_chart(series: dict[str, list[tuple[float, float]]], w: int = 420, h: int = 220, *, x_label: str = "step",
                what: str = "loss") -> dict[str, Any] | None:
    """Lines with dots: loss by step (train, eval), or a metric by promotion (promoted, each candidate)."""
    pts = [p for s in series.values() for p in s]
    if not pts:
        return None
    left, right, top, bottom = 52, w - 12, 14, h - 34
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad = (y1 - y0) * 0.08 or abs(y1) * 0.1 or 1.0
    y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return left + (right - left) * (x - x0) / (x1 - x0)

    def sy(y: float) -> float:
        return bottom - (bottom - top) * (y - y0) / (y1 - y0)

    whole_x = all(float(p[0]).is_integer() for p in pts)  # steps, promotions: no tick at 1.5
    styles = {"train": ("#2563eb", ""), "eval": ("#d97706", "5 4"), "promoted": ("#6b7280", "")}
    lines = [{"name": f"{name} {what}".strip(), "color": styles.get(name, (PALETTE[1 + i % 7], ""))[0],
              "dash": styles.get(name, ("", "2 3"))[1],
              "points": " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in sorted(s)),
              "dots": [{"x": round(sx(x), 1), "y": round(sy(y), 1), "title": f"{name} {what} {y:.4g} @ {x_label} {x:g}"}
                       for x, y in s]}
             for i, (name, s) in enumerate(series.items())]
    return {"w": w, "h": h, "left": left, "right": right, "top": top, "bottom": bottom, "lines": lines,
            "x_label": x_label, "what": what, "legend_x": right - 90 if what else left + 8,
            "xticks": [{"x": round(sx(t), 1), "label": f"{t:g}"} for t in _ticks(x0, x1, 5)
                       if not whole_x or float(t).is_integer()],
            "yticks": [{"y": round(sy(t), 1), "label": f"{t:.3g}"} for t in _ticks(y0, y1, 4)]}


def _vs_promoted(record: RunRecord, payload: Mapping[str, Any]) -> dict[str, Any] | None:
    """The run against the promoted baseline: paired deltas, the cases each candidate regressed or
    improved on (both outputs), and each gated metric over the store's promotions."""
    b = record.baseline
    if b is None:
        return None
    comparisons = [c for c in record.comparisons if c.vs == b.name]
    tasks = [t["name"] for t in payload["tasks"]]
    kinds = {t.name: t.kind for t in record.tasks}
    changed: dict[str, list[dict[str, Any]]] = {"regressed": [], "improved": []}
    for c in comparisons:
        if kinds.get(c.task) == "drift":
            continue  # passages have no output to show; their paired deltas are in the table
        for case in payload["cases"]:
            if tasks[case["t"]] != c.task or c.variant not in case["o"] or b.name not in case["o"]:
                continue
            now, then = case["o"][c.variant]["s"].get(c.metric, [None])[0], case["o"][b.name]["s"].get(c.metric, [None])[0]
            if now is None or then is None or now == then:
                continue
            changed["regressed" if now < then else "improved"].append({
                "task": c.task, "metric": c.metric, "variant": c.variant, "id": case["id"], "now": now, "then": then,
                "output": case["o"][c.variant]["o"], "promoted": case["o"][b.name]["o"]})
    gated = list(dict.fromkeys(g.metric for g in record.gates if g.metric and b.name in (g.vs, g.variant)))
    gated += [m for p in b.history for m in p.gated if m not in gated]
    values = {(f"{m.task}.{m.metric}", m.variant): m.value for m in record.metrics}
    candidates = list(dict.fromkeys(c.variant for c in comparisons))
    charts = []
    for metric in gated:
        series = {"promoted": [(i + 1.0, float(v)) for i, p in enumerate(b.history) if is_num(v := p.metrics.get(metric))]}
        series |= {f"{v} (this run)": [(len(b.history) + 1.0, float(x))] for v in candidates
                   if is_num(x := values.get((metric, v)))}
        charts.append((metric, _line_chart({k: pts for k, pts in series.items() if pts}, x_label="promotion", what="")))
    return {"b": b, "p": b.promotion, "comparisons": comparisons, "changed": changed, "limit": 20,
            "history": list(enumerate(b.history, 1)), "charts": [(m, c) for m, c in charts if c]}


def _flat(d: Any, prefix: str = "", depth: int = 2) -> list[tuple[str, str]]:
    """Scalar leaves of a nested mapping as (dotted.key, text); deep or long lists are left out."""
    out: list[tuple[str, str]] = []
    if not isinstance(d, dict):
        return out
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and depth > 1:
            out += _flat(v, key + ".", depth - 1)
        elif isinstance(v, list) and len(v) <= 8 and all(not isinstance(x, (dict, list)) for x in v):
            out.append((key, ", ".join(map(str, v))))
        elif not isinstance(v, (dict, list)):
            out.append((key, fmt(v) if is_num(v) and not float(v).is_integer() else str(v)))
    return out


def _training(record: RunRecord) -> list[dict[str, Any]]:
    out = []
    for v in record.variants:
        prov = v.provenance  # the trainer's evalkit_train.json: its shape is the trainer's, so read with care
        if not prov:
            continue
        stats = [(label, fmt(prov.get(key), 1) + unit) for key, label, unit in (
            ("wall_time_s", "wall time", " s"), ("tokens_per_s", "throughput", " tok/s"),
            ("peak_memory_mb", "peak memory", " MB")) if is_num(prov.get(key))]
        if prov.get("device"):
            stats.append(("device", str(prov["device"])))
        out.append({"variant": v.name, "stats": stats, "chart": _line_chart(_loss_series(prov)),
                    "recipe": _flat(prov.get("recipe")), "base": _flat(prov.get("base"), depth=1),
                    "packages": _flat(prov.get("packages"), depth=1)})
    return out


def _prompt_lengths(record: RunRecord) -> list[dict[str, Any]]:
    """length_match's quantiles, training prompts beside each task's (its details are the check's
    shape: read with care)."""
    out = []
    for c in record.checks:
        tasks = c.details.get("tasks") if c.name == "length_match" else None
        for task, m in (tasks or {}).items() if isinstance(tasks, Mapping) else ():
            train, evaluated = m.get("train_quantiles") or {}, m.get("eval_quantiles") or {}
            out.append({"variant": c.variant, "task": task, "passed": c.passed, "distance": m.get("distance"),
                        "p_value": m.get("p_value"), "n_train": m.get("n_train"), "n_eval": m.get("n_eval"),
                        "rows": [(q, train.get(q), evaluated.get(q)) for q in train]})
    return out


INVALID_POLICY = {"loss": "counted as losses", "drop": "dropped from comparisons", None: "not recorded"}


def _task_details(task: TaskRecord) -> list[tuple[str, str]]:
    """What a reviewer needs from a task's kind-specific extras (their shape is the task kind's, so
    read with care); large lists become counts."""
    extras = task.extras
    rows: list[tuple[str, str]] = [("invalid scores", INVALID_POLICY[task.invalid])]
    judge = extras.get("judge")
    if isinstance(judge, dict):
        rows += [(f"judge {k}", str(judge[k])) for k in ("model", "base_url", "calls", "cached", "invalid") if k in judge]
        for key in ("flip_rate", "position_bias_rate"):
            if isinstance(judge.get(key), dict):
                rows.append((key.replace("_", " "), ", ".join(f"{v}: {fmt(r)}" for v, r in judge[key].items())))
        endpoint = judge.get("endpoint") if isinstance(judge.get("endpoint"), dict) else {}
        if endpoint:
            rows.append(("judge weights", f"fingerprint {str(endpoint.get('fingerprint'))[:12]}"
                         if judge.get("endpoint_verified") else
                         "unverified: the endpoint lists no content fingerprint (verdicts cached on URL + name)"))
        seeds: Mapping[str, Any] = judge["seeds"] if isinstance(judge.get("seeds"), dict) else {}
        if seeds:
            honoured: dict[Any, str] = {True: "honoured: verdicts reproducible",
                                        False: "IGNORED by the endpoint: sampled verdicts are not reproducible"}
            rows.append(("judge seeds", honoured.get(seeds.get("honoured"), str(seeds.get("probe", "")))))
    if isinstance(extras.get("question_ids"), list):
        rows.append(("questions", str(len(extras["question_ids"]))))
    if isinstance(extras.get("seconds_per_question"), dict):
        rows.append(("seconds per question", ", ".join(f"{v}: {fmt(s)}" for v, s in extras["seconds_per_question"].items())))
    if isinstance(extras.get("per_subject"), dict):
        subjects = {s for per in extras["per_subject"].values() if isinstance(per, dict) for s in per}
        rows.append(("subjects", str(len(subjects))))
    if isinstance(extras.get("per_task"), dict):
        tasks = {t for per in extras["per_task"].values() if isinstance(per, dict) for t in per}
        rows.append(("lm-eval tasks", ", ".join(sorted(tasks))))
    if isinstance(extras.get("lm_eval"), dict):  # lm-eval's own aggregates, to compare with evalkit's
        for variant, tasks in extras["lm_eval"].items():
            if isinstance(tasks, dict):
                rows.append((f"lm-eval's numbers, {variant}", "; ".join(
                    f"{t} " + ", ".join(f"{k} {fmt(v)}" for k, v in nums.items())
                    for t, nums in tasks.items() if isinstance(nums, dict))[:300]))
    known = {"judge", "question_ids", "seconds_per_question", "per_subject", "per_task", "lm_eval"}
    rows += [(k, _text(v)[:300]) for k, v in extras.items() if k not in known]
    return rows


def _baseline(record: RunRecord, base: RunRecord | None) -> dict[str, Any] | None:
    """`evalkit report RUN --baseline OLDER`: two unpaired runs side by side, with what makes them
    incomparable (another suite file, another base model) said up front."""
    if base is None:
        return None
    warnings = []
    parts: tuple[tuple[str, SuiteRecord | BaseRecord, SuiteRecord | BaseRecord], ...] = (
        ("suite file", record.suite, base.suite), ("base model", record.base, base.base))
    for label, a, b in parts:
        if a.sha256 != b.sha256:
            warnings.append(f"the {label} differs between the two runs ({a.sha256[:12]} vs {b.sha256[:12]})")
    return {"r": base, "rows": data.baseline_rows(record, base), "warnings": warnings,
            "gates": {g.id: g for g in base.gates}}

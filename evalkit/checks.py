"""Checks that catch silent failures no score shows: the inert adapter, the lossy merge, leakage,
a server that does not serve what it says, and the pitfalls the guides name (an adapter that no
longer stops, an unhealthy training run, training prompts unlike the eval's: `evalkit.pitfalls`).

Each returns `CheckRecord`s (name, variant, passed, message, details); gates with `check:` read
them, and a hard failure (an adapter that changes nothing) raises before any scoring.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from evalkit.backends.base import PROBES, token_ids
from evalkit.cache import adapter_active_key
from evalkit.config.suite import (
    HEALTH_MAX_EVAL_RISE,
    HEALTH_MAX_GAP,
    HEALTH_MIN_LOSS_DROP,
    LENGTH_MAX_SHIFT,
    STOPS_MAX_INCREASE,
    CasesTask,
    Gate,
)
from evalkit.record import CheckRecord
from evalkit.types import Case

# fp32 noise between two code paths on the same weights is ~1e-5; a live adapter moves logits far more
ACTIVE_TOLERANCE = 1e-4
# a server against the in-process fp32 reference: ~1e-5 in fp32, up to a few 1e-2 in bf16 on a GPU
PARITY_TOLERANCE = 0.05
PARITY_MIN_TOP1 = 0.95


def _case_prompts(ctx, limit: int) -> list[str]:
    """The first `limit` rendered cases of the first task with a dataset (what the run will score)."""
    for task in ctx.suite.tasks:
        if isinstance(task, CasesTask):
            from evalkit.tasks.generation import task_cases

            return [ctx.render(c).text for c in task_cases(task, limit=limit)]
    return []


def _probe_prompts(ctx, limit: int = 4) -> list[str]:
    return list(PROBES) + _case_prompts(ctx, limit)


def _diff(a, b) -> tuple[float, float]:
    """(max abs logit difference, top-1 agreement) over every position of every prompt."""
    import torch

    max_abs = max(float((x - y).abs().max()) for x, y in zip(a, b))
    agree = torch.cat([(x.argmax(-1) == y.argmax(-1)).float() for x, y in zip(a, b)])
    return max_abs, float(agree.mean())


def _logprob_diff(a: list[tuple[list[float], list[str]]], b: list[tuple[list[float], list[str]]]) -> tuple[float, float]:
    """(max abs difference of the prompt tokens' logprobs, agreement of the top-1 tokens) over every
    position of every prompt, from `prompt_logprobs` of two backends (or two models)."""
    diffs = [abs(x - y) for (la, _), (lb, _) in zip(a, b) for x, y in zip(la, lb)]
    agree = [x == y for (_, ta), (_, tb) in zip(a, b) for x, y in zip(ta, tb)]
    return max(diffs, default=0.0), sum(agree) / len(agree) if agree else 1.0


def adapter_active(ctx, log) -> list[CheckRecord]:
    """Every adapter variant must move the model beyond numerical noise; otherwise it is inert (zero
    B matrices, wrong target modules, a loader that dropped it) and scoring it is a lie. In process,
    the logits with and without the adapter are compared, and an inert adapter stops the run (the
    files are broken). On a server, the served adapter's prompt logprobs are compared with those of
    the model it is served on (its `parent`), and an inert one fails the check (the deployment is
    broken). A passed check is cached under the variant's fingerprint: a rerun computes nothing."""
    texts = _probe_prompts(ctx, limit=2)
    prompts = token_ids(ctx.tokenizer, texts)
    records = []
    references: dict[int, list] = {}  # variants on the same weights share their adapters-off logits
    served_refs: dict[tuple[int, str | None], list] = {}  # adapters served on one base share its logprobs
    for lv in ctx.variants:
        remote = not lv.backend.capabilities.full_logits
        parent = lv.backend.parent(lv.name) if remote else None
        if (lv.info is None and not remote) or (remote and parent is None):
            continue
        what = "max |logprob diff| vs the served base" if remote else "max |logit diff| vs base"
        field = "max_abs_logprob_diff" if remote else "max_abs_logit_diff"
        key = adapter_active_key(lv.fingerprint, texts, ACTIVE_TOLERANCE)
        found = ctx.cache.get(key, count=False)
        if found is None:
            backend = lv.backend
            if remote:
                ref_key = id(backend), parent
                if ref_key not in served_refs:
                    served_refs[ref_key] = backend.prompt_logprobs(parent, prompts)
                max_abs, agree = _logprob_diff(backend.prompt_logprobs(backend.served[lv.name], prompts),
                                               served_refs[ref_key])
            else:
                ref = backend.reference_of(lv.name)
                if ref not in references:
                    references[ref] = backend.logits(lv.name, prompts, adapters_off=True)
                max_abs, agree = _diff(backend.logits(lv.name, prompts), references[ref])
            found = {field: max_abs, "top1_agreement": agree}
            if max_abs <= ACTIVE_TOLERANCE:
                where = f"served as '{backend.served[lv.name]}' on '{parent}'" if remote else f"({lv.info.path})"
                msg = (f"adapter of variant '{lv.name}' {where} changes nothing: {what} {max_abs:.2e} <= "
                       f"{ACTIVE_TOLERANCE:g} on {len(prompts)} probe prompts")
                if not remote:
                    raise ctx.suite.error(ctx.suite.variant_path(lv.name),
                                          msg + " (zero B matrices, wrong target_modules, or weights that did not load?)")
                log(f"FAIL: adapter_active: {msg} (the server serves an inert adapter)")
                records.append(CheckRecord(name="adapter_active", variant=lv.name, passed=False, message=msg,
                                           details=found))
                continue
            ctx.cache.put(key, found)
        records.append(CheckRecord(name="adapter_active", variant=lv.name, passed=True,
                                   message=f"{what} {found[field]:.3g}, "
                                           f"top-1 agreement {found['top1_agreement']:.1%}",
                                   details=found))
    return records


def backend_parity(ctx, log) -> list[CheckRecord]:
    """Each variant a server serves, against the same variant in process (`hf`, the reference) on
    the probe prompts and the first task cases: the prompt tokens' logprobs and the top-1 token at
    every position, and the greedy continuations of the probes. It fails, with numbers, when the
    server serves the adapter inert, serves another adapter or model, or drifts beyond tolerance.
    It runs when a gate asks for it: the reference loads the model in process."""
    if not any(g.check == "backend_parity" for g in ctx.suite.gates):
        return []
    texts = _probe_prompts(ctx, limit=2)
    prompts = token_ids(ctx.tokenizer, texts)
    records = []
    for lv in ctx.variants:
        if ctx.suite.backend_of(lv.variant).kind == "hf":
            continue
        if lv.backend.capabilities.full_logits:
            records.append(CheckRecord(name="backend_parity", variant=lv.name, passed=True,
                                       message="runs in process (fallback: hf): it is the reference"))
            continue
        tol = _tolerance(ctx, "backend_parity", lv.name, "max_abs_logprob_diff", PARITY_TOLERANCE)
        min_agree = _tolerance(ctx, "backend_parity", lv.name, "min_top1_agreement", PARITY_MIN_TOP1)
        served = lv.backend.served[lv.name]
        reference = ctx.reference(lv)
        max_abs, agree = _logprob_diff(lv.backend.prompt_logprobs(served, prompts),
                                       ctx.hf.prompt_logprobs(reference, prompts))
        greedy = _greedy_agreement(ctx, lv, reference)
        passed = max_abs <= tol and agree >= min_agree
        msg = (f"served '{served}' vs in process: max |logprob diff| {max_abs:.3g} "
               f"({'<=' if max_abs <= tol else '>'} {tol:g}), top-1 agreement {agree:.1%} "
               f"({'>=' if agree >= min_agree else '<'} {min_agree:.0%}) over {len(prompts)} prompts; "
               f"greedy continuations {greedy[0]}/{greedy[1]} identical")
        if not passed:
            msg += "; " + _parity_diagnosis(ctx, lv, prompts)
        log(("" if passed else "FAIL: ") + f"backend_parity [{lv.name}]: {msg}")
        records.append(CheckRecord(name="backend_parity", variant=lv.name, passed=passed, message=msg, details={
            "served_name": served, "max_abs_logprob_diff": max_abs, "top1_agreement": agree, "tolerance": tol,
            "min_top1_agreement": min_agree, "greedy_identical": greedy[0], "greedy_compared": greedy[1],
            "n_prompts": len(prompts)}))
    return records


def _greedy_agreement(ctx, lv, reference: str) -> tuple[int, int]:
    """How many of the probes' greedy continuations (as the identity probe got them) the in-process
    reference continues identically."""
    from evalkit.backends.base import Prompt
    from evalkit.backends.remote import PROBE_TOKENS
    from evalkit.config.suite import GenerationConfig

    served = lv.backend.probe_texts(lv.name)
    local: dict[int, str] = {}
    prompts = [Prompt(t, tuple(ids)) for t, ids in zip(PROBES, token_ids(ctx.tokenizer, list(PROBES)))]
    ctx.hf.generate([(reference, i) for i in range(len(prompts))], prompts,
                    GenerationConfig(max_new_tokens=PROBE_TOKENS, batch_size=1),
                    lambda rows: local.update({i: o.text for _, i, o in rows}))
    return sum(served[i] == local[i] for i in range(len(prompts))), len(prompts)


def _parity_diagnosis(ctx, lv, prompts: list[list[int]]) -> str:
    """What the served model looks like when it is not the reference: inert (its parent's answers),
    or something else."""
    parent = lv.backend.parent(lv.name)
    if lv.info is not None and parent is not None:
        to_parent, _ = _logprob_diff(lv.backend.prompt_logprobs(lv.backend.served[lv.name], prompts),
                                     lv.backend.prompt_logprobs(parent, prompts))
        if to_parent <= ACTIVE_TOLERANCE:
            return (f"the served adapter is inert: it answers as its base '{parent}' "
                    f"(max |logprob diff| {to_parent:.2e})")
    return "the server serves another adapter or model under this name, or computes it differently"


def leakage(ctx, log) -> list[CheckRecord]:
    """Eval cases that also appear in an adapter's training data, through `leakage.adapter_overlap`
    on the index its trainer stored in its provenance, counted as cases (a case may match several
    training rows). An adapter whose training data is unknown (no provenance, or an index made with
    another normalization) gets a skipped record with the reason."""
    from evalkit.leakage import NORMALIZATION, adapter_overlap
    from evalkit.tasks.generation import task_cases

    cases: dict[str, list[Case]] = {task.name: task_cases(task) for task in ctx.suite.tasks
                                    if isinstance(task, CasesTask)}
    records = []
    for lv in ctx.variants:
        if lv.info is None:
            continue
        prov, skipped = _provenance(lv)
        if prov and adapter_overlap((), prov) is None:
            skipped = (f"the provenance of '{lv.name}' has no training-data index made with normalization "
                       f"{NORMALIZATION} (retrain it: `evalkit train RECIPE --force`)")
        if skipped:
            records.append(_skipped("no_leakage", lv.name, skipped))
            continue
        leaked: dict[str, dict[str, list[str]]] = {}  # task -> eval case -> the training rows it matches
        for task, rows in cases.items():
            for case_id, train_id in adapter_overlap(rows, prov) or ():
                leaked.setdefault(task, {}).setdefault(case_id, []).append(train_id)
        msg = "; ".join(_leak_text(task, found, len(cases[task]), lv.name) for task, found in leaked.items()) \
            or f"none of {sum(map(len, cases.values()))} eval cases appears in the training data"
        if leaked:
            log(f"FAIL: no_leakage [{lv.name}]: {msg}")
        records.append(CheckRecord(name="no_leakage", variant=lv.name, passed=not leaked, message=msg, details={
            "leaked_cases": {task: len(found) for task, found in leaked.items()},
            "overlaps": [{"task": task, "case_id": case_id, "train_id": train_id}
                         for task, found in leaked.items() for case_id, ids in found.items() for train_id in ids]}))
    return records


def _leak_text(task: str, found: dict[str, list[str]], n: int, variant: str) -> str:
    shown = ", ".join(f"{case_id} (train {', '.join(ids[:3])}{' ...' if len(ids) > 3 else ''})"
                      for case_id, ids in list(found.items())[:5])
    rows = sum(map(len, found.values()))
    return (f"{task}: {len(found)} of {n} eval cases also in the training data of '{variant}'"
            + (f" ({rows} training rows match)" if rows != len(found) else "")
            + f": {shown}{' ...' if len(found) > 5 else ''}")


def _gate_for(ctx, check: str, variant: str) -> Gate | None:
    """The `check:` gate for this variant (a gate naming it beats a catch-all one)."""
    gates = [g for g in ctx.suite.gates if g.check == check and g.variant in (None, variant)]
    gates.sort(key=lambda g: g.variant is None)
    return gates[0] if gates else None


def _tolerance(ctx, check: str, variant: str, key: str, default: float) -> float:
    """A tolerance from the `check:` gate for this variant, else its default."""
    value = getattr(_gate_for(ctx, check, variant), key, None)
    return default if value is None else value


def merge_equivalence(ctx, results, log) -> list[CheckRecord]:
    """Merged variant vs its unmerged twin on probe prompts and task cases (max |logit diff|, top-1
    agreement at every position) and on the task scores (paired deltas, reported). A merge into a
    full-precision base matches its twin to fp32 noise; a merge into a 4-bit base re-quantizes
    the merged weights and fails."""
    merged = [lv for lv in ctx.variants if lv.variant.merge]
    if not merged:
        return []
    probes, cases = list(PROBES), _case_prompts(ctx, limit=8)
    twin_logits: dict[str, list] = {}  # qlora-merged and qlora-merged-4bit share one twin
    records = []
    for lv in merged:
        tol = _tolerance(ctx, "merge_equivalence", lv.name, "max_abs_logit_diff", 1e-3)
        min_agree = _tolerance(ctx, "merge_equivalence", lv.name, "min_top1_agreement", 0.99)
        twin = _unmerged_twin(ctx, lv)
        if twin.name not in twin_logits:
            twin_logits[twin.name] = twin.backend.logits(twin.name, token_ids(ctx.tokenizer, probes + cases))
        a, b = lv.backend.logits(lv.name, token_ids(ctx.tokenizer, probes + cases)), twin_logits[twin.name]
        max_abs, agree = _diff(a, b)
        per_set = {"probes": _diff(a[:len(probes)], b[:len(probes)])}
        if cases:
            per_set["task_cases"] = _diff(a[len(probes):], b[len(probes):])
        scores = _score_deltas(ctx, results, lv, twin)
        passed = max_abs <= tol and agree >= min_agree
        where = "; ".join(f"{k} ({n}): {d:.3g} / {g:.1%}" for (k, (d, g)), n in
                          zip(per_set.items(), (len(probes), len(cases))))
        msg = (f"'{lv.name}' vs unmerged '{twin.name}': max |logit diff| {max_abs:.3g} "
               f"({'<=' if max_abs <= tol else '>'} {tol:g}), top-1 agreement {agree:.1%} "
               f"({'>=' if agree >= min_agree else '<'} {min_agree:.0%}) [{where}]")
        if scores:
            msg += "; paired score deltas " + ", ".join(
                f"{k} {c['delta']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]" for k, c in scores.items())
        log(("" if passed else "FAIL: ") + f"merge_equivalence: {msg}")
        records.append(CheckRecord(
            name="merge_equivalence", variant=lv.name, passed=passed, message=msg,
            details={"twin": twin.name, "merge_into": lv.variant.merge_target, "quantize": lv.variant.quantize,
                     "max_abs_logit_diff": max_abs, "top1_agreement": agree, "tolerance": tol,
                     "min_top1_agreement": min_agree,
                     **{f"{k}_max_abs_logit_diff": d for k, (d, _) in per_set.items()},
                     **{f"{k}_top1_agreement": g for k, (_, g) in per_set.items()},
                     "score_deltas": scores, "n_prompts": len(probes) + len(cases)}))
    return records


def _score_deltas(ctx, results, lv, twin) -> dict[str, dict[str, Any]]:
    """Paired task-score deltas merged - unmerged. A twin that is not a suite variant is generated
    and scored here (cached like any variant) for generation tasks."""
    from evalkit.stats import paired_compare
    from evalkit.tasks import generation

    out = {}
    for task in ctx.suite.tasks:
        tr = results.get(task.name)
        if tr is None:
            continue
        twin_samples = [s for s in tr.samples if s.variant == twin.name]
        if not twin_samples and task.kind == "generate":
            cases = generation.task_cases(task)
            twin_samples = generation.score_outputs(
                task, twin.name, cases, ctx.generate(twin, cases, task.generation, desc=f"{task.name} (twin)"))
        for metric, binary in tr.binary.items():
            a = {s.case_id: s.scores[metric].value for s in tr.samples if s.variant == lv.name and metric in s.scores}
            b = {s.case_id: s.scores[metric].value for s in twin_samples if metric in s.scores}
            ids = [i for i in a if i in b]
            if ids:
                c = paired_compare([b[i] for i in ids], [a[i] for i in ids], binary=binary)
                out[f"{task.name}.{metric}"] = {"delta": c.delta, "low": c.low, "high": c.high,
                                                "p_value": c.p_value, "n": c.n}
    return out


def _unmerged_twin(ctx, lv):
    """The same adapter, unmerged, on the base precision the merge started from: the quantized
    base for a QLoRA adapter (dequantize-then-merge must reproduce it), else the full one."""
    for other in ctx.variants:
        if (other.info is not None and not other.variant.merge and other.info.sha256 == lv.info.sha256
                and other.variant.quantize == lv.variant.quantize):
            return other
    return ctx.attach_twin(lv)


# ------------------------------------------------------------------------ the pitfalls the guides name

def stops_generating(ctx, results, log) -> list[CheckRecord]:
    """Each variant's outputs cut at max_new_tokens against its reference's (the base, or the
    gate's `vs:`) on the same cases of every generating task, paired: an adapter that lost its end
    of turn (EOS masked out of the loss, a dataset without it) runs on where the base stopped,
    and exact match may not show it. On by default for generation tasks (`max_increase:` points)."""
    from evalkit.pitfalls import runaway

    base = next((lv.name for lv in ctx.variants if lv.variant.is_base), None)
    cut = {name: {(s.variant, s.case_id): s.meta["finish_reason"] == "length" for s in tr.samples
                  if s.meta.get("finish_reason")} for name, tr in results.items()}
    records = []
    for lv in ctx.variants:
        gate = _gate_for(ctx, "stops_generating", lv.name)
        ref = (gate.vs if gate else None) or base
        if ref is None or ref == lv.name:
            continue
        limit = _tolerance(ctx, "stops_generating", lv.name, "max_increase", STOPS_MAX_INCREASE)
        level = gate.confidence if gate else None
        per_task = {}
        for task, outs in cut.items():
            ids = [c for v, c in outs if v == lv.name and (ref, c) in outs]
            if ids:
                per_task[task] = runaway([outs[lv.name, c] for c in ids], [outs[ref, c] for c in ids],
                                         max_increase=limit, confidence=level)
        if not per_task:
            continue
        passed = all(r.passed for r in per_task.values())
        msg = "; ".join(_runaway_text(task, ref, r, limit, level) for task, r in per_task.items())
        if not passed:
            log(f"FAIL: stops_generating [{lv.name}]: {msg}")
        records.append(CheckRecord(name="stops_generating", variant=lv.name, passed=passed, message=msg, details={
            "vs": ref, "max_increase": limit, "confidence": level,
            "tasks": {task: dataclasses.asdict(r) for task, r in per_task.items()}}))
    return records


def _runaway_text(task: str, ref: str, r, limit: float, level: float | None) -> str:
    if level is None:
        how = f"{r.increase:+.1f} pts {'<=' if r.passed else '>'} max_increase {limit:g} (point estimate)"
    else:
        how = (f"upper {level:.0%} one-sided bound {r.bound:.2f} pts {'<' if r.passed else '>='} "
               f"max_increase {limit:g}")
    return (f"{task}: {r.variant_cut}/{r.n} outputs cut at max_new_tokens ({r.variant_cut / r.n:.0%}) vs "
            f"{r.reference_cut}/{r.n} ({r.reference_cut / r.n:.0%}) for {ref}: {r.ran_on} ran on where {ref} "
            f"stopped, {r.stopped} the reverse, {r.increase:+.1f} pts [{r.low:+.1f}, {r.high:+.1f}], "
            f"p={r.p_value:.3g}; {how}")


def _skipped(check: str, variant: str, why: str) -> CheckRecord:
    """A check that does not apply to this variant: passed, marked skipped, with the reason."""
    return CheckRecord(name=check, variant=variant, passed=True, skipped=why, message=f"skipped: {why}")


def _provenance(lv) -> tuple[dict[str, Any] | None, str | None]:
    """(provenance, None), or (None, why the checks that read it skip this variant)."""
    prov = lv.info.provenance if lv.info else None
    if not prov:
        return None, (f"adapter of '{lv.name}' has no provenance (evalkit_train.json): it was not trained by "
                      f"evalkit's runners, so its training cannot be read")
    return prov, None


def training_health(ctx, log) -> list[CheckRecord]:
    """An adapter's training, read from its provenance's per-step log: eval loss that turned up
    while train loss fell (overfitting, with the step it turned), a train/eval gap, NaN/inf
    losses, a train loss that barely fell, a learning rate that never left warmup. With early
    stopping the saved adapter is the best checkpoint, so the log is read up to that step."""
    records = []
    for lv in ctx.variants:
        if lv.info is None:
            continue
        prov, skipped = _provenance(lv)
        if skipped:
            records.append(_skipped("training_health", lv.name, skipped))
            continue
        record = health_record(
            lv.name, prov or {},
            max_eval_rise=_tolerance(ctx, "training_health", lv.name, "max_eval_rise", HEALTH_MAX_EVAL_RISE),
            max_gap=_tolerance(ctx, "training_health", lv.name, "max_gap", HEALTH_MAX_GAP),
            min_loss_drop=_tolerance(ctx, "training_health", lv.name, "min_loss_drop", HEALTH_MIN_LOSS_DROP))
        if not record.passed:
            log(f"FAIL: training_health [{lv.name}]: {record.message}")
        records.append(record)
    return records


def health_record(variant: str, prov: dict[str, Any], *, max_eval_rise: float, max_gap: float,
                  min_loss_drop: float | None, min_points: int | None = None) -> CheckRecord:
    """training_health on one adapter's provenance (bench/bench_checks.py calls it directly:
    `min_points=2, min_loss_drop=None` is the rule before issue 30)."""
    from evalkit.pitfalls import MIN_TREND_POINTS, health_summary
    from evalkit.pitfalls import training_health as health

    steps = prov.get("log")
    if not (isinstance(steps, list) and all(isinstance(e, dict) and "step" in e for e in steps)):
        return _skipped("training_health", variant, f"the provenance of '{variant}' has no per-step loss log")
    kept = (prov.get("early_stopping") or {}).get("best_step")
    if isinstance(kept, int):
        steps = [e for e in steps if e["step"] <= kept]
    peak = ((prov.get("recipe") or {}).get("training") or {}).get("learning_rate")
    passed, findings, details = health(
        steps, peak_lr=peak if isinstance(peak, int | float) else None, max_eval_rise=max_eval_rise, max_gap=max_gap,
        min_loss_drop=min_loss_drop, min_points=MIN_TREND_POINTS if min_points is None else min_points)
    msg = "; ".join(findings + details["notes"]) if findings else health_summary(details)
    if isinstance(kept, int):
        msg += f" (early stopping kept the checkpoint of step {kept} of {prov.get('steps')})"
        details["early_stopping_step"] = kept
    return CheckRecord(name="training_health", variant=variant, passed=passed, message=msg, details=details)


def length_match(ctx, log) -> list[CheckRecord]:
    """Each adapter's training prompt lengths (tokens, recorded in its provenance) against each
    generating task's prompts as rendered here: the two-sample Kolmogorov-Smirnov test (level
    1 - the gate's `confidence:`, default 95%) for whether they differ, the relative shift of
    their quantiles for how much (`max_shift:`, default 25%), and the quantiles side by side. A
    model tuned on short prompts and evaluated (or deployed) on long ones is outside what it
    learned; one tuned on 58-token prompts and evaluated on 55-token ones is not."""
    from evalkit.tasks.generation import task_cases

    tasks = [task for task in ctx.suite.tasks if isinstance(task, CasesTask)]
    lengths: dict[str, list[int]] = {}  # rendered on first need: most runs have no adapter to compare
    records = []
    for lv in ctx.variants:
        if lv.info is None or not tasks:
            continue
        prov, skipped = _provenance(lv)
        train = ((prov or {}).get("data") or {}).get("prompt_tokens")
        if prov and not (isinstance(train, list) and train and all(isinstance(n, int) for n in train)):
            skipped = (f"the provenance of '{lv.name}' records no training prompt lengths (trained before they "
                       f"were recorded: `evalkit train RECIPE --force`)")
        if skipped:
            records.append(_skipped("length_match", lv.name, skipped))
            continue
        assert isinstance(train, list)  # not skipped
        lengths = lengths or {task.name: [len(ctx.render(c).ids) for c in task_cases(task)]
                              for task in tasks}
        gate = _gate_for(ctx, "length_match", lv.name)
        record = length_record(lv.name, train, lengths, level=(gate.confidence if gate else None) or 0.95,
                               max_distance=_tolerance(ctx, "length_match", lv.name, "max_distance", 0.0),
                               max_shift=_tolerance(ctx, "length_match", lv.name, "max_shift", LENGTH_MAX_SHIFT))
        if not record.passed:
            log(f"FAIL: length_match [{lv.name}]: {record.message}")
        records.append(record)
    return records


def length_record(variant: str, train: list[int], lengths: dict[str, list[int]], *, level: float,
                  max_distance: float, max_shift: float | None) -> CheckRecord:
    """length_match of one adapter's training prompt lengths against each task's (bench/bench_checks.py
    calls it directly: `max_shift=None` is the rule before issue 30, significance alone)."""
    from evalkit.pitfalls import length_match as compare

    per_task = {task: compare(train, n, alpha=1 - level, max_distance=max_distance, max_shift=max_shift)
                for task, n in lengths.items()}
    msg = "; ".join(_length_text(task, m, level, max_distance, max_shift) for task, m in per_task.items())
    return CheckRecord(name="length_match", variant=variant, passed=all(m.passed for m in per_task.values()),
                       message=msg, details={"confidence": level, "max_distance": max_distance, "max_shift": max_shift,
                                             "tasks": {t: dataclasses.asdict(m) for t, m in per_task.items()}})


def _length_text(task: str, m, level: float, far: float, max_shift: float | None) -> str:
    """Both numbers, whichever decided: whether the lengths differ (KS) and by how much (the shift)."""
    tq, eq = m.train_quantiles, m.eval_quantiles
    text = (f"{task}: train p50 {tq['p50']:g} [p10 {tq['p10']:g}, p90 {tq['p90']:g}] vs eval p50 {eq['p50']:g} "
            f"[p10 {eq['p10']:g}, p90 {eq['p90']:g}] tokens; KS distance {m.distance:.3f}, p={m.p_value:.3g}, "
            f"largest shift {m.shift:.0%} (at {m.shift_at})")
    if not m.significant:
        return text + f": no difference at {1 - level:.0%}"
    if max_shift is not None and m.shift <= max_shift:
        return text + f": significant at {1 - level:.0%} but small (shift <= max_shift {max_shift:.0%})"
    if m.distance <= far:
        return text + f": significant at {1 - level:.0%} but small (distance <= max_distance {far:g})"
    return text + (f": differ at {1 - level:.0%}"
                   + (f", shift > max_shift {max_shift:.0%}" if max_shift is not None else "")
                   + (f", distance > max_distance {far:g}" if far else ""))

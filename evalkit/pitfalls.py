"""The quiet ways a fine-tune fails that the guides write about, as pure functions of recorded data:
runaway generation (outputs cut at max_new_tokens where the base stopped), an unhealthy training
run (eval loss turned up while train loss fell, NaN losses, a train loss that barely moved, a
learning rate still warming up), and training prompts whose lengths do not resemble the eval's. `evalkit.checks` feeds them a run's
samples and an adapter's provenance and turns their verdicts into check records.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from evalkit.stats.paired import paired_compare
from evalkit.stats.two_sample import ks_two_sample

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


# ------------------------------------------------------------------------ runaway generation

@dataclass(frozen=True)
class Runaway:
    """Outputs cut at max_new_tokens ("length") by a variant and its reference on the same cases."""

    n: int
    variant_cut: int
    reference_cut: int
    ran_on: int  # cut for the variant where the reference stopped
    stopped: int  # the reverse
    increase: float  # points: variant's cut share minus the reference's
    low: float  # two-sided 95% interval of the increase (Tango), points
    high: float
    p_value: float
    bound: float | None  # the upper one-sided bound tested at the gate's confidence, points
    passed: bool


def runaway(variant_cut: Sequence[bool], reference_cut: Sequence[bool], *, max_increase: float,
            confidence: float | None) -> Runaway:
    """Paired on the same cases, through the calibrated paired test of every `max_drop` gate: a
    stop is a 1, a cut a 0, so a rise of the cut share is a drop of the stop share. Without
    `confidence` the point estimate is compared exactly (as counts); with it, the upper bound."""
    cmp = paired_compare([float(not c) for c in reference_cut], [float(not c) for c in variant_cut], binary=True)
    n, v, r = len(variant_cut), sum(variant_cut), sum(reference_cut)
    bound = None
    if confidence is not None:
        bound = cmp.upper_drop(confidence) * 100
        passed = bound < max_increase
    else:
        passed = Fraction((v - r) * 100, n) <= Fraction(repr(float(max_increase)))
    def rise(stop_delta: float) -> float:  # points of cut share; 0.0 - x never prints "-0.0"
        return (0.0 - stop_delta) * 100

    return Runaway(n=n, variant_cut=v, reference_cut=r, ran_on=int(cmp.n_ref_only or 0),
                   stopped=int(cmp.n_cand_only or 0), increase=rise(cmp.delta), low=rise(cmp.high),
                   high=rise(cmp.low), p_value=cmp.p_value, bound=bound, passed=bool(passed))


# ------------------------------------------------------------------------ training health

def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


MIN_TREND_POINTS = 3  # logged points a trend needs: two points cannot tell a rise from a schedule's turn
LOSS_END_POINTS = 3  # the end of the train loss: the mean of the last few logged points (one batch is noisy)


def training_health(log: Sequence[Mapping[str, Any]], *, peak_lr: float | None, max_eval_rise: float,
                    max_gap: float, min_loss_drop: float | None,
                    min_points: int = MIN_TREND_POINTS) -> tuple[bool, list[str], dict[str, Any]]:
    """(passed, findings, details) from a trainer's per-step log (`step`, `loss`, `eval_loss`,
    `learning_rate`). Fails on a NaN/inf loss, on eval loss ending more than `max_eval_rise` (a
    fraction) above its minimum while train loss fell since (overfitting: the step it turned is
    named), on a final eval loss more than `max_gap` nats above the train loss, on a loss that
    fell by less than `min_loss_drop` (a fraction of where it started: see `_loss_drop`; None: not
    checked), and on a learning rate that rose at every logged step without reaching its peak
    (warmup never ended). A trend needs `min_points` logged points: with fewer, `details["notes"]`
    says so and nothing is concluded."""
    findings: list[str] = []
    notes: list[str] = []
    details: dict[str, Any] = {"max_eval_rise": max_eval_rise, "max_gap": max_gap, "min_loss_drop": min_loss_drop,
                               "notes": notes}
    bad = [(e["step"], k, e[k]) for e in log for k in ("loss", "eval_loss", "grad_norm")
           if k in e and not _finite(e[k])]
    if bad:
        step, key, value = bad[0]
        findings.append(f"{key} is {value} at step {step}"
                        + (f" (and {len(bad) - 1} more non-finite values)" if len(bad) > 1 else ""))
        details["non_finite"] = [{"step": s, "key": k} for s, k, _ in bad]
    train = [(e["step"], e["loss"]) for e in log if _finite(e.get("loss"))]
    evals = [(e["step"], e["eval_loss"]) for e in log if _finite(e.get("eval_loss"))]
    details["eval_points"] = len(evals)
    if len(evals) >= 2:
        turn_step, best = min(evals, key=lambda se: se[1])
        end_step, end = evals[-1]
        rise = (end - best) / best if best > 0 else (math.inf if end > best else 0.0)
        train_then = [loss for s, loss in train if s <= turn_step]
        train_fell = bool(train) and bool(train_then) and train[-1][1] < train_then[-1]
        details |= {"eval_min": best, "eval_min_step": turn_step, "eval_final": end, "eval_rise": rise,
                    "train_fell_since": train_fell}
        if rise > max_eval_rise and train_fell:
            findings.append(f"overfitting: eval loss turned at step {turn_step} ({best:.4g}) and ended "
                            f"{rise:+.0%} above it at step {end_step} ({end:.4g}) while train loss fell "
                            f"{train_then[-1]:.4g} -> {train[-1][1]:.4g}")
            details["turned_at_step"] = turn_step
    if evals and train:
        gap = evals[-1][1] - train[-1][1]
        details["gap"] = gap
        if gap > max_gap:
            findings.append(f"final eval loss {evals[-1][1]:.4g} is {gap:.3g} nats/token above the train loss "
                            f"{train[-1][1]:.4g} (max_gap {max_gap:g})")
    if min_loss_drop is not None:
        finding = _loss_drop(train, evals, min_loss_drop, min_points, details)
        if finding:
            findings.append(finding)
        elif "loss_drop" not in details and train:
            notes.append(f"{_points(len(train), 'train-loss')}: too few to tell whether it learned")
    lrs = [e["learning_rate"] for e in log if _finite(e.get("learning_rate"))]
    details["lr_points"] = len(lrs)
    if peak_lr and len(lrs) >= max(2, min_points):
        details["lr_max"] = max(lrs)
        if all(b > a for a, b in itertools.pairwise(lrs)) and lrs[-1] < 0.99 * peak_lr:
            findings.append(f"the learning rate never left warmup: it rose at every one of {len(lrs)} logged "
                            f"steps to {lrs[-1]:.3g}, short of its peak {peak_lr:g}")
            details["lr_never_left_warmup"] = True
    elif peak_lr and lrs:
        notes.append(f"{_points(len(lrs), 'learning-rate')}: too few to tell the schedule")
    return not findings, findings, details


def _points(n: int, what: str) -> str:
    return f"{n} logged {what} point{'s' if n != 1 else ''}"


def _loss_drop(train: Sequence[tuple[int, float]], evals: Sequence[tuple[int, float]], min_drop: float,
               min_points: int, details: dict[str, Any]) -> str | None:
    """How far the loss fell, as a fraction of where it started; a finding when by less than
    `min_drop`. Measured on the held-out rows when they were evaluated before training (step 0)
    and after: the same rows, so no batch noise. Else on the train loss, from its first logged
    point to the mean of its last LOSS_END_POINTS (one batch against a few: on the demo, a run at
    lr 1e-7 "falls" 31% this way by batch noise alone). A loss that starts at 0 cannot fall."""
    before = [loss for s, loss in evals if s == 0]
    after = [(s, loss) for s, loss in evals if s > 0]
    if before and after:
        source, start, (last, end) = "held-out", before[0], after[-1]
        how = "before training vs the last evaluation"
    elif len(train) >= max(2, min_points):
        k = min(LOSS_END_POINTS, len(train) - 1)  # the end never includes the start
        source, start, last, end = "train", train[0][1], train[-1][0], sum(loss for _, loss in train[-k:]) / k
        how = f"the end is the mean of the last {k} logged"
    else:
        return None
    drop = (start - end) / start if start > 0 else 0.0
    details |= {"loss_source": source, "loss_start": start, "loss_end": end, "loss_drop": drop}
    if start <= 0 or drop >= min_drop:
        return None
    what = ("the loss rose: diverging (learning rate too high?)" if drop < 0 else
            "the adapter learned little (learning rate too low, or too few steps?)")
    return (f"{source} loss {start:.3g} -> {end:.3g} over {last} steps ({-drop:+.0%}; {how}): {what}; "
            f"min_loss_drop {min_drop:.0%}")


def health_summary(details: Mapping[str, Any]) -> str:
    """One line on a healthy run: how far train loss fell, where eval loss ended against its
    minimum, the gap, and what too few points could not tell."""
    parts = []
    if "loss_drop" in details:
        parts.append(f"{details['loss_source']} loss {details['loss_start']:.3g} -> {details['loss_end']:.3g} "
                     f"({-details['loss_drop']:+.0%})")
    if "eval_min" in details:
        parts.append(f"eval loss {details['eval_final']:.4g} at the end, minimum {details['eval_min']:.4g} "
                     f"at step {details['eval_min_step']} ({details['eval_rise']:+.1%})")
    elif details.get("eval_points") == 1:
        parts.append("one eval point: whether eval loss turned cannot be told (set eval_steps below max_steps)")
    else:
        parts.append("no eval loss logged (eval_fraction 0?): overfitting cannot be told")
    if "gap" in details:
        parts.append(f"eval - train loss {details['gap']:+.3g}")
    return "; ".join(parts + list(details.get("notes") or ()))


# ------------------------------------------------------------------------ prompt lengths

SHIFT_QUANTILES = ("p10", "p50", "p90")  # the effect size: how far the body and both tails moved


@dataclass(frozen=True)
class LengthMatch:
    """Training vs eval prompt lengths (tokens): the two-sample Kolmogorov-Smirnov test (is there a
    difference?), the relative shift of the quantiles (how large is it?) and the quantiles side by
    side."""

    n_train: int
    n_eval: int
    distance: float  # KS D: the largest gap between the two empirical CDFs
    p_value: float
    shift: float  # max over SHIFT_QUANTILES of max(a, b) / min(a, b) - 1: 0.25 is one side 25% longer
    shift_at: str  # the quantile where it is largest
    train_quantiles: dict[str, float]
    eval_quantiles: dict[str, float]
    significant: bool
    passed: bool


def quantiles(values: Sequence[int]) -> dict[str, float]:
    x = np.asarray(values, dtype=float)
    return {**{f"p{round(q * 100)}": float(np.quantile(x, q)) for q in QUANTILES}, "max": float(x.max())}


def relative_shift(a: Mapping[str, float], b: Mapping[str, float]) -> tuple[float, str]:
    """(largest max/min - 1 over SHIFT_QUANTILES, where): symmetric, so 60 vs 400 tokens and 400
    vs 60 both read 5.67 (567%)."""
    def ratio(x: float, y: float) -> float:
        lo, hi = min(x, y), max(x, y)
        return hi / lo - 1 if lo > 0 else (math.inf if hi > 0 else 0.0)

    return max(((ratio(a[q], b[q]), q) for q in SHIFT_QUANTILES), key=lambda rq: rq[0])


def length_match(train: Sequence[int], evaluated: Sequence[int], *, alpha: float, max_distance: float,
                 max_shift: float | None) -> LengthMatch:
    """Fails when the KS test rejects "same distribution" at `alpha` (a difference exists), the
    quantiles moved by more than `max_shift` (it is large: narrow distributions 58 vs 55 tokens
    differ significantly, and trivially; None: not required, the test alone decides), and the KS
    distance exceeds `max_distance` (0: any)."""
    d, p = ks_two_sample(train, evaluated)
    tq, eq = quantiles(train), quantiles(evaluated)
    shift, at = relative_shift(tq, eq)
    significant = p < alpha
    large = max_shift is None or shift > max_shift
    return LengthMatch(n_train=len(train), n_eval=len(evaluated), distance=d, p_value=p, shift=shift, shift_at=at,
                       train_quantiles=tq, eval_quantiles=eq, significant=significant,
                       passed=not (significant and large and d > max_distance))

"""The quiet ways a fine-tune fails that the guides write about, as pure functions of recorded data:
runaway generation (outputs cut at max_new_tokens where the base stopped), an unhealthy training
run (eval loss turned up while train loss fell, NaN losses, a learning rate still warming up), and
training prompts whose lengths do not resemble the eval's. `evalkit.checks` feeds them a run's
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

from evalkit.stats import ks_two_sample, paired_compare

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


def training_health(log: Sequence[Mapping[str, Any]], *, peak_lr: float | None, max_eval_rise: float,
                    max_gap: float) -> tuple[bool, list[str], dict[str, Any]]:
    """(passed, findings, details) from a trainer's per-step log (`step`, `loss`, `eval_loss`,
    `learning_rate`). Fails on a NaN/inf loss, on eval loss ending more than `max_eval_rise` (a
    fraction) above its minimum while train loss fell since (overfitting: the step it turned is
    named), on a final eval loss more than `max_gap` nats above the train loss, and on a learning
    rate that rose at every logged step without reaching its peak (warmup never ended)."""
    findings: list[str] = []
    details: dict[str, Any] = {"max_eval_rise": max_eval_rise, "max_gap": max_gap}
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
    lrs = [e["learning_rate"] for e in log if _finite(e.get("learning_rate"))]
    if peak_lr and len(lrs) >= 2:
        details["lr_max"] = max(lrs)
        if all(b > a for a, b in itertools.pairwise(lrs)) and lrs[-1] < 0.99 * peak_lr:
            findings.append(f"the learning rate never left warmup: it rose at every logged step to "
                            f"{lrs[-1]:.3g}, short of its peak {peak_lr:g}")
            details["lr_never_left_warmup"] = True
    return not findings, findings, details


def health_summary(details: Mapping[str, Any]) -> str:
    """One line on a healthy run: where eval loss ended against its minimum, and the gap."""
    parts = []
    if "eval_min" in details:
        parts.append(f"eval loss {details['eval_final']:.4g} at the end, minimum {details['eval_min']:.4g} "
                     f"at step {details['eval_min_step']} ({details['eval_rise']:+.1%})")
    elif details.get("eval_points") == 1:
        parts.append("one eval point: whether eval loss turned cannot be told (set eval_steps below max_steps)")
    else:
        parts.append("no eval loss logged (eval_fraction 0?): overfitting cannot be told")
    if "gap" in details:
        parts.append(f"eval - train loss {details['gap']:+.3g}")
    return "; ".join(parts)


# ------------------------------------------------------------------------ prompt lengths

@dataclass(frozen=True)
class LengthMatch:
    """Training vs eval prompt lengths (tokens): the two-sample Kolmogorov-Smirnov test and the
    quantiles side by side."""

    n_train: int
    n_eval: int
    distance: float  # KS D: the largest gap between the two empirical CDFs
    p_value: float
    train_quantiles: dict[str, float]
    eval_quantiles: dict[str, float]
    passed: bool


def quantiles(values: Sequence[int]) -> dict[str, float]:
    x = np.asarray(values, dtype=float)
    return {**{f"p{round(q * 100)}": float(np.quantile(x, q)) for q in QUANTILES}, "max": float(x.max())}


def length_match(train: Sequence[int], evaluated: Sequence[int], *, alpha: float, max_distance: float) -> LengthMatch:
    """Fails when the KS test rejects "same distribution" at `alpha` and the distance exceeds
    `max_distance` (with huge samples a trivial difference is significant: the distance says how
    large it is)."""
    d, p = ks_two_sample(train, evaluated)
    return LengthMatch(n_train=len(train), n_eval=len(evaluated), distance=d, p_value=p,
                       train_quantiles=quantiles(train), eval_quantiles=quantiles(evaluated),
                       passed=not (p < alpha and d > max_distance))

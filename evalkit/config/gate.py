"""Gates: a threshold on a task's metric (absolute, against another variant, or on the share of invalid
scores), or a named check with its options and their defaults."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, PrivateAttr, model_validator

from evalkit.config.located import Located
from evalkit.shape import invalid

# defaults of the check options (evalkit/checks/ reads them through the gate)
STOPS_MAX_INCREASE = 10.0
HEALTH_MAX_EVAL_RISE = 0.05
HEALTH_MAX_GAP = 1.0
HEALTH_MIN_LOSS_DROP = 0.1  # bench/bench_checks.py: the demo adapters' held-out loss falls 59-85%, at lr 1e-7 0%
LENGTH_MAX_SHIFT = 0.25  # the demo's prompts: same distribution 1%, a few tokens longer 7%, padded 205%
CHECK_OPTIONS = {"max_abs_logit_diff": ("merge_equivalence",), "max_abs_logprob_diff": ("backend_parity",),
                 "min_top1_agreement": ("merge_equivalence", "backend_parity"),
                 "max_increase": ("stops_generating",), "max_eval_rise": ("training_health",),
                 "max_gap": ("training_health",), "min_loss_drop": ("training_health",),
                 "max_distance": ("length_match",), "max_shift": ("length_match",)}


class Gate(Located):
    """`metric: task.metric` with min/max, max_drop vs a reference, or max_invalid; or a named `check`."""

    metric: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_.-]+$")
    check: Literal["merge_equivalence", "adapter_active", "no_leakage", "backend_parity", "stops_generating",
                   "training_health", "length_match"] | None = None
    variant: str | None = Field(None, description="the variant gated (default: every non-base variant)")
    min: float | None = None
    max: float | None = None
    max_drop: float | None = Field(None, ge=0, description="in points: percentage points for proportions")
    max_invalid: float | None = Field(None, ge=0, le=1, description="largest share of cases with an invalid score")
    vs: str | None = Field(None, description="the variant a max_drop gate compares with (default: the reference)")
    confidence: float | None = Field(
        None, gt=0.5, lt=1, description="one-sided level of the bound the gate tests (min: lower bound, "
                                        "max/max_drop/max_invalid: upper bound); none: point estimates")
    max_abs_logit_diff: float | None = Field(None, ge=0)
    max_abs_logprob_diff: float | None = Field(None, ge=0, description="backend_parity: served vs in process")
    min_top1_agreement: float | None = Field(None, ge=0, le=1)
    max_increase: float | None = Field(
        None, ge=0, le=100, description="stops_generating: largest rise, in points, of the share of outputs cut "
                                        f"at max_new_tokens over the base's (default {STOPS_MAX_INCREASE:g})")
    max_eval_rise: float | None = Field(
        None, ge=0, description="training_health: largest rise of the final eval loss over its minimum, as a "
                                f"fraction of it (default {HEALTH_MAX_EVAL_RISE:g})")
    max_gap: float | None = Field(None, ge=0, description="training_health: largest final eval loss minus train "
                                                          f"loss, nats per token (default {HEALTH_MAX_GAP:g})")
    min_loss_drop: float | None = Field(
        None, ge=0, le=1, description="training_health: least fall of the loss as a fraction of where it started: "
                                "the held-out loss before training vs the last evaluation, else the first logged "
                                "train loss vs the mean of the last three (default "
                                f"{HEALTH_MIN_LOSS_DROP:g}: a run that fell less learned little; 0: fails only when "
                                "it rose)")
    max_distance: float | None = Field(
        None, ge=0, le=1, description="length_match: a significant difference fails only when the "
                                      "Kolmogorov-Smirnov distance also exceeds this (default 0: any)")
    max_shift: float | None = Field(
        None, ge=0, description="length_match: a significant difference fails only when the length quantiles "
                                "(p10, p50, p90) also moved by more than this fraction, the larger side over the "
                                f"smaller (default {LENGTH_MAX_SHIFT:g}: one side 25% longer)")
    name: str | None = Field(None, description="the gate's id in reports, JUnit and pytest")

    _id: str | None = PrivateAttr(None)  # the label made unique within the suite (`#2`)
    _implicit: bool = PrivateAttr(False)  # on by default, not written: it gates only what its check could check

    @classmethod
    def implicit(cls, check: str) -> Gate:
        gate = cls.model_validate({"check": check})
        gate._implicit = True
        return gate

    @property
    def is_implicit(self) -> bool:
        return self._implicit

    @model_validator(mode="after")
    def _one_test(self) -> Gate:
        thresholds = [k for k in ("min", "max", "max_drop", "max_invalid") if getattr(self, k) is not None]
        if (self.metric is None) == (self.check is None) or (self.metric and not thresholds):
            raise invalid("a gate needs `metric:` with `min:`, `max:`, `max_drop:` or `max_invalid:`, or a `check:`")
        for key, checks in CHECK_OPTIONS.items():
            if getattr(self, key) is not None and self.check not in checks:
                raise invalid(f"`{key}` is an option of check {' / '.join(checks)}", at=(key,))
        alone = [k for k in ("max_drop", "max_invalid") if k in thresholds]
        if alone and len(thresholds) > 1:
            raise invalid(f"`{alone[0]}` is a gate of its own: give it without other thresholds", at=(alone[0],))
        return self

    @property
    def label(self) -> str:
        # a relative gate on a metric is another test than an absolute one: keep their ids apart
        if self.name or self.check:
            return str(self.name or self.check)
        return (f"{self.metric}-vs-{self.vs}" if self.max_drop is not None else
                f"{self.metric}-invalid" if self.max_invalid is not None else str(self.metric))

    @property
    def id(self) -> str:
        return self._id or self.label

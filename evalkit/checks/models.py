"""Is each model what it claims to be: an adapter that changes nothing (`adapter_active`), and a
server that serves another model than the in-process reference (`backend_parity`)."""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from evalkit.backends.base import PROBES, InProcess, InProcessBackend, Prompt, PromptScores, Served, token_ids
from evalkit.cache import Deliver, adapter_active_key, cached
from evalkit.checks.common import Log, logit_diff, logprob_diff, probe_prompts, tolerance
from evalkit.record.types import CheckRecord

if TYPE_CHECKING:
    from torch import Tensor

    from evalkit.context import RunContext, RunVariant

# fp32 noise between two code paths on the same weights is ~1e-5; a live adapter moves logits far more
ACTIVE_TOLERANCE = 1e-4
# a server against the in-process fp32 reference: ~1e-5 in fp32, up to a few 1e-2 in bf16 on a GPU
PARITY_TOLERANCE = 0.05
PARITY_MIN_TOP1 = 0.95


@dataclass
class _Baselines:
    """What adapter_active compares adapters with, each computed once: the probe prompts, the
    adapters-off logits per in-process model, the parent's prompt logprobs per served base."""

    texts: list[str]
    prompts: list[list[int]]
    logits: dict[int, list[Tensor]] = field(default_factory=dict)
    logprobs: dict[tuple[int, str], list[PromptScores]] = field(default_factory=dict)


def adapter_active(ctx: RunContext, log: Log) -> list[CheckRecord]:
    """Every adapter variant must move the model beyond numerical noise; otherwise it is inert (zero
    B matrices, wrong target modules, a loader that dropped it) and scoring it is a lie. In process,
    the logits with and without the adapter are compared, and an inert adapter stops the run (the
    files are broken). On a server, the served adapter's prompt logprobs are compared with those of
    the model it is served on (its `parent`), and an inert one fails the check (the deployment is
    broken). A passed check is cached under the variant's fingerprint: a rerun computes nothing."""
    texts = probe_prompts(ctx, limit=2)
    baselines = _Baselines(texts, token_ids(ctx.tokenizer, texts))
    return [r for lv in ctx.variants if (r := _adapter_active(ctx, lv, baselines, log)) is not None]


def _adapter_active(ctx: RunContext, lv: RunVariant, baselines: _Baselines, log: Log) -> CheckRecord | None:
    """One variant's record; None for a variant with no adapter to check (a base)."""
    backend = lv.backend
    measure: Callable[[], tuple[float, float]]
    if isinstance(backend, InProcess) and lv.info is not None:
        metric, what, where = "max_abs_logit_diff", "max |logit diff| vs base", f"({lv.info.path})"
        measure = functools.partial(_logit_shift, backend, lv.name, baselines)
    elif isinstance(backend, Served) and (parent := backend.parent(lv.name)) is not None:
        metric, what = "max_abs_logprob_diff", "max |logprob diff| vs the served base"
        where = f"served as '{backend.served[lv.name]}' on '{parent}'"
        measure = functools.partial(_logprob_shift, backend, lv.name, parent, baselines)
    else:
        return None

    def compute(_todo: list[int], deliver: Deliver[dict[str, float]]) -> None:
        max_abs, agree = measure()
        deliver({0: {metric: max_abs, "top1_agreement": agree}})

    # an inert adapter is not cached: a rerun checks it again
    [(found, _)] = cached(ctx.cache, [adapter_active_key(lv.fingerprint, baselines.texts, ACTIVE_TOLERANCE)],
                          compute, count=False, keep=lambda f: f[metric] > ACTIVE_TOLERANCE)
    if found[metric] <= ACTIVE_TOLERANCE:
        msg = (f"adapter of variant '{lv.name}' {where} changes nothing: {what} {found[metric]:.2e} <= "
               f"{ACTIVE_TOLERANCE:g} on {len(baselines.prompts)} probe prompts")
        if isinstance(backend, InProcess):
            raise ctx.suite.error(ctx.suite.variant_path(lv.name),
                                  msg + " (zero B matrices, wrong target_modules, or weights that did not load?)")
        log(f"FAIL: adapter_active: {msg} (the server serves an inert adapter)")
        return CheckRecord(name="adapter_active", variant=lv.name, passed=False, message=msg, details=found)
    return CheckRecord(name="adapter_active", variant=lv.name, passed=True,
                       message=f"{what} {found[metric]:.3g}, top-1 agreement {found['top1_agreement']:.1%}",
                       details=found)


def _logit_shift(backend: InProcess, variant: str, baselines: _Baselines) -> tuple[float, float]:
    """An in-process adapter against the weights it sits on (adapters off), shared by the variants on them."""
    ref = backend.reference_of(variant)
    if ref not in baselines.logits:
        baselines.logits[ref] = backend.logits(variant, baselines.prompts, adapters_off=True)
    return logit_diff(backend.logits(variant, baselines.prompts), baselines.logits[ref])


def _logprob_shift(backend: Served, variant: str, parent: str, baselines: _Baselines) -> tuple[float, float]:
    """A served adapter against the model it is served on, shared by the adapters served on it."""
    key = id(backend), parent
    if key not in baselines.logprobs:
        baselines.logprobs[key] = backend.prompt_logprobs(parent, baselines.prompts)
    return logprob_diff(backend.prompt_logprobs(backend.served[variant], baselines.prompts), baselines.logprobs[key])


def backend_parity(ctx: RunContext, log: Log) -> list[CheckRecord]:
    """Each variant a server serves, against the same variant in process (`hf`, the reference) on
    the probe prompts and the first task cases: the prompt tokens' logprobs and the top-1 token at
    every position, and the greedy continuations of the probes. It fails, with numbers, when the
    server serves the adapter inert, serves another adapter or model, or drifts beyond tolerance.
    It runs when a gate asks for it: the reference loads the model in process."""
    if not any(g.check == "backend_parity" for g in ctx.suite.gates):
        return []
    texts = probe_prompts(ctx, limit=2)
    prompts = token_ids(ctx.tokenizer, texts)
    records = []
    for lv in ctx.variants:
        if ctx.suite.backend_of(lv.variant).kind == "hf":
            continue
        backend = lv.backend
        if isinstance(backend, InProcess):
            records.append(CheckRecord(name="backend_parity", variant=lv.name, passed=True,
                                       message="runs in process (fallback: hf): it is the reference"))
            continue
        assert isinstance(backend, Served)  # a variant off `hf` runs in process (fallback) or on a server
        tol = tolerance(ctx, "backend_parity", lv.name, "max_abs_logprob_diff", PARITY_TOLERANCE)
        min_agree = tolerance(ctx, "backend_parity", lv.name, "min_top1_agreement", PARITY_MIN_TOP1)
        served = backend.served[lv.name]
        reference, name = ctx.reference(lv)
        max_abs, agree = logprob_diff(backend.prompt_logprobs(served, prompts), reference.prompt_logprobs(name, prompts))
        greedy = _greedy_agreement(ctx, lv.name, backend, reference, name)
        passed = max_abs <= tol and agree >= min_agree
        msg = (f"served '{served}' vs in process: max |logprob diff| {max_abs:.3g} "
               f"({'<=' if max_abs <= tol else '>'} {tol:g}), top-1 agreement {agree:.1%} "
               f"({'>=' if agree >= min_agree else '<'} {min_agree:.0%}) over {len(prompts)} prompts; "
               f"greedy continuations {greedy[0]}/{greedy[1]} identical")
        if not passed:
            msg += "; " + _parity_diagnosis(lv, backend, prompts)
        log(("" if passed else "FAIL: ") + f"backend_parity [{lv.name}]: {msg}")
        records.append(CheckRecord(name="backend_parity", variant=lv.name, passed=passed, message=msg, details={
            "served_name": served, "max_abs_logprob_diff": max_abs, "top1_agreement": agree, "tolerance": tol,
            "min_top1_agreement": min_agree, "greedy_identical": greedy[0], "greedy_compared": greedy[1],
            "n_prompts": len(prompts)}))
    return records


def _greedy_agreement(ctx: RunContext, variant: str, backend: Served, reference: InProcessBackend,
                      name: str) -> tuple[int, int]:
    """How many of the probes' greedy continuations (as the identity probe got them) the in-process
    reference continues identically."""
    from evalkit.backends.remote import PROBE_TOKENS
    from evalkit.config.generation import GenerationConfig

    served = backend.probe_texts(variant)
    local: dict[int, str] = {}
    prompts = [Prompt(t, tuple(ids)) for t, ids in zip(PROBES, token_ids(ctx.tokenizer, list(PROBES)))]
    reference.generate([(name, i) for i in range(len(prompts))], prompts,
                       GenerationConfig(max_new_tokens=PROBE_TOKENS, batch_size=1),
                       lambda rows: local.update({i: o.text for _, i, o in rows}))
    return sum(served[i] == local[i] for i in range(len(prompts))), len(prompts)


def _parity_diagnosis(lv: RunVariant, backend: Served, prompts: list[list[int]]) -> str:
    """What the served model looks like when it is not the reference: inert (its parent's answers),
    or something else."""
    parent = backend.parent(lv.name)
    if lv.info is not None and parent is not None:
        to_parent, _ = logprob_diff(backend.prompt_logprobs(backend.served[lv.name], prompts),
                                    backend.prompt_logprobs(parent, prompts))
        if to_parent <= ACTIVE_TOLERANCE:
            return (f"the served adapter is inert: it answers as its base '{parent}' "
                    f"(max |logprob diff| {to_parent:.2e})")
    return "the server serves another adapter or model under this name, or computes it differently"

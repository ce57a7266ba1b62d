"""What a task kind runs against: the suite's variants, each with its backend, and the cache.

Task kinds receive a RunContext and never touch a model: prompts are rendered here (one
tokenizer, one chat template for every backend), cached outputs are reused, and only misses go
to a variant's backend.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from evalkit.backends.base import Backend, InProcessBackend, Job, Prompt, TokenPair, encode, render_prompt
from evalkit.cache import Cache, Deliver, cached, generation_key, loglikelihood_key
from evalkit.config.generation import GenerationConfig
from evalkit.config.suite import Suite
from evalkit.config.variant import Variant
from evalkit.formatting import listed
from evalkit.models.adapters import AdapterInfo
from evalkit.models.base import ResolvedBase
from evalkit.types import Case, Output, stable_hash, template_hash


@dataclass
class RunVariant:
    """A variant of the run: what it is, its content address, and the backend that serves it."""

    variant: Variant
    info: AdapterInfo | None
    fingerprint: str  # content address of "this model, as evaluated" (base, adapter, quantize, merge, template)
    backend: Backend = field(repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.variant.name


def variant_fingerprint(base: ResolvedBase, variant: Variant, info: AdapterInfo | None, template_hash: str) -> str:
    # merge_into matters only for merged variants: a 4-bit merge is another model than a full one
    return stable_hash({"base": base.sha256, "adapter": info.sha256 if info else None,
                        "quantize": variant.quantize, "merge": variant.merge,
                        "merge_into": variant.merge_target, "chat_template": template_hash})


def served_fingerprint(base: ResolvedBase, served: dict[str, Any], template_hash: str) -> str:
    """A server's variant: what it says it serves (its model entry and probe answers, not its URL),
    with the tokenizer and template evalkit renders its prompts with."""
    return stable_hash({"base": base.sha256, "served": served, "chat_template": template_hash})


@dataclass(kw_only=True)
class Requests:
    """The one way results reach a task: the cache first, the variant's backend for the rest, each
    finished result cached at once (an interrupted run resumes where it stopped)."""

    cache: Cache
    log: Callable[[str], None] = print
    progress: bool = True
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-variant cost counters

    def count(self, name: str, **add: float) -> None:
        bucket = self.stats.setdefault(name, {})
        for k, v in add.items():
            bucket[k] = bucket.get(k, 0.0) + v

    def generate_prompts(self, lvs: Sequence[RunVariant], prompts: Sequence[Prompt], gen: GenerationConfig, *,
                         desc: str = "") -> dict[str, list[tuple[Output, bool]]]:
        """Outputs of several variants for every prompt: (output, was_cached) pairs by variant name.
        Cached outputs are reused and only misses go to the variants' backends; each finished output
        is cached at once, so an interrupted run resumes where it stopped."""
        n = len(prompts)
        keys = [generation_key(lv.fingerprint, gen.key(), p.text) for lv in lvs for p in prompts]  # variant-major
        position = {lv.name: k * n for k, lv in enumerate(lvs)}

        def compute(todo: list[int], deliver: Deliver[Output]) -> None:
            backends = {id(lv.backend): lv.backend for lv in lvs}
            jobs: dict[int, list[Job]] = {bid: [] for bid in backends}  # backend -> (variant, prompt index) to generate
            for j in todo:
                lv = lvs[j // n]
                jobs[id(lv.backend)].append((lv.name, j % n))
            for bid, work in jobs.items():
                if not work:
                    continue
                label = listed(list(dict.fromkeys(name for name, _ in work)), limit=3).replace(", ", ",")
                bar = progress_bar(len(work), f"{desc or 'generate'} [{label}]", self.progress, self.log)

                def on_done(rows: list[tuple[str, int, Output]], bar: Progress = bar) -> None:
                    deliver({position[name] + i: o for name, i, o in rows})
                    for name, _, o in rows:
                        self.count(name, cases=1, output_tokens=o.n_output_tokens, seconds=o.latency_s)
                    bar.update(len(rows))

                backends[bid].generate(work, prompts, gen, on_done)
                bar.close()

        found = cached(self.cache, keys, compute, decode=lambda f: Output(**f), encode=lambda o: o.__dict__)
        return {lv.name: found[position[lv.name]:position[lv.name] + n] for lv in lvs}

    def loglikelihood(self, lv: RunVariant, requests: Sequence[TokenPair], *, batch_size: int = 8,
                      desc: str = "") -> list[tuple[tuple[float, bool], bool]]:
        """(loglikelihood of the continuation, is it the greedy one) per (context ids, continuation
        ids) request, with whether it came from the cache. Misses go to the variant's backend and
        are cached as each batch finishes."""
        keys = [loglikelihood_key(lv.fingerprint, c, x) for c, x in requests]

        def compute(todo: list[int], deliver: Deliver[tuple[float, bool]]) -> None:
            bar = progress_bar(len(todo), f"{desc or 'loglikelihood'} [{lv.name}]", self.progress, self.log,
                               unit="request", closing=False)  # the task says when it is done
            t0 = time.perf_counter()

            def scored(indices: list[int], scores: list[tuple[float, bool]]) -> None:
                nonlocal t0
                deliver({todo[i]: s for i, s in zip(indices, scores)})
                now = time.perf_counter()
                self.count(lv.name, seconds=now - t0)
                t0 = now
                bar.update(len(indices))

            lv.backend.loglikelihood(lv.name, [requests[i] for i in todo], scored, batch_size=batch_size)
            bar.close()

        return cached(self.cache, keys, compute, decode=lambda f: (float(f[0]), bool(f[1])),
                      encode=lambda s: [s[0], s[1]])


@dataclass(kw_only=True)
class RunContext(Requests):
    """The run's suite, base and variants, for task kinds and checks."""

    suite: Suite
    base: ResolvedBase
    tokenizer: Any
    variants: list[RunVariant]
    hf: InProcessBackend | None = None  # the in-process backend: every in-process variant's, and the parity reference

    @property
    def backends(self) -> list[Backend]:
        return list({id(lv.backend): lv.backend for lv in self.variants}.values())

    @property
    def device(self) -> str:
        """Where the in-process models run; "none" when none was loaded."""
        return self.hf.device() if self.hf is not None else "none"

    def variant(self, name: str) -> RunVariant:
        return next(v for v in self.variants if v.name == name)

    def render(self, case: Case) -> Prompt:
        return encode(self.tokenizer, render_prompt(self.tokenizer, case))

    def attach_twin(self, lv: RunVariant) -> RunVariant:
        """The unmerged twin of a merged variant (not scored), on the in-process backend."""
        assert self.hf is not None and lv.info is not None
        twin = self.hf.add_twin(lv.name)
        return RunVariant(twin, lv.info, variant_fingerprint(self.base, twin, lv.info, template_hash(self.tokenizer)),
                          self.hf)

    def counters(self, lv: RunVariant) -> dict[str, Any]:
        """A variant's cost counters: the run's (cases, tokens, seconds) and its backend's (memory)."""
        return {**self.stats.get(lv.name, {}), **lv.backend.stats.get(lv.name, {})}

    def reference(self, lv: RunVariant) -> tuple[InProcessBackend, str]:
        """The variant as the in-process reference runs it (for the parity checks): that backend, and
        the name it is declared under there (its own, loaded with the rest)."""
        assert self.hf is not None  # the runner always gives one
        if lv.name not in self.hf.slots:
            self.hf.add(lv.variant, lv.info)
        return self.hf, lv.name

    def generate(self, lv: RunVariant, cases: Sequence[Case], gen: GenerationConfig, *,
                 desc: str = "") -> list[tuple[Output, bool]]:
        """Outputs of one variant for every case: (output, was_cached) pairs."""
        return self.generate_many([lv], cases, gen, desc=desc)[lv.name]

    def generate_many(self, lvs: Sequence[RunVariant], cases: Sequence[Case], gen: GenerationConfig, *,
                      desc: str = "") -> dict[str, list[tuple[Output, bool]]]:
        """Outputs of several variants for every case, by variant name (cases rendered with the chat
        template)."""
        return self.generate_prompts(lvs, [self.render(c) for c in cases], gen, desc=desc)


class Progress(Protocol):
    def update(self, n: int = 1) -> None: ...

    def close(self) -> None: ...


def progress_bar(total: int, desc: str, bars: bool, log: Callable[[str], Any] | None = None, unit: str = "case",
                 closing: bool = True) -> Progress:
    """A progress bar on a terminal; elsewhere (CI logs) a line now and then, and one at the end
    unless `closing` is off."""
    if bars or log is None:
        from tqdm.auto import tqdm

        bar: Progress = tqdm(total=total, desc=desc, unit=unit, disable=not bars, leave=False)
        return bar
    return _ProgressLines(total, desc, log, unit, closing)


class _ProgressLines:
    EVERY_S = 20.0

    def __init__(self, total: int, desc: str, log: Callable[[str], Any], unit: str = "case", closing: bool = True) -> None:
        self.total, self.desc, self.log, self.n, self.unit, self.closing = total, desc, log, 0, unit, closing
        self.start = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.EVERY_S and self.n < self.total:
            self.last = now
            self.log(f"{self.desc}: {self.n}/{self.total} {self.unit}s ({now - self.start:.0f} s)")

    def close(self) -> None:
        if self.total and self.closing:
            self.log(f"{self.desc}: {self.n}/{self.total} {self.unit}s in {time.perf_counter() - self.start:.1f} s")

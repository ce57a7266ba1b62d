"""The loaded side of a run: one base instance, adapters attached by name, cached generation.

Task kinds receive a RunContext and never load models themselves, so the base is loaded once
per run whatever the number of variants and tasks.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from evalkit.backends.hf import generate, render_prompt
from evalkit.cache import Cache, generation_key
from evalkit.config.suite import GenerationConfig, Suite, Variant
from evalkit.memory import PeakMemory
from evalkit.models.adapters import AdapterInfo
from evalkit.models.base import ResolvedBase
from evalkit.types import Case, Output, stable_hash, template_hash


@dataclass
class LoadedVariant:
    variant: Variant
    _model: Any  # the module this variant runs on (shared PeftModel for plain adapters); see `model`
    adapter_name: str | None  # active peft adapter on `model`; None runs with adapters disabled
    info: AdapterInfo | None
    fingerprint: str  # content address of "this model, as evaluated" (base, adapter, quantize, merge, template)
    load: Callable[[], None] | None = field(default=None, repr=False, compare=False)  # binds `model` when called

    @property
    def name(self) -> str:
        return self.variant.name

    @property
    def model(self) -> Any:
        """The model, loaded on first use: a run whose every result is cached never loads one."""
        if self._model is None and self.load is not None:
            self.load()
        return self._model

    @model.setter
    def model(self, model: Any) -> None:
        self._model = model

    @contextlib.contextmanager
    def active(self) -> Iterator[Any]:
        """Yield `model` with this variant's adapter active (or every adapter disabled, for base)."""
        peft = hasattr(self.model, "peft_config")
        if not peft:
            yield self.model
        elif self.adapter_name is None:
            with self.model.disable_adapter():
                yield self.model
        else:
            self.model.set_adapter(self.adapter_name)
            yield self.model


def variant_fingerprint(base: ResolvedBase, variant: Variant, info: AdapterInfo | None, template_hash: str) -> str:
    # merge_into matters only for merged variants: a 4-bit merge is another model than a full one
    return stable_hash({"base": base.sha256, "adapter": info.sha256 if info else None,
                        "quantize": variant.quantize, "merge": variant.merge,
                        "merge_into": variant.merge_target, "chat_template": template_hash})


def _mixable(lv: LoadedVariant) -> bool:
    """peft mixes adapters row by row (`adapter_names`) only for plain LoRA on a peft model. DoRA
    refuses with a ValueError and leaves its hooks behind, so every later generate() fails too;
    merged copies have no adapter to pick."""
    if not hasattr(lv.model, "peft_config"):
        return False
    return lv.info is None or (lv.info.config.get("peft_type", "LORA") == "LORA" and not lv.info.is_dora)


def plan_runs(group: list[LoadedVariant], missing: dict[str, list[int]],
              batch_size: int) -> list[list[tuple[LoadedVariant, int]]]:
    """(variant, case index) runs for one mix group. Each variant's full batches run on their own:
    a mixed forward gathers and scatters rows per adapter in every LoRA layer, measured 30-60%
    slower on CPU than one adapter per batch. Only the partial batches left over are pooled into
    mixed batches (case-major, so the rows of one prompt sit side by side): that saves forwards,
    and with many adapters and few cases it is most of the work."""
    runs, rest = [], []
    for lv in group:
        idx = missing[lv.name]
        cut = len(idx) - len(idx) % batch_size if len(group) > 1 else len(idx)
        runs += [[(lv, i) for i in idx[:cut]]] if cut else []
        rest += [(lv, i) for i in idx[cut:]]
    return runs + ([sorted(rest, key=lambda job: job[1])] if rest else [])


def mix_groups(lvs: Sequence[LoadedVariant]) -> list[list[LoadedVariant]]:
    """Variants that can share generation batches: mixable ones on the same model instance; every
    other variant is a group of its own (it runs with set_adapter / disable_adapter)."""
    groups: dict[int, list[LoadedVariant]] = {}
    for lv in lvs:
        groups.setdefault(id(lv.model) if _mixable(lv) else id(lv), []).append(lv)
    return list(groups.values())


@dataclass
class RunContext:
    suite: Suite
    base: ResolvedBase
    tokenizer: Any
    variants: list[LoadedVariant]
    cache: Cache
    log: Callable[[str], None] = print
    progress: bool = True
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-variant cost counters
    models: dict[str, Any] = field(default_factory=dict)  # "full" | "nf4" | "int8" -> the one instance of each
    loader: Callable[[RunContext], None] | None = None  # loads the models and binds every variant's

    def ensure_models(self) -> None:
        """Load the base and attach every adapter, once, when the first result the cache cannot
        answer needs a model (a variant's `model` calls this)."""
        if self.loader is not None:
            loader, self.loader = self.loader, None
            loader(self)

    @property
    def device(self) -> str:
        """Where the models run; "none" when the cache answered everything and none was loaded."""
        model = next(iter(self.models.values()), None)
        return str(next(model.parameters()).device) if model is not None else "none"

    def model_for(self, quantize: str | None) -> Any:
        """The shared base instance for a precision, loaded on first use (once per run)."""
        key = quantize or "full"
        if key not in self.models:
            from evalkit.models.base import load_base

            self.log(f"loading {key} base")
            self.models[key] = load_base(self.base, quantize=quantize)[0]
        return self.models[key]

    def attach(self, quantize: str | None, name: str, info: AdapterInfo) -> Any:
        from evalkit.models.adapters import attach_adapter

        self.models[quantize or "full"] = attach_adapter(self.model_for(quantize), name, info)
        return self.models[quantize or "full"]

    def attach_twin(self, lv: LoadedVariant, quantize: Literal["nf4", "int8"] | None) -> LoadedVariant:
        """An unmerged twin of a merged variant, attached to the shared base (not scored). peft
        injects the adapter into that base in place, so call it only after scoring (post-checks)."""
        name = f"{lv.name}~unmerged"
        assert lv.info is not None  # merged adapter variant
        model = self.attach(quantize, name, lv.info)
        twin = Variant(name=name, adapter=lv.variant.adapter, quantize=quantize)
        return LoadedVariant(twin, model, name, lv.info,
                             variant_fingerprint(self.base, twin, lv.info, template_hash(self.tokenizer)))

    def variant(self, name: str) -> LoadedVariant:
        return next(v for v in self.variants if v.name == name)

    def _count(self, name: str, **add: float) -> None:
        bucket = self.stats.setdefault(name, {})
        for k, v in add.items():
            bucket[k] = bucket.get(k, 0.0) + v

    def generate(self, lv: LoadedVariant, cases: Sequence[Case], gen: GenerationConfig, *,
                 desc: str = "") -> list[tuple[Output, bool]]:
        """Outputs of one variant for every case: (output, was_cached) pairs."""
        return self.generate_many([lv], cases, gen, desc=desc)[lv.name]

    def generate_many(self, lvs: Sequence[LoadedVariant], cases: Sequence[Case], gen: GenerationConfig, *,
                      desc: str = "") -> dict[str, list[tuple[Output, bool]]]:
        """Outputs of several variants for every case, by variant name. Cached outputs are reused
        and only misses generate; each finished batch is cached at once, so an interrupted run
        resumes where it stopped. Base and plain LoRA variants on one model pool their partial
        batches into mixed batches (`plan_runs`); DoRA and merged variants always run alone."""
        prompts = [render_prompt(self.tokenizer, c) for c in cases]
        keys = {lv.name: [generation_key(lv.fingerprint, gen, p) for p in prompts] for lv in lvs}
        results: dict[str, list[tuple[Output, bool] | None]] = {}
        missing: dict[str, list[int]] = {}  # variant -> case indices still to generate
        for lv in lvs:
            found = [self.cache.get(k) for k in keys[lv.name]]
            results[lv.name] = [None if f is None else (Output(**f), True) for f in found]
            missing[lv.name] = [i for i, f in enumerate(found) if f is None]
        for group in mix_groups([lv for lv in lvs if missing[lv.name]]):
            for todo in plan_runs(group, missing, gen.batch_size):
                self._generate_run(todo, prompts, keys, results, gen, desc)
        return results  # type: ignore[return-value]

    def _generate_run(self, todo: list[tuple[LoadedVariant, int]], prompts: list[str], keys: dict[str, list[str]],
                      results: dict[str, list[Any]], gen: GenerationConfig, desc: str) -> None:
        group = list({id(lv): lv for lv, _ in todo}.values())
        label = ",".join(lv.name for lv in group)
        bar = _progress(len(todo), f"{desc or 'generate'} [{label}]", self.progress, self.log)

        def on_batch(idx: list[int], outs: list[Output]) -> None:
            rows = [(todo[j][0], todo[j][1], o) for j, o in zip(idx, outs)]
            self.cache.put_many({keys[lv.name][i]: o.__dict__ for lv, i, o in rows})
            for lv, i, o in rows:
                results[lv.name][i] = (o, False)
                self._count(lv.name, cases=1, output_tokens=o.n_output_tokens, seconds=o.latency_s)
            bar.update(len(outs))

        names = None
        if len(group) > 1:  # "__base__" is peft's name for "no adapter" in a mixed batch
            names = [lv.adapter_name or "__base__" for lv, _ in todo]
        device = str(next(group[0].model.parameters()).device)
        # a mixed batch ignores the active adapter but not disable_adapter(): use the bare model
        scope = contextlib.nullcontext(group[0].model) if names else group[0].active()
        with PeakMemory(device) as peak, scope as model:
            generate(model, self.tokenizer, [prompts[i] for _, i in todo], gen, adapter_names=names,
                     on_batch=on_batch)
        bar.close()
        for lv in group:  # a shared batch has one peak: every variant in it gets it
            bucket = self.stats.setdefault(lv.name, {})
            bucket["peak_memory_mb"] = max(bucket.get("peak_memory_mb", 0.0), round(peak.mb, 1))
            bucket["peak_memory_source"] = peak.source


def _progress(total: int, desc: str, bars: bool, log: Callable[[str], Any] | None = None):
    """A progress bar on a terminal; elsewhere (CI logs) a line now and then, and one at the end."""
    if bars or log is None:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="case", disable=not bars, leave=False)
    return _ProgressLines(total, desc, log)


class _ProgressLines:
    EVERY_S = 20.0

    def __init__(self, total: int, desc: str, log: Callable[[str], Any]):
        self.total, self.desc, self.log, self.n = total, desc, log, 0
        self.start = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.EVERY_S and self.n < self.total:
            self.last = now
            self.log(f"{self.desc}: {self.n}/{self.total} cases ({now - self.start:.0f} s)")

    def close(self) -> None:
        if self.total:
            self.log(f"{self.desc}: {self.n}/{self.total} cases in {time.perf_counter() - self.start:.1f} s")

"""The loaded side of a run: one base instance, adapters attached by name, cached generation.

Task kinds receive a RunContext and never load models themselves, so the base is loaded once
per run whatever the number of variants and tasks.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from evalkit.backends.hf import generate, render_prompt
from evalkit.cache import Cache
from evalkit.config.suite import GenerationConfig, Suite, Variant
from evalkit.models.adapters import AdapterInfo
from evalkit.models.base import ResolvedBase
from evalkit.types import Case, Output, stable_hash


@dataclass
class LoadedVariant:
    variant: Variant
    model: Any  # the module this variant runs on (shared PeftModel for plain adapters)
    adapter_name: str | None  # active peft adapter on `model`; None runs with adapters disabled
    info: AdapterInfo | None
    fingerprint: str  # content address of "this model, as evaluated" (base, adapter, quantize, merge, template)

    @property
    def name(self) -> str:
        return self.variant.name

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
    return stable_hash({"base": base.sha256, "adapter": info.sha256 if info else None,
                        "quantize": variant.quantize, "merge": variant.merge, "chat_template": template_hash})


@dataclass
class RunContext:
    suite: Suite
    base: ResolvedBase
    tokenizer: Any
    variants: list[LoadedVariant]
    cache: Cache
    log: Callable[[str], None] = print
    progress: bool = True
    stats: dict[str, dict[str, float]] = field(default_factory=dict)  # per-variant cost counters
    models: dict[str, Any] = field(default_factory=dict)  # "full" | "nf4" | "int8" -> the one instance of each

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

    def attach_twin(self, lv: "LoadedVariant", quantize: str | None) -> "LoadedVariant":
        """An unmerged twin of a merged variant, attached to the shared base (not scored)."""
        name = f"{lv.name}~unmerged"
        model = self.attach(quantize, name, lv.info)
        twin = Variant(name=name, adapter=lv.variant.adapter, quantize=quantize)
        return LoadedVariant(twin, model, name, lv.info, "")

    def variant(self, name: str) -> LoadedVariant:
        return next(v for v in self.variants if v.name == name)

    def _count(self, name: str, **add: float) -> None:
        bucket = self.stats.setdefault(name, {})
        for k, v in add.items():
            bucket[k] = bucket.get(k, 0.0) + v

    def generate(self, lv: LoadedVariant, cases: Sequence[Case], gen: GenerationConfig, *,
                 desc: str = "") -> list[tuple[Output, bool]]:
        """Outputs for every case, reusing cached ones; each finished batch is cached at once,
        so an interrupted run resumes where it stopped. Returns (output, was_cached) pairs."""
        prompts = [render_prompt(self.tokenizer, c) for c in cases]
        keys = [Cache.key("generate", model=lv.fingerprint, gen=gen.key(), prompt=p) for p in prompts]
        found = [self.cache.get(k) for k in keys]
        todo = [i for i, f in enumerate(found) if f is None]
        results: list[tuple[Output, bool] | None] = [
            None if f is None else (Output(**f), True) for f in found]
        if todo:
            bar = _progress(len(todo), f"{desc or 'generate'} [{lv.name}]", self.progress)

            def on_batch(idx: list[int], outs: list[Output]) -> None:
                self.cache.put_many({keys[todo[i]]: o.__dict__ for i, o in zip(idx, outs)})
                self._count(lv.name, cases=len(outs), output_tokens=sum(o.n_output_tokens for o in outs),
                            seconds=sum(o.latency_s for o in outs))
                bar.update(len(outs))

            with lv.active() as model:
                outs = generate(model, self.tokenizer, [prompts[i] for i in todo], gen, on_batch=on_batch)
            bar.close()
            for i, o in zip(todo, outs):
                results[i] = (o, False)
        return results  # type: ignore[return-value]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="case", disable=not enabled, leave=False)

"""The `hf` backend: transformers + peft in this process, and the one owner of model objects.

It is the reference the other backends are checked against, and the only one that quantizes,
merges, runs DoRA and returns full logits. It loads the base once per precision, attaches every
plain adapter to it by name, builds merged copies apart, and loads nothing until the first
request the cache could not answer. Generation runs the shared decoder over its batch plan
(`hf_plan`): prompts sorted by length, base and plain-LoRA rows mixed in one batch.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from evalkit.backends.base import Job, OnOutputs, OnScores, Prompt, PromptScores, TokenPair
from evalkit.backends.decoder import Decoder, Event, Generation, PromptLogprobs
from evalkit.backends.hf_plan import Slot, generate, mix_groups, plan_runs
from evalkit.config.generation import GenerationConfig
from evalkit.config.variant import Variant
from evalkit.errors import ModelError
from evalkit.memory import PeakMemory
from evalkit.models.adapters import AdapterInfo, peft_name
from evalkit.models.base import ResolvedBase
from evalkit.record.types import BackendRecord

DEFAULT_MAX_LENGTH = 2048  # lm-eval's HFLM default when neither config nor tokenizer says


Locate = Callable[[str | None], contextlib.AbstractContextManager[Any]]  # variant name (None: the base) -> error-locating scope


class HFBackend:
    """Variants served in this process. `add` declares them; the models load on the first request
    (`load`), so a run the cache answers whole never loads one."""

    def __init__(self, base: ResolvedBase | None, tokenizer: Any, *, log: Callable[[str], None] = print,
                 locate: Locate | None = None):
        self.base, self.tokenizer, self.log = base, tokenizer, log
        self.locate: Locate = locate or (lambda _name: contextlib.nullcontext())
        self.slots: dict[str, Slot] = {}
        self.models: dict[str, Any] = {}  # "full" | "nf4" | "int8" -> the one shared instance of each
        self.stats: dict[str, dict[str, Any]] = {}  # per variant: peak memory
        self.forward_passes = 0  # loglikelihood forwards (the canary's batching is tested on it)
        self.fallbacks: dict[str, str] = {}  # variant -> why it runs here rather than on its server
        self._loaded = False

    @classmethod
    def over(cls, model: Any, tokenizer: Any, adapters: Mapping[str, str | None], *,
             base: ResolvedBase | None = None, log: Callable[[str], None] = print) -> HFBackend:
        """A backend over an already-loaded model (tests, benches, the server): variant name -> the
        peft adapter to make active on `model` (None: adapters off)."""
        backend = cls(base, tokenizer, log=log)
        backend.models["full"] = model
        for name, adapter in adapters.items():
            backend.slots[name] = Slot(Variant(name=name), None, adapter, model)
        backend._loaded = True
        return backend

    def add(self, variant: Variant, info: AdapterInfo | None) -> None:
        """Declare a variant; once the models are loaded, it is attached (or merged) at once."""
        slot = Slot(variant, info, peft_name(variant.name) if info and not variant.merge else None)
        self.slots[variant.name] = slot
        if self._loaded:
            from evalkit.models.adapters import check_fits_base

            with self.locate(variant.name):
                if info is not None and self.base is not None:
                    full = self.models["full"]
                    check_fits_base(info, full.get_base_model() if hasattr(full, "get_base_model") else full, self.base)
                self._bind(slot)

    def identity(self, variant: str) -> dict[str, Any]:
        return {"engine": "hf"}  # the variant fingerprint (content hashes) says the rest

    def record(self, variant: str) -> BackendRecord:
        return BackendRecord(engine="hf", fallback=self.fallbacks.get(variant))

    @property
    def max_length(self) -> int:
        """The longest sequence scored, as lm-eval's HFLM derives it (model config, else tokenizer)."""
        if "full" in self.models:
            config = self.models["full"].config
        else:
            with self.locate(None):  # read before any model loads (a run the cache answers)
                config = _config(self.base)
        for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
            if getattr(config, attr, None):
                return int(getattr(config, attr))
        limit = getattr(self.tokenizer, "model_max_length", None)
        return int(limit) if limit and limit < 10**12 else DEFAULT_MAX_LENGTH

    # ---------------------------------------------------------- model lifecycle

    def load(self) -> None:
        """One full-precision base for base + plain adapters (loaded once, adapters attached by
        name); one per quantization; merged copies apart. Each adapter is checked against the base
        before any is attached."""
        if self._loaded:
            return
        from evalkit.models.adapters import check_fits_base
        from evalkit.models.base import load_base

        assert self.base is not None  # a backend built `over` a model is loaded
        self.log(f"loading base {self.base.spec.ref}")
        with self.locate(None):
            self.models["full"] = load_base(self.base)[0]
        adapters = [s for s in self.slots.values() if s.info is not None]
        for slot in adapters:
            assert slot.info is not None
            with self.locate(slot.name):
                check_fits_base(slot.info, self.models["full"], self.base)
        for slot in adapters:  # plain adapters first: the first one wraps the base in a PeftModel
            with self.locate(slot.name):
                if not slot.variant.merge:
                    self._bind(slot)
        for slot in self.slots.values():
            if slot.model is None:
                with self.locate(slot.name):
                    self._bind(slot)
        for m in self.models.values():
            m.eval()
        self._loaded = True

    def _bind(self, slot: Slot) -> None:
        """Give a declared variant its module: the shared base of its precision with its adapter
        attached by name, or a merged copy of its own. Every slot on a shared base is rebound, as
        attaching the first adapter wraps that base in a PeftModel."""
        if slot.info is not None and slot.variant.merge:
            slot.model = self._merged(slot.variant, slot.info)
            slot.model.eval()
            return
        if slot.info is not None:
            self.attach(slot.variant.quantize, slot.name, slot.info)
        shared = self.model_for(slot.variant.quantize)
        for other in self.slots.values():
            if other.variant.quantize == slot.variant.quantize and not other.variant.merge:
                other.model = shared

    def model_for(self, quantize: str | None) -> Any:
        """The shared base instance for a precision, loaded on first use (once per run)."""
        key = quantize or "full"
        if key not in self.models:
            from evalkit.models.base import load_base

            assert self.base is not None
            self.log(f"loading {key} base")
            self.models[key] = load_base(self.base, quantize=quantize)[0]
        return self.models[key]

    def attach(self, quantize: str | None, name: str, info: AdapterInfo) -> Any:
        from evalkit.models.adapters import attach_adapter

        self.models[quantize or "full"] = attach_adapter(self.model_for(quantize), name, info)
        return self.models[quantize or "full"]

    def _merged(self, v: Variant, info: AdapterInfo) -> Any:
        """A merged copy. Merging into a 4-bit base re-quantizes and changes the model (DESIGN.md), so
        the default merges into a full-precision base ("dequantize-then-merge"); `merge_into:
        quantized` reproduces the lossy merge on purpose, so merge_equivalence can catch it."""
        from evalkit.models.adapters import attach_adapter
        from evalkit.models.base import load_base

        assert self.base is not None
        into_quantized = v.merge_target == "quantized"
        how = (f"into {v.quantize}" if into_quantized else f"dequantized from {v.quantize}" if v.quantize
               else "full precision")
        self.log(f"building merged variant '{v.name}' ({how})")
        base = load_base(self.base, quantize=v.quantize)[0]  # a merge rewrites weights: it needs its own copy
        if v.quantize and not into_quantized:
            # dequantize-then-merge: the quantized weights a QLoRA adapter was trained on, in full
            # precision, so the merged model reproduces the unmerged QLoRA variant (not the fp base's)
            base = base.dequantize()
        return attach_adapter(base, v.name, info).merge_and_unload()

    def shared_model(self, quantize: str | None, adapters: Mapping[str, AdapterInfo]) -> Any:
        """The base of one precision with each adapter attached by name, every one checked against
        the bare base first: what `evalkit serve` serves."""
        from evalkit.models.adapters import check_fits_base

        assert self.base is not None
        with self.locate(None):
            model = self.model_for(quantize)
        for name, info in adapters.items():  # on the bare base: attaching wraps it and renames its modules
            with self.locate(name):
                check_fits_base(info, model, self.base)
        for name, info in adapters.items():
            with self.locate(name):
                model = self.attach(quantize, name, info)
            self.log(f"adapter '{name}' <- {info.path}")
        model.eval()
        return model

    def add_twin(self, name: str) -> Variant:
        """An unmerged twin of a merged variant, attached to the shared base of its precision (not
        scored). peft injects the adapter into that base in place, so call it only after scoring."""
        merged = self.slots[name]
        assert merged.info is not None and merged.variant.merge
        twin = Variant(name=f"{name}~unmerged", adapter=merged.variant.adapter, quantize=merged.variant.quantize)
        self.load()
        self.add(twin, merged.info)
        return twin

    def device(self) -> str:
        """Where the models run; "none" when the cache answered everything and none was loaded."""
        model = next(iter(self.models.values()), None)
        return str(next(model.parameters()).device) if model is not None else "none"

    # ---------------------------------------------------------- the protocol

    def generate(self, jobs: Sequence[Job], prompts: Sequence[Prompt], gen: GenerationConfig,
                 on_done: OnOutputs) -> None:
        """Base and plain LoRA variants on one model pool their partial batches into mixed batches
        (`plan_runs`); DoRA and merged variants always run alone."""
        if not jobs:
            return
        self.load()
        missing: dict[str, list[int]] = {}
        for name, i in jobs:
            missing.setdefault(name, []).append(i)
        for group in mix_groups([self.slots[name] for name in missing]):
            for todo in plan_runs(group, missing, gen.batch_size):
                self._generate_run(todo, prompts, gen, on_done)

    def _generate_run(self, todo: list[tuple[Slot, int]], prompts: Sequence[Prompt], gen: GenerationConfig,
                      on_done: OnOutputs) -> None:
        group = list({id(slot): slot for slot, _ in todo}.values())
        device = str(next(group[0].model.parameters()).device)
        with PeakMemory(device) as peak:
            generate(group[0].model, self.tokenizer, [prompts[i] for _, i in todo], gen,
                     adapters=[slot.adapter_name for slot, _ in todo],
                     on_batch=lambda idx, outs: on_done([(todo[j][0].name, todo[j][1], o) for j, o in zip(idx, outs)]))
        for slot in group:  # a shared batch has one peak: every variant in it gets it
            bucket = self.stats.setdefault(slot.name, {})
            bucket["peak_memory_mb"] = max(bucket.get("peak_memory_mb", 0.0), round(peak.mb, 1))
            bucket["peak_memory_source"] = peak.source

    def loglikelihood(self, variant: str, requests: Sequence[TokenPair], on_done: OnScores, *,
                      batch_size: int = 8) -> None:
        """Requests that share their input (the " A"/" B"/" C"/" D" of a question, after lm-eval's
        left truncation to `max_length`) share ONE forward pass, which computes logits only for the
        positions that predict a continuation (`logits_to_keep`)."""
        if not requests:
            return
        self.load()
        limit = self.max_length
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (context, continuation) in enumerate(requests):
            whole = (list(context) + list(continuation))[-(limit + 1):]
            groups.setdefault(tuple(whole[:-1]), []).append(i)
        inputs = sorted(groups, key=len, reverse=True)
        with self.slots[variant].active() as model:
            for batch in _length_batches(inputs, batch_size):
                keep = max(1, *(len(requests[i][1]) for inp in batch for i in groups[inp]))
                logprobs = self._logprobs(model, batch, keep)
                done, results = [], []
                for row, inp in enumerate(batch):
                    for i in groups[inp]:
                        cont = list(requests[i][1])
                        lp = logprobs[row, keep - len(cont):]
                        picked = lp.gather(-1, _tensor(cont).unsqueeze(-1)).squeeze(-1)
                        done.append(i)
                        results.append((float(picked.sum()), bool((lp.argmax(-1) == _tensor(cont)).all())))
                on_done(done, results)

    def _logprobs(self, model: Any, inputs: list[tuple[int, ...]], keep: int) -> Any:
        """Log-probabilities at the last `keep` positions of each input: one left-padded batch.
        Positions come from the mask, so padding changes nothing."""
        import torch
        import torch.nn.functional as F

        width = max(len(c) for c in inputs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(inputs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(inputs), width), dtype=torch.long)
        for row, c in enumerate(inputs):
            ids[row, width - len(c):] = torch.tensor(c, dtype=torch.long)
            mask[row, width - len(c):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        device = next(model.parameters()).device
        with torch.inference_mode():
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                        position_ids=positions.to(device), logits_to_keep=keep, use_cache=False)
        self.forward_passes += 1
        return F.log_softmax(out.logits[:, -keep:, :].float(), dim=-1).cpu()

    def logits(self, variant: str, prompts: Sequence[Sequence[int]], *, adapters_off: bool = False) -> list[Any]:
        """Full-sequence logits per prompt, one at a time (no padding to muddy a comparison). With
        `adapters_off`, the weights the variant's adapter sits on: its model with adapters disabled,
        or for a merged copy the base of the precision it was merged from."""
        import torch

        self.load()
        slot = self._slot(variant, adapters_off)
        out = []
        with slot.active(adapters_off=adapters_off) as model, torch.inference_mode():
            device = next(model.parameters()).device
            for ids in prompts:
                out.append(model(input_ids=_tensor(ids).unsqueeze(0).to(device)).logits[0].float().cpu())
        return out

    def next_token_logprobs(self, variant: str, prompts: Sequence[Sequence[int]],
                            on_each: Callable[[int, Any], None], *, batch_size: int = 8,
                            adapters_off: bool = False) -> None:
        """Each prompt's next-token log-probabilities at every position ([len, vocab], float32),
        handed to `on_each(index, logprobs)` one batch at a time, so only one batch's rows are ever
        in memory. Right-padded: a causal model's real positions never see the padding after them.
        `adapters_off` as for `logits`: the base the variant's adapter sits on."""
        import torch
        import torch.nn.functional as F

        self.load()
        slot = self._slot(variant, adapters_off)
        with slot.active(adapters_off=adapters_off) as model, torch.inference_mode():
            device = next(model.parameters()).device
            order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # alike lengths pad little
            for start in range(0, len(prompts), batch_size):
                chunk = order[start:start + batch_size]
                width = max(len(prompts[i]) for i in chunk)
                ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, i in enumerate(chunk):
                    ids[row, :len(prompts[i])] = _tensor(prompts[i])
                    mask[row, :len(prompts[i])] = 1
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
                self.forward_passes += 1
                for row, i in enumerate(chunk):
                    on_each(i, F.log_softmax(logits[row, :len(prompts[i])].float(), dim=-1).cpu())

    def prompt_logprobs(self, variant: str, prompts: Sequence[Sequence[int]]) -> list[PromptScores]:
        """Per prompt, each token's logprob given those before it (from the second token on) and the
        top-1 token at that position, rendered as servers render it (the token decoded alone): the
        decoder's prefill, as `evalkit serve` answers `echo`, one prompt at a time (no padding)."""
        self.load()
        slot = self.slots[variant]
        decoder = Decoder(slot.model, self.tokenizer)
        out = []
        for ids in prompts:
            events: list[Event] = []
            decoder.run([Generation(slot.adapter_name, list(ids), 0, sink=events.append, prompt_logprobs=1, stream=False)])
            scored = next(e for e in events if isinstance(e, PromptLogprobs)).tokens[1:]
            out.append(([t.logprob for t in scored if t.logprob is not None],
                        [self.tokenizer.decode([t.top[0][0]]) for t in scored]))
        return out

    def _slot(self, variant: str, adapters_off: bool) -> Slot:
        """The variant's slot; with `adapters_off`, for a merged copy, the base it was merged from."""
        slot = self.slots[variant]
        if adapters_off and slot.variant.merge:
            return Slot(slot.variant, None, None, self.model_for(slot.variant.quantize))
        return slot

    def reference_of(self, variant: str) -> int:
        """Which model `logits(variant, adapters_off=True)` runs on: variants sharing it share a reference."""
        slot = self.slots[variant]
        self.load()
        return id(self.model_for(slot.variant.quantize) if slot.variant.merge else slot.model)

    def close(self) -> None:
        self.models.clear()
        self.slots.clear()


def _tensor(ids: Sequence[int]) -> Any:
    import torch

    return torch.tensor(list(ids), dtype=torch.long)


def _config(base: ResolvedBase | None) -> Any:
    from transformers import AutoConfig

    assert base is not None
    try:
        return AutoConfig.from_pretrained(base.path, revision=base.spec.revision, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:  # a config.json that is not JSON, or names an unknown model type
        raise ModelError(f"cannot read the config of base '{base.spec.ref}': {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None


def _length_batches(inputs: Sequence[tuple[int, ...]], size: int, min_fill: float = 0.9) -> Iterator[list[tuple[int, ...]]]:
    """Batches of up to `size` inputs (sorted longest first) whose lengths stay within `min_fill`
    of the batch's longest, so padding wastes at most ~10% of a forward pass; fixed-size batches
    waste about as much again on MMLU's long tail (law, history: 5x the median prompt)."""
    batch: list[tuple[int, ...]] = []
    for c in inputs:
        if batch and (len(batch) == size or len(c) < min_fill * len(batch[0])):
            yield batch
            batch = []
        batch.append(c)
    if batch:
        yield batch


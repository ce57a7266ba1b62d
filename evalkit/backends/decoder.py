"""The one batch decoder under evaluation (the `hf` backend) and `evalkit serve`.

Both front-ends hand it rows; it runs them as one left-padded prefill and then one token per step
for every live row, with each row's own sampling, stops, logprobs and grammar, and drops a row
from the batch (and its KV cache) as soon as it finishes. Every rule a decode depends on lives
here once: the end-of-sequence set, which adapter is in force and which rows may share a batch,
stop strings, left-pad positions, prompt logprobs. The front-ends differ only in what they do
around it: the `hf` backend keeps its deterministic batch plan and calls `run` synchronously;
serve keeps its scheduler, windows and deadlines. HF's `model.generate` is the test oracle.
A change to a rule that changes what greedy decoding returns bumps `config.generation.DECODER`.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from evalkit.backends.base import truncate_at_stop
from evalkit.backends.sampling import Sampling, pick, topk
from evalkit.compat import kv_cache_arg, select_cache_rows

NO_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch
# Finished rows leave the batch once a quarter of it has finished: dropping them copies the whole KV
# cache, which costs more than a few finished rows riding along (bench/bench_decoder.py measures both).
DROP_AT = 0.75


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float | None  # None for a prompt's first token: nothing comes before it
    top: tuple[tuple[int, float], ...] = ()  # the likeliest alternatives, best first


@dataclass(frozen=True)
class Delta:
    """New output of one row: its text (may be empty while a stop string could still start) and
    the tokens it came from, with logprobs when the request asked for them."""

    text: str
    tokens: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class PromptLogprobs:
    """Sent first, when the request asked for them (echo): one entry per prompt token."""

    tokens: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class Finished:
    """The row's end: why, what it cost, and its whole output (text cut at the stop string; the
    token ids as generated, an end-of-sequence token included)."""

    finish_reason: str  # "stop" (EOS, stop string, grammar complete) or "length"
    prompt_tokens: int
    completion_tokens: int
    text: str = ""
    token_ids: tuple[int, ...] = ()
    eos: bool = False  # ended on an end-of-sequence token (counted in completion_tokens, as vLLM does)


@dataclass(frozen=True)
class Failed:
    status: int
    message: str
    code: str | None = None


Event = PromptLogprobs | Delta | Finished | Failed


@dataclass(eq=False)
class Generation:
    """One sequence to generate. `model` names the adapter in force (the decoder's `base_name`, or
    None: none). `cancelled` may be set from any thread; the decoder drops the row at its next step.
    `stream: False` sends no deltas, only `Finished` with the whole text (evaluation)."""

    model: str | None
    prompt: list[int]
    max_tokens: int
    sink: Callable[[Event], None]
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # alternatives per generated token (0: the chosen token's only)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (echo)
    guide: Any = None  # a serve.guided.Guide constraining the output to a grammar
    deadline: float = float("inf")  # time.monotonic() after which the row fails with a timeout
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)
    stream: bool = True


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokens that end a reply: the tokenizer's EOS and every id of the model's generation
    config (an end-of-turn token besides EOS, as Gemma's and Phi-3's list), as HF's `generate` and
    vLLM stop on. Padding is not a stop unless it is one of these."""
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [tokenizer.eos_token_id, *(extra if isinstance(extra, list) else [extra])]
    return [int(i) for i in dict.fromkeys(ids) if i is not None]


def shares_batches(model: Any, adapter: str | None) -> bool:
    """Whether rows under this adapter (None: none) may share a batch with other adapters' rows.
    peft mixes adapters row by row (`adapter_names`) only for plain LoRA on a peft model; DoRA
    refuses with a ValueError and leaves its hooks behind, so every later call fails too; a model
    without adapters (a merged copy) has nothing to mix."""
    config = getattr(model, "peft_config", None)
    if config is None:
        return False
    if adapter is None:
        return True
    c = config[adapter]
    return str(getattr(c, "peft_type", "LORA")).endswith("LORA") and not getattr(c, "use_dora", False)


@contextlib.contextmanager
def adapters_in_force(model: Any, adapters: Sequence[str | None]) -> Iterator[dict[str, Any]]:
    """`model` with the rows' adapters in force; yields the extra forward kwargs. One adapter: it is
    set active (None: every adapter disabled); several: peft's per-row `adapter_names`, which
    ignores the active adapter but not `disable_adapter()`, so the bare model runs them."""
    names = set(adapters)
    if not hasattr(model, "peft_config"):
        yield {}
    elif len(names) > 1:
        yield {"adapter_names": [a if a is not None else NO_ADAPTER for a in adapters]}
    elif names == {None}:
        with model.disable_adapter():
            yield {}
    else:
        model.set_adapter(next(iter(names)))
        yield {}


class Decoder:
    """Decodes rows on one model. `base_name` is the name rows use for the bare model."""

    def __init__(self, model: Any, tokenizer: Any, *, base_name: str | None = None):
        self.model, self.tokenizer, self.base_name = model, tokenizer, base_name
        self.eos_ids = eos_ids(model, tokenizer)
        self.device = next(model.parameters()).device
        self.steps = self.tokens = 0  # decode steps run, tokens decoded after the prefills

    def adapter(self, request: Generation) -> str | None:
        return None if request.model == self.base_name else request.model

    def run(self, requests: Sequence[Generation], abort: Callable[[], bool] = lambda: False) -> list[Generation]:
        """Decode the rows to their ends, each event sent through its request's `sink` as it
        happens; returns the requests `abort()` left unfinished."""
        import torch

        rows = [_Row(r, self) for r in requests]
        width = max(len(r.prompt) for r in requests)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        ids = torch.tensor([[pad] * (width - len(r.prompt)) + r.prompt for r in requests], device=self.device)
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in requests], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift positions
        echo = any(r.prompt_logprobs is not None for r in requests)
        cache_arg = kv_cache_arg()
        adapters = [self.adapter(r) for r in requests]
        with torch.inference_mode(), adapters_in_force(self.model, adapters) as kwargs:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=0 if echo else 1, **kwargs)
            cache = getattr(out, cache_arg)
            if echo:
                for r, row in enumerate(rows):
                    row.prompt_logprobs(out.logits[r, width - len(row.request.prompt):])
            logits = out.logits[:, -1]
            del out
            while True:
                greedy = logits.argmax(-1).tolist()  # every row's likeliest token: one device sync
                for r, row in enumerate(rows):
                    row.step(logits[r], greedy[r])
                self.steps += 1
                live = [r for r, row in enumerate(rows) if not row.done]
                if not live or abort():
                    break
                if len(live) <= DROP_AT * len(rows):
                    keep = torch.tensor(live, device=self.device)
                    if select_cache_rows(cache, keep):
                        rows, mask, positions = [rows[r] for r in live], mask[keep], positions[keep]
                        if "adapter_names" in kwargs:
                            kwargs = {"adapter_names": [kwargs["adapter_names"][r] for r in live]}
                next_ids = torch.tensor([[row.last] for row in rows], device=self.device)
                mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
                positions = positions[:, -1:] + 1
                out = self.model(input_ids=next_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                 **{cache_arg: cache}, **kwargs)
                cache = getattr(out, cache_arg)
                logits = out.logits[:, -1]
                self.tokens += len(live)
        return [row.request for row in rows if not row.done]


def emit(request: Generation, event: Event) -> None:
    try:
        request.sink(event)
    except Exception:  # a sink whose client or event loop is gone
        import logging

        logging.getLogger("evalkit.decoder").debug("dropped an event for a finished request", exc_info=True)


def timeout(request: Generation) -> Failed:
    return Failed(504, f"the request did not finish within the server's timeout "
                       f"({time.monotonic() - request.submitted:.0f} s)", code="timeout")


class _Text:
    """Incremental detokenisation (vLLM's): each step decodes only a short window of the newest
    tokens, twice (with and without the new ones), and keeps the difference; text that ends in
    half a multi-byte character waits for the rest."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.text = ""
        self._prefix = self._read = 0

    def push(self, ids: Sequence[int]) -> None:
        decode = self.tokenizer.decode
        before = decode(ids[self._prefix:self._read], skip_special_tokens=True)
        now = decode(ids[self._prefix:], skip_special_tokens=True)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before):]
            self._prefix, self._read = self._read, len(ids)


class _Row:
    """One request's state inside a running batch."""

    def __init__(self, request: Generation, decoder: Decoder):
        self.request, self.decoder = request, decoder
        self.out: list[int] = []
        self.last = -1
        self.done = False
        self.sent = 0  # characters of the text already sent
        self.generator = request.sampling.generator(decoder.device)
        self.fast = request.sampling.greedy and request.sampling.plain and request.guide is None
        self.text = _Text(decoder.tokenizer) if (request.stream or request.stop) else None
        self.hold = max((len(s) for s in request.stop), default=1) - 1

    def prompt_logprobs(self, logits: Any) -> None:
        """Each prompt token's logprob given the tokens before it (the first has none)."""
        import torch

        k = self.request.prompt_logprobs or 0
        prompt = self.request.prompt
        lp = logits[:-1].float().log_softmax(-1)
        chosen = lp.gather(-1, torch.tensor(prompt[1:], device=lp.device).unsqueeze(-1)).squeeze(-1).tolist()
        entries = [TokenLogprob(prompt[0], None)]
        entries += [TokenLogprob(t, c, top) for t, c, top in zip(prompt[1:], chosen, topk(lp, k))]
        emit(self.request, PromptLogprobs(tuple(entries)))

    def step(self, logits: Any, greedy: int) -> None:
        """Take this row's next token (`greedy` is its argmax), or finish it."""
        request = self.request
        if self.done:
            return
        if request.cancelled or request.deadline < time.monotonic():
            self._finish(None if request.cancelled else timeout(request))
            return
        if request.max_tokens == 0:
            self._finish("length")
            return
        token = greedy if self.fast else pick(logits.float(), request.sampling, self.out, request.guide, self.generator)
        entry = None
        if request.logprobs is not None:
            lp = logits.float().log_softmax(-1)
            entry = TokenLogprob(token, lp[token].item(), topk(lp.unsqueeze(0), request.logprobs)[0])
        self.out.append(token)
        self.last = token
        if request.guide is not None:
            request.guide.consume(token)
        eos = token in self.decoder.eos_ids
        if eos or (request.guide is not None and request.guide.finished):
            self._send(entry, final=True)
            self._finish("stop", eos=eos)
        elif self._send(entry):
            self._finish("stop")
        elif len(self.out) >= request.max_tokens:
            self._send(None, final=True)
            self._finish("length")

    def _body(self) -> list[int]:
        """The generated tokens that are text: all but an end-of-sequence token that ended the row."""
        return self.out[:-1] if self.out and self.out[-1] in self.decoder.eos_ids else self.out

    def _send(self, entry: TokenLogprob | None, final: bool = False) -> bool:
        """Send the text that is safe to send; True when a stop string ended the row. Text that
        could be the start of a stop string waits."""
        if self.text is None:
            return False
        self.text.push(self._body())
        text = self.text.text
        stops = [i for i in (text.find(s, max(0, self.sent - self.hold)) for s in self.request.stop) if i >= 0]
        if stops:
            text, final = text[:min(stops)], True
        end = len(text) if final else max(self.sent, len(text) - self._held(text))
        if self.request.stream and (end > self.sent or entry is not None):
            emit(self.request, Delta(text[self.sent:end], (entry,) if entry is not None else ()))
        self.sent = max(self.sent, end)
        return bool(stops)

    def _held(self, text: str) -> int:
        """How many trailing characters could begin a stop string."""
        for n in range(min(self.hold, len(text)), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.request.stop):
                return n
        return 0

    def _finish(self, reason: str | Failed | None, eos: bool = False) -> None:
        self.done = True
        if isinstance(reason, Failed):
            emit(self.request, reason)
        elif reason is not None:  # None: cancelled, nobody is listening
            # the whole text decoded at once: exact, whatever the incremental windows saw
            text, _ = truncate_at_stop(self.decoder.tokenizer.decode(self._body(), skip_special_tokens=True),
                                       self.request.stop)
            if self.request.stream and len(text) > self.sent:
                emit(self.request, Delta(text[self.sent:]))
            emit(self.request, Finished(reason, len(self.request.prompt), len(self.out), text, tuple(self.out), eos))

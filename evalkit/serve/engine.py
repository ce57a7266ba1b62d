"""The serving engine: one base model with adapters attached by name, and a scheduler thread that
coalesces concurrent requests into shared forward passes.

Requests become `Job`s (one per sequence to generate: a prompt × n). The scheduler waits a short
window after the first job arrives, then takes the waiting jobs that can share a batch (base and
plain LoRA adapters mix row by row, as evaluation does; a DoRA adapter runs apart) and runs its
own decode loop over them: one left-padded prefill, then one token per step for every live row,
with each row's own sampling, stops, logprobs and grammar. A row that finishes, is cancelled or
passes its deadline leaves the batch at once (its KV cache rows are dropped). Micro-batches, not
continuous batching: a job that arrives while a batch runs waits for the next one.

Only this thread touches the model; results go back through each job's `sink`, called from it.
"""
from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from evalkit.compat import kv_cache_arg, select_cache_rows

log = logging.getLogger("evalkit.serve")

BASE = "base"
# A prefill that returns every position's logits (echo + logprobs) holds batch × tokens × vocab
# floats; batches are cut to keep that under about 1 GiB.
LOGITS_BUDGET = 2**28
MAX_WINDOWS = 10  # the longest a request waits for others to join its batch, in batching windows
GREEDY_BELOW = 1e-5  # a temperature below this picks the likeliest token (as vLLM's)


@dataclass(frozen=True)
class Sampling:
    """How a row picks its next token. temperature 0 is greedy (the default, as in evaluation)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # drop tokens less likely than min_p x the likeliest's probability
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None

    @property
    def plain(self) -> bool:
        """Nothing changes the logits before the pick."""
        return (self.repetition_penalty == 1.0 and not self.frequency_penalty and not self.presence_penalty
                and not self.logit_bias)


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float | None  # None for a prompt's first token: nothing comes before it
    top: tuple[tuple[int, float], ...] = ()  # the likeliest alternatives, best first


@dataclass(frozen=True)
class Delta:
    """New output of one row: its text (may be empty while a stop string could still start) and
    the tokens it came from, with logprobs when the job asked for them."""

    text: str
    tokens: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class PromptLogprobs:
    """Sent first, when the job asked for them (echo): one entry per prompt token."""

    tokens: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" (EOS, stop string, grammar complete) or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    status: int
    message: str
    code: str | None = None


Event = PromptLogprobs | Delta | Finished | Failed


@dataclass(eq=False)
class Job:
    """One sequence to generate. `cancelled` may be set from any thread; the engine drops the row
    at its next step."""

    model: str
    prompt: list[int]
    max_tokens: int
    sink: Callable[[Event], None]
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # alternatives per generated token (0: the chosen token's only)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (echo)
    guide: Any = None  # a guided.Guide constraining the output to a grammar
    deadline: float = float("inf")  # time.monotonic() after which the job fails with a timeout
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)


class Engine:
    """The model, the adapters it serves by name, and the batching scheduler."""

    def __init__(self, model: Any, tokenizer: Any, adapters: Mapping[str, bool] | None = None, *,
                 fingerprints: Mapping[str, str] | None = None, roots: Mapping[str, str] | None = None,
                 max_batch: int = 32, max_batch_tokens: int = 16384, window_s: float = 0.02,
                 max_model_len: int | None = None):
        """`adapters` maps each adapter name to whether it can share a batch with others (plain
        LoRA: True; DoRA: False). `roots` says what each name is loaded from (vLLM's `root`)."""
        self.model, self.tokenizer = model, tokenizer
        self.mixable = {BASE: True, **dict(adapters or {})}
        self.fingerprints = dict(fingerprints or {})
        self.roots = dict(roots or {})
        self.max_batch, self.max_batch_tokens, self.window_s = max_batch, max_batch_tokens, window_s
        window = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(window, max_model_len or window)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.eos_ids = _eos_ids(model, tokenizer)
        self.device = next(model.parameters()).device
        self.created = int(time.time())
        self.stats = {"batches": 0, "rows": 0, "steps": 0, "tokens": 0}  # what the scheduler did
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="evalkit-engine", daemon=True)
        self._thread.start()

    @property
    def names(self) -> list[str]:
        return list(self.mixable)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._pending)

    def submit(self, jobs: Sequence[Job]) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is shut down")
            self._pending.extend(jobs)
            self._cond.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Stop: waiting and running jobs fail with 503 at the next step."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    # ------------------------------------------------------------ scheduling

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._run(batch)
            except Exception as e:  # one bad batch must not stop the server
                log.exception("generation failed")
                for job in batch:
                    _emit(job, Failed(500, f"generation failed ({type(e).__name__}); see the server log"))
        for job in self._pending:
            _emit(job, Failed(503, "the server is shutting down"))

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            # let concurrent requests join: a burst sent at once reaches the server over tens of
            # milliseconds (more on a busy machine), so wait until none has arrived for a window,
            # at most MAX_WINDOWS windows after the oldest; jobs that waited through a running
            # batch go at once
            longest = MAX_WINDOWS * self.window_s
            while not self._closed and len(self._pending) < self.max_batch:
                now = time.monotonic()
                quiet, waited = now - self._pending[-1].submitted, now - self._pending[0].submitted
                if quiet >= self.window_s or waited >= longest:
                    break
                self._cond.wait(min(self.window_s - quiet, longest - waited))
            if self._closed:
                return None
            now = time.monotonic()
            for job in self._pending:
                if job.deadline < now and not job.cancelled:
                    _emit(job, _timeout(job))
            self._pending = [j for j in self._pending if not (j.cancelled or j.deadline < now)]
            batch = self._take(self._pending)
            taken = set(map(id, batch))
            self._pending = [j for j in self._pending if id(j) not in taken]
            return batch

    def _group(self, job: Job) -> str:
        return "" if self.mixable[job.model] else job.model

    def _take(self, pending: Sequence[Job]) -> list[Job]:
        """The oldest job and those after it that fit one batch: the same mix group, at most
        `max_batch` rows and `max_batch_tokens` padded tokens, and a bounded echo prefill."""
        if not pending:
            return []
        group, width = self._group(pending[0]), 0
        batch: list[Job] = []
        for job in pending:
            if self._group(job) != group or len(batch) == self.max_batch:
                continue
            w = max(width, len(job.prompt))
            rows = len(batch) + 1
            echo = any(j.prompt_logprobs is not None for j in [*batch, job])
            if batch and (rows * w > self.max_batch_tokens or (echo and rows * w * self.vocab_size > LOGITS_BUDGET)):
                continue
            batch.append(job)
            width = w
        return batch

    # ------------------------------------------------------------ the decode loop

    def _run(self, jobs: list[Job]) -> None:
        import torch

        self.stats["batches"] += 1
        self.stats["rows"] += len(jobs)
        rows = [_Row(job, self) for job in jobs]
        width = max(len(j.prompt) for j in jobs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        ids = torch.tensor([[pad] * (width - len(j.prompt)) + j.prompt for j in jobs], device=self.device)
        mask = torch.tensor([[0] * (width - len(j.prompt)) + [1] * len(j.prompt) for j in jobs], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift positions
        echo = any(j.prompt_logprobs is not None for j in jobs)
        cache_arg = kv_cache_arg()
        with torch.inference_mode(), self._adapters(jobs) as (model, kwargs):
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        logits_to_keep=0 if echo else 1, **kwargs)
            cache = getattr(out, cache_arg)
            if echo:
                for r, row in enumerate(rows):
                    row.prompt_logprobs(out.logits[r, width - len(row.job.prompt):])
            logits = out.logits[:, -1].float()
            del out
            while True:
                for r, row in enumerate(rows):
                    row.step(logits[r])
                self.stats["steps"] += 1
                live = [r for r, row in enumerate(rows) if not row.done]
                if not live or self._closed:
                    break
                if len(live) < len(rows):
                    keep = torch.tensor(live, device=self.device)
                    if select_cache_rows(cache, keep):
                        rows, mask, positions = [rows[r] for r in live], mask[keep], positions[keep]
                        kwargs = self._mix_kwargs([row.job for row in rows]) if "adapter_names" in kwargs else kwargs
                next_ids = torch.tensor([[row.last] for row in rows], device=self.device)
                mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
                positions = positions[:, -1:] + 1
                out = model(input_ids=next_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                            **{cache_arg: cache}, **kwargs)
                cache = getattr(out, cache_arg)
                logits = out.logits[:, -1].float()
                self.stats["tokens"] += len(rows)
        for row in rows:
            if not row.done:
                _emit(row.job, Failed(503, "the server is shutting down"))

    def _mix_kwargs(self, jobs: Sequence[Job]) -> dict[str, Any]:
        # peft's name for "no adapter" in a mixed batch
        return {"adapter_names": [BASE_IN_MIX if j.model == BASE else j.model for j in jobs]}

    @contextlib.contextmanager
    def _adapters(self, jobs: Sequence[Job]) -> Iterator[tuple[Any, dict[str, Any]]]:
        """The model with the batch's adapters in force: one name → that adapter active (or all
        disabled for the base); several → peft's per-row `adapter_names`."""
        names = {j.model for j in jobs}
        model = self.model
        if not hasattr(model, "peft_config"):
            yield model, {}
        elif len(names) > 1:
            yield model, self._mix_kwargs(jobs)
        elif names == {BASE}:
            with model.disable_adapter():
                yield model, {}
        else:
            model.set_adapter(next(iter(names)))
            yield model, {}


BASE_IN_MIX = "__base__"


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokens that end a reply: the tokenizer's EOS first (as evaluation stops on it), then
    any the model's generation config adds (e.g. an end-of-turn token)."""
    ids = [tokenizer.eos_token_id]
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += extra if isinstance(extra, list) else [extra]
    return [i for i in dict.fromkeys(ids) if i is not None]


def _emit(job: Job, event: Event) -> None:
    try:
        job.sink(event)
    except Exception:  # a sink whose client or event loop is gone
        log.debug("dropped an event for a finished request", exc_info=True)


def _timeout(job: Job) -> Failed:
    return Failed(504, f"the request did not finish within the server's timeout "
                       f"({time.monotonic() - job.submitted:.0f} s)", code="timeout")


class _Row:
    """One job's state inside a running batch."""

    def __init__(self, job: Job, engine: Engine):
        import torch

        self.job, self.engine, self.tokenizer = job, engine, engine.tokenizer
        self.out: list[int] = []
        self.sent = 0  # characters of the text already sent
        self.done = False
        self.last = -1
        self.generator = None
        if job.sampling.temperature >= GREEDY_BELOW:
            seed = job.sampling.seed if job.sampling.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator(device=engine.device).manual_seed(seed % 2**63)
        self.hold = max((len(s) for s in job.stop), default=1) - 1

    def prompt_logprobs(self, logits: Any) -> None:
        """Each prompt token's logprob given the tokens before it (the first has none)."""
        import torch

        k = self.job.prompt_logprobs or 0
        prompt = self.job.prompt
        lp = logits[:-1].float().log_softmax(-1)
        chosen = lp.gather(-1, torch.tensor(prompt[1:], device=lp.device).unsqueeze(-1)).squeeze(-1).tolist()
        tops = _topk(lp, k)
        entries = [TokenLogprob(prompt[0], None)]
        entries += [TokenLogprob(t, c, top) for t, c, top in zip(prompt[1:], chosen, tops)]
        _emit(self.job, PromptLogprobs(tuple(entries)))

    def step(self, logits: Any) -> None:
        """Pick this row's next token from its logits, or finish it."""
        job = self.job
        if self.done:
            return
        if job.cancelled or job.deadline < time.monotonic():
            self._finish(None if job.cancelled else _timeout(job))
            return
        if job.max_tokens == 0:
            self._finish("length")
            return
        token = self._pick(logits)
        entry = None
        if job.logprobs is not None:
            lp = logits.log_softmax(-1)
            entry = TokenLogprob(token, lp[token].item(), _topk(lp.unsqueeze(0), job.logprobs)[0])
        self.out.append(token)
        self.last = token
        if job.guide is not None:
            job.guide.consume(token)
        if token in self.engine.eos_ids or (job.guide is not None and job.guide.finished):
            self._send(entry, final=True)
            self._finish("stop")
            return
        if self._send(entry):
            self._finish("stop")
        elif len(self.out) >= job.max_tokens:
            self._send(None, final=True)
            self._finish("length")

    def _pick(self, logits: Any) -> int:
        import torch

        s, job = self.job.sampling, self.job
        greedy = s.temperature < GREEDY_BELOW  # dividing by a tinier one overflows to inf (NaN probabilities)
        if s.plain and job.guide is None and greedy:
            return int(logits.argmax())
        x = logits.clone()
        if s.logit_bias:
            ids, bias = zip(*s.logit_bias)
            x[list(ids)] += x.new_tensor(bias)
        if self.out and not s.plain:
            seen = torch.tensor(self.out, device=x.device)
            counts = torch.bincount(seen, minlength=x.shape[0]).to(x.dtype)
            if s.repetition_penalty != 1.0:  # as transformers: shrink the logits of tokens already produced
                hit = counts > 0
                x[hit] = torch.where(x[hit] > 0, x[hit] / s.repetition_penalty, x[hit] * s.repetition_penalty)
            x -= s.frequency_penalty * counts + s.presence_penalty * (counts > 0).to(x.dtype)
        if job.guide is not None:
            job.guide.mask(x)
        if greedy:
            return int(x.argmax())
        x = x / s.temperature
        if s.top_k > 0:
            kth = x.topk(min(s.top_k, x.shape[0])).values[-1]
            x[x < kth] = float("-inf")
        probs = x.softmax(-1)
        if s.min_p > 0:
            probs[probs < s.min_p * probs.max()] = 0.0
        if s.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > s.top_p  # keep the smallest set reaching top_p
            probs[order[drop]] = 0.0
        if not (bool(torch.isfinite(probs).all()) and float(probs.sum()) > 0):  # nothing left to sample from
            return int(x.argmax())
        return int(torch.multinomial(probs, 1, generator=self.generator).item())

    def _send(self, entry: TokenLogprob | None, final: bool = False) -> bool:
        """Send the text that is safe to send; True when a stop string ended the row. Text that
        could be the start of a stop string, or half of a multi-byte character, waits."""
        text = self.tokenizer.decode(self.out, skip_special_tokens=True)
        stops = [i for i in (text.find(s, max(0, self.sent - self.hold)) for s in self.job.stop) if i >= 0]
        if stops:
            text, final = text[:min(stops)], True
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):
                end = len(text.rstrip("\ufffd"))
            end = max(self.sent, end - self._held(text[:end]))
        if end > self.sent or entry is not None:
            _emit(self.job, Delta(text[self.sent:end], (entry,) if entry is not None else ()))
            self.sent = max(self.sent, end)
        return bool(stops)

    def _held(self, text: str) -> int:
        """How many trailing characters could begin a stop string."""
        for n in range(min(self.hold, len(text)), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.job.stop):
                return n
        return 0

    def _finish(self, reason: str | Failed | None) -> None:
        self.done = True
        if isinstance(reason, Failed):
            _emit(self.job, reason)
        elif reason is not None:  # None: cancelled, nobody is listening
            _emit(self.job, Finished(reason, len(self.job.prompt), len(self.out)))


def _topk(lp: Any, k: int) -> list[tuple[tuple[int, float], ...]]:
    """The k likeliest tokens per row of a [n, vocab] logprob tensor."""
    if k <= 0:
        return [()] * lp.shape[0]
    values, ids = lp.topk(k, dim=-1)
    return [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]

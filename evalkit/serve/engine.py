"""The serving engine: one base model with adapters attached by name, and a scheduler thread that
coalesces concurrent requests into shared forward passes.

Requests become jobs (one per sequence to generate: a prompt × n). The scheduler waits a short
window after the first job arrives, then takes the waiting jobs that can share a batch (base and
plain LoRA adapters mix row by row, as evaluation does; a DoRA adapter runs apart) and hands them
to the decoder evaluation uses (`evalkit.backends.decoder`), which runs each row with its own
sampling, stops, logprobs and grammar and drops a row that finishes, is cancelled or passes its
deadline. Micro-batches, not continuous batching: a job that arrives while a batch runs waits for
the next one.

Only this thread touches the model; results go back through each job's `sink`, called from it.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from evalkit.backends.decoder import Decoder, Failed, Generation, emit, shares_batches, timeout

log = logging.getLogger("evalkit.serve")

BASE = "base"
# A prefill that returns every position's logits (echo + logprobs) holds batch × tokens × vocab
# floats; batches are cut to keep that under about 1 GiB.
LOGITS_BUDGET = 2**28
MAX_WINDOWS = 10  # the longest a request waits for others to join its batch, in batching windows


class Engine:
    """The model, the adapters it serves by name, and the batching scheduler."""

    def __init__(self, model: Any, tokenizer: Any, adapters: Sequence[str] = (), *,
                 fingerprints: Mapping[str, str] | None = None, roots: Mapping[str, str] | None = None,
                 max_batch: int = 32, max_batch_tokens: int = 16384, window_s: float = 0.02,
                 max_model_len: int | None = None):
        """`adapters` names the adapters attached to `model` (a peft model when there are any);
        `roots` says what each name is loaded from (vLLM's `root`)."""
        self.model, self.tokenizer = model, tokenizer
        self.decoder = Decoder(model, tokenizer, base_name=BASE)
        # which names may share a batch: the decoder's rule (base and plain LoRA; DoRA runs apart)
        self.mixable = {BASE: True, **{name: shares_batches(model, name) for name in adapters}}
        self.fingerprints = dict(fingerprints or {})
        self.roots = dict(roots or {})
        self.max_batch, self.max_batch_tokens, self.window_s = max_batch, max_batch_tokens, window_s
        window = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(window, max_model_len or window)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.eos_ids = self.decoder.eos_ids
        self.created = int(time.time())
        self.batches = self.rows = 0  # what the scheduler did
        self._pending: list[Generation] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="evalkit-engine", daemon=True)
        self._thread.start()

    @property
    def stats(self) -> dict[str, int]:
        """Batches and rows scheduled, decode steps run, tokens decoded after the prefills."""
        return {"batches": self.batches, "rows": self.rows, "steps": self.decoder.steps, "tokens": self.decoder.tokens}

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

    def submit(self, jobs: Sequence[Generation]) -> None:
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
                    emit(job, Failed(500, f"generation failed ({type(e).__name__}); see the server log"))
        for job in self._pending:
            emit(job, Failed(503, "the server is shutting down"))

    def _next_batch(self) -> list[Generation] | None:
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
                    emit(job, timeout(job))
            self._pending = [j for j in self._pending if not (j.cancelled or j.deadline < now)]
            batch = self._take(self._pending)
            taken = set(map(id, batch))
            self._pending = [j for j in self._pending if id(j) not in taken]
            return batch

    def _group(self, job: Generation) -> str:
        name = job.model or BASE
        return "" if self.mixable[name] else name

    def _take(self, pending: Sequence[Generation]) -> list[Generation]:
        """The oldest job and those after it that fit one batch: the same mix group, at most
        `max_batch` rows and `max_batch_tokens` padded tokens, and a bounded echo prefill."""
        if not pending:
            return []
        group, width = self._group(pending[0]), 0
        batch: list[Generation] = []
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

    def _run(self, jobs: list[Generation]) -> None:
        self.batches += 1
        self.rows += len(jobs)
        for job in self.decoder.run(jobs, abort=lambda: self._closed):
            emit(job, Failed(503, "the server is shutting down"))


"""Batched greedy generation with transformers (+ peft adapters), the default backend.

Prompts are sorted by length so each left-padded batch wastes little compute; results come
back in the caller's order.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from evalkit.config.suite import GenerationConfig
from evalkit.types import Case, Output


def render_prompt(tokenizer, case: Case) -> str:
    """The exact text sent to the model: the tokenizer's chat template for chats, raw otherwise."""
    if case.messages:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; give rows a 'prompt' instead of 'messages'")
        return tokenizer.apply_chat_template([dict(m) for m in case.messages], tokenize=False,
                                             add_generation_prompt=True)
    return case.prompt or ""


def special_tokens_for_text(tokenizer) -> bool:
    """Whether a prompt's text is tokenized with the tokenizer's special tokens (BOS). A chat
    template already writes them into the text, so a tokenizer that has one adds none."""
    return not getattr(tokenizer, "chat_template", None)


def _truncate_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def generate(model, tokenizer, prompts: Sequence[str], gen: GenerationConfig, *,
             adapter_names: Sequence[str] | None = None,
             on_batch: Callable[[list[int], list[Output]], None] | None = None,
             sampling: dict[str, Any] | None = None) -> list[Output]:
    """Greedy-decode every prompt; `on_batch(indices, outputs)` fires after each batch (for caching
    and progress) so an interrupted run keeps what finished. `sampling` (e.g. temperature, top_p)
    samples instead: only `evalkit serve` uses it, evaluation stays greedy."""
    import torch

    n = len(prompts)
    results: list[Output | None] = [None] * n
    if n == 0:
        return []
    special = special_tokens_for_text(tokenizer)
    lengths = [len(tokenizer(p, add_special_tokens=special)["input_ids"]) for p in prompts]
    order = sorted(range(n), key=lambda i: -lengths[i])  # longest first: memory peak shows up early
    device = next(model.parameters()).device
    eos_ids = tokenizer.eos_token_id
    for start in range(0, n, gen.batch_size):
        idx = order[start:start + gen.batch_size]
        batch = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                          add_special_tokens=special).to(device)
        kwargs: dict[str, Any] = dict(max_new_tokens=gen.max_new_tokens, do_sample=False,
                                      pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_ids)
        if sampling:
            kwargs.update(do_sample=True, **sampling)
        if adapter_names is not None:
            kwargs["adapter_names"] = [adapter_names[i] for i in idx]
        if gen.stop:
            kwargs.update(stop_strings=list(gen.stop), tokenizer=tokenizer)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**batch, **kwargs)
        elapsed = time.perf_counter() - t0
        new = out[:, batch["input_ids"].shape[1]:]
        batch_outputs = []
        for row, i in enumerate(idx):
            ids = new[row].tolist()
            n_out = len(ids)
            hit_eos = False
            for k, t in enumerate(ids):
                if t == tokenizer.pad_token_id or t == eos_ids:
                    n_out, hit_eos = k, True
                    break
            text = tokenizer.decode(ids[:n_out], skip_special_tokens=True)
            text, hit_stop = _truncate_at_stop(text, gen.stop)
            o = Output(text=text, prompt=prompts[i], n_prompt_tokens=lengths[i], n_output_tokens=n_out,
                       finish_reason="stop" if (hit_eos or hit_stop) else "length",
                       latency_s=elapsed / len(idx))
            results[i] = o
            batch_outputs.append(o)
        if on_batch is not None:
            on_batch(idx, batch_outputs)
    return results  # type: ignore[return-value]

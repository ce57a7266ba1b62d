"""How a row picks its next token: greedy, or sampled with the OpenAI/vLLM knobs (one job)."""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

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

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW  # dividing by a tinier one overflows to inf (NaN probabilities)

    def generator(self, device: Any) -> Any:
        """The row's random generator (None when greedy): seeded when asked, else fresh."""
        import torch

        if self.greedy:
            return None
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        return torch.Generator(device=device).manual_seed(seed % 2**63)


def pick(logits: Any, s: Sampling, produced: list[int], guide: Any, generator: Any) -> int:
    """The next token from one row's [vocab] logits (float32): penalties and biases, the grammar's
    mask, then argmax or a draw from what temperature, top-k, min-p and top-p leave."""
    import torch

    x = logits.clone()
    if s.logit_bias:
        ids, bias = zip(*s.logit_bias)
        x[list(ids)] += x.new_tensor(bias)
    if produced and not s.plain:
        seen = torch.tensor(produced, device=x.device)
        counts = torch.bincount(seen, minlength=x.shape[0]).to(x.dtype)
        if s.repetition_penalty != 1.0:  # as transformers: shrink the logits of tokens already produced
            hit = counts > 0
            x[hit] = torch.where(x[hit] > 0, x[hit] / s.repetition_penalty, x[hit] * s.repetition_penalty)
        x -= s.frequency_penalty * counts + s.presence_penalty * (counts > 0).to(x.dtype)
    if guide is not None:
        guide.mask(x)
    if s.greedy:
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
    return int(torch.multinomial(probs, 1, generator=generator).item())


def topk(lp: Any, k: int) -> list[tuple[tuple[int, float], ...]]:
    """The k likeliest tokens per row of a [n, vocab] logprob tensor."""
    if k <= 0:
        return [()] * lp.shape[0]
    values, ids = lp.topk(k, dim=-1)
    return [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]

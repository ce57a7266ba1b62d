"""The backend protocol: the one way a task, a check or the server reaches a model.

A backend serves the run's variants by name. Prompts arrive already rendered by evalkit (chat
template applied, token ids computed from the base's tokenizer), so every backend is sent the
same tokens and template parity stays checkable; a backend only runs them. What a backend can do
beyond generation and loglikelihood is in its `Capabilities`, and a check that needs more (full
logits) asks for it instead of reaching for a model object.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from evalkit.config.suite import GenerationConfig
from evalkit.record import BackendRecord
from evalkit.types import Case, Output


@dataclass(frozen=True)
class Prompt:
    """One rendered prompt: the text as sent (records, cache keys) and its token ids."""

    text: str
    ids: tuple[int, ...]


@dataclass(frozen=True)
class Capabilities:
    full_logits: bool  # logits over the whole vocabulary at every position (merge_equivalence)


# fixed probe prompts: what identifies a served model, and what the checks compare models on
PROBES = ("The capital of France is", "def fibonacci(n):", "Translate to German: good morning",
          "Q: What is 17 * 3?\nA:")


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


def encode(tokenizer, text: str) -> Prompt:
    """A rendered prompt and the token ids every backend is sent."""
    return Prompt(text, tuple(tokenizer(text, add_special_tokens=special_tokens_for_text(tokenizer))["input_ids"]))


def token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of texts already as sent (probes, rendered prompts): no special tokens added."""
    return [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


Job = tuple[str, int]  # (variant name, prompt index)
OnOutputs = Callable[[list[tuple[str, int, Output]]], None]  # finished jobs, as soon as they finish
TokenPair = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)
OnScores = Callable[[list[int], list[tuple[float, bool]]], None]  # request indices, (loglikelihood, greedy)


class Backend(Protocol):
    capabilities: Capabilities
    stats: dict[str, dict[str, Any]]  # per variant: what it cost the backend (peak memory, requests)

    def identity(self, variant: str) -> dict[str, Any]:
        """What answers under this variant's name, as far as the backend can tell: the content of
        its cache keys (never a URL alone)."""
        ...

    def record(self, variant: str) -> BackendRecord:
        """Where the variant ran, for results.json."""
        ...

    def generate(self, jobs: Sequence[Job], prompts: Sequence[Prompt], gen: GenerationConfig,
                 on_done: OnOutputs) -> None:
        """Greedy outputs for every (variant, prompt) job, handed to `on_done` as they finish, so
        an interrupted run keeps what finished."""
        ...

    def loglikelihood(self, variant: str, requests: Sequence[TokenPair], on_done: OnScores, *,
                      batch_size: int = 8) -> None:
        """log P(continuation | context) and whether the continuation is the greedy one, per
        request, handed to `on_done` as they finish."""
        ...

    @property
    def max_length(self) -> int:
        """The longest sequence (context + continuation) it scores; longer ones are left-truncated."""
        ...

    def close(self) -> None: ...

"""The backend protocol: the one way a task, a check or the server reaches a model.

A backend serves the run's variants by name. Prompts arrive already rendered by evalkit (chat
template applied, token ids computed from the base's tokenizer), so every backend is sent the
same tokens and template parity stays checkable; a backend only runs them. `Backend` is what
every backend does (generation, loglikelihood, what it is); what some backends do beyond it is a
capability protocol of its own, checked with `isinstance`: `InProcess` (the models in this
process: every logit, adapters off, variants added during the run) and `Served` (variants a
server serves under its own names: their parents, probe answers and prompt logprobs). A check
that needs more asks for the capability instead of reaching for a model object.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from evalkit.config.generation import GenerationConfig
from evalkit.config.variant import Variant
from evalkit.record.types import BackendRecord
from evalkit.types import Case, Output

if TYPE_CHECKING:
    from torch import Tensor

    from evalkit.models.adapters import AdapterInfo


@dataclass(frozen=True)
class Prompt:
    """One rendered prompt: the text as sent (records, cache keys) and its token ids."""

    text: str
    ids: tuple[int, ...]


# fixed probe prompts: what identifies a served model, and what the checks compare models on
PROBES = ("The capital of France is", "def fibonacci(n):", "Translate to German: good morning",
          "Q: What is 17 * 3?\nA:")


def render_prompt(tokenizer: Any, case: Case) -> str:
    """The exact text sent to the model: the tokenizer's chat template for chats, raw otherwise."""
    if case.messages:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; give rows a 'prompt' instead of 'messages'")
        text: str = tokenizer.apply_chat_template([dict(m) for m in case.messages], tokenize=False,
                                                  add_generation_prompt=True)
        return text
    return case.prompt or ""


def special_tokens_for_text(tokenizer: Any) -> bool:
    """Whether a prompt's text is tokenized with the tokenizer's special tokens (BOS). A chat
    template already writes them into the text, so a tokenizer that has one adds none."""
    return not getattr(tokenizer, "chat_template", None)


def encode(tokenizer: Any, text: str) -> Prompt:
    """A rendered prompt and the token ids every backend is sent."""
    return Prompt(text, tuple(tokenizer(text, add_special_tokens=special_tokens_for_text(tokenizer))["input_ids"]))


def token_ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of texts already as sent (probes, rendered prompts): no special tokens added."""
    return [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


Job = tuple[str, int]  # (variant name, prompt index)
OnOutputs = Callable[[list[tuple[str, int, Output]]], None]  # finished jobs, as soon as they finish
TokenPair = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)
OnScores = Callable[[list[int], list[tuple[float, bool]]], None]  # request indices, (loglikelihood, greedy)
# per prompt: each token's logprob given those before it (from the second token on), and the top-1
# token at each of those positions as a server renders it (the token decoded alone)
PromptScores = tuple[list[float], list[str]]


class Backend(Protocol):
    """What every backend does. A capability beyond it is its own protocol (`InProcess`, `Served`)."""

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


# The capabilities hold methods and plain attributes only: `isinstance` on a runtime-checkable
# protocol reads every member, and on Python 3.11 that runs a property (`max_length` may load a config).

@runtime_checkable
class InProcess(Protocol):
    """A backend that runs the models in this process (`hf`): full logits at every position (drift,
    adapter_active, merge_equivalence), the weights an adapter sits on (`adapters_off`), and
    variants declared during the run: a served variant's in-process reference (backend_parity), a
    merged variant's unmerged twin (merge_equivalence)."""

    @property
    def slots(self) -> Mapping[str, object]:
        """The variants declared on it, by name."""
        ...

    def add(self, variant: Variant, info: AdapterInfo | None) -> None:
        """Declare a variant (loaded with the rest, or at once when the models are loaded)."""
        ...

    def add_twin(self, name: str) -> Variant:
        """An unmerged twin of merged variant `name`, declared under a name of its own (not scored)."""
        ...

    def device(self) -> str:
        """Where the models run; "none" when none was loaded."""
        ...

    def reference_of(self, variant: str) -> int:
        """Which model `logits(variant, adapters_off=True)` runs on: variants sharing it share a reference."""
        ...

    def logits(self, variant: str, prompts: Sequence[Sequence[int]], *, adapters_off: bool = False) -> list[Tensor]:
        """Full-sequence logits [len, vocab] per prompt; with `adapters_off`, of the weights the
        variant's adapter sits on."""
        ...

    def next_token_logprobs(self, variant: str, prompts: Sequence[Sequence[int]],
                            on_each: Callable[[int, Tensor], None], *, batch_size: int = 8,
                            adapters_off: bool = False) -> None:
        """Each prompt's next-token log-probabilities [len, vocab] at every position, handed to
        `on_each(index, logprobs)` a batch at a time."""
        ...

    def prompt_logprobs(self, variant: str, prompts: Sequence[Sequence[int]]) -> list[PromptScores]:
        """The prompts' own logprobs under a variant, as a server echoes them."""
        ...


class InProcessBackend(Backend, InProcess, Protocol):
    """A backend with the in-process capability: the run context's reference (`RunContext.hf`)."""


@runtime_checkable
class Served(Protocol):
    """A backend whose variants a server serves under its own names (`openai`, `vllm`): what each
    is served as, the model an adapter is served on, the probe answers that identify it, and the
    prompt logprobs of any served name (adapter_active, backend_parity)."""

    @property
    def served(self) -> Mapping[str, str]:
        """Variant name -> the model name the server lists it under."""
        ...

    def parent(self, variant: str) -> str | None:
        """The served name of the model a variant's adapter sits on; None for a base."""
        ...

    def probe_texts(self, variant: str) -> list[str]:
        """The greedy continuations of `PROBES` under the variant, as identifying it got them."""
        ...

    def prompt_logprobs(self, name: str, prompts: Sequence[Sequence[int]]) -> list[PromptScores]:
        """The prompts' own logprobs under a served name (a variant's, or a parent's)."""
        ...


def truncate_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """The text up to the first stop string, and whether one was there: the one stop rule of the
    decoder and of every served backend's outputs."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)

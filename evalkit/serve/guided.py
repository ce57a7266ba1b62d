"""Structured output: a JSON Schema (or "any JSON object") compiled to a grammar by llguidance,
the constrained-decoding library vLLM and SGLang also use, and applied token by token.

A `Guide` masks each step's logits to the tokens the grammar allows and follows the tokens picked;
the output is valid JSON for the schema unless max_tokens cuts it short (finish_reason "length").
"""
from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

# Compact JSON: flexible whitespace lets a small model wander through newlines and indentation
# until max_tokens; OpenAI's structured outputs are compact too.
_OPTIONS: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """The schema cannot be enforced (invalid, or uses what the grammar compiler lacks)."""


class Grammars:
    """Compiles schemas for one tokenizer (the tokenizer's token table is built once, lazily)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: list[int]):
        self._hf, self._vocab, self._eos = tokenizer, vocab_size, eos_ids

    @functools.cached_property
    def _tokenizer(self) -> Any:
        import llguidance.hf

        return llguidance.hf.from_tokenizer(self._hf, n_vocab=self._vocab, eos_token=self._eos)

    def compile(self, schema: Mapping[str, Any] | None) -> str:
        """The grammar of a JSON Schema; None: any JSON object (response_format json_object)."""
        from llguidance import LLMatcher

        try:
            grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema or {"type": "object"}), overrides=_OPTIONS)
        except (ValueError, TypeError) as e:
            raise GrammarError(str(e)) from None
        error = LLMatcher.validate_grammar(grammar, self._tokenizer)
        if error:
            raise GrammarError(error)
        return grammar

    def guide(self, grammar: str) -> Guide:
        return Guide(grammar, self._tokenizer)


class Guide:
    """One sequence's position in a grammar."""

    def __init__(self, grammar: str, tokenizer: Any):
        import llguidance
        import llguidance.torch

        self._matcher = llguidance.LLMatcher(tokenizer, grammar)
        self._bitmask = llguidance.torch.allocate_token_bitmask(1, tokenizer.vocab_size)

    @property
    def finished(self) -> bool:
        """The grammar is complete (or broken): nothing but EOS may follow."""
        return bool(self._matcher.is_stopped())

    def mask(self, logits: Any) -> None:
        """Set the logits of the tokens the grammar forbids to -inf, in place (one row)."""
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        llguidance.torch.apply_token_bitmask_inplace(logits, self._bitmask.to(logits.device))

    def consume(self, token: int) -> None:
        self._matcher.consume_token(token)  # a refused token leaves the matcher stopped: `finished`

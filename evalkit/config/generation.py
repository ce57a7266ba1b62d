"""How a cases task generates: what a backend's `generate` is given, and what of it a cache key holds."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The decode rules' version (evalkit.backends.decoder: end-of-sequence set, stops, padding). It is in
# every generation cache key and in the settings of each generating task, so outputs of another
# decoder are never reused, and a promoted baseline decoded otherwise never pairs silently.
# Bump it when a rule changes what greedy decoding returns.
DECODER = "evalkit-decoder/2"  # 1: HF generate, stopping on the tokenizer's EOS and pad only


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    batch_size: int = 8

    def key(self) -> dict[str, Any]:
        # batch_size does not change greedy outputs (a test compares batch 1 with batch N), so
        # it stays out of cache keys
        return {"max_new_tokens": self.max_new_tokens, "stop": list(self.stop), "greedy": True, "decoder": DECODER}

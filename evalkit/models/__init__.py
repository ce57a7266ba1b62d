"""Loading a base model (hub id, local dir, GGUF, `pkg:` resource), adapters, quantization, merging."""
from evalkit.models.base import BaseSpec, ResolvedBase, load_base, load_tokenizer, resolve_base

__all__ = ["BaseSpec", "ResolvedBase", "load_base", "load_tokenizer", "resolve_base"]

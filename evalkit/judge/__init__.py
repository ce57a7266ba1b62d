"""LLM-as-judge over any OpenAI-compatible endpoint: `client` does the I/O (retries, concurrency,
cache, preflight), `verdicts` holds the pure logic (prompts, schemas, parsing, noise statistics)."""
from evalkit.judge.client import JudgeClient, preflight
from evalkit.judge.verdicts import Verdict, VerdictError

__all__ = ["JudgeClient", "Verdict", "VerdictError", "preflight"]

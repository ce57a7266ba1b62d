"""The text of the two files `evalkit init` writes: a commented suite.yml and recipe.yml, from a `Plan`.

Each file says why it holds what it holds (the answers' kind behind the scorers, the longest answer
behind `max_new_tokens`, a first CPU run behind `max_steps`), with paths relative to the file and an
editor's `$schema` line when the schema can be reached from it.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from evalkit.init.data import SEED, Answers, held_out_rows
from evalkit.models.base import BaseSpec

BATCH_SIZE, EPOCHS = 4, 2  # the recipe's training shape (the demo's)


def _yaml_str(text: str) -> str:
    """A YAML scalar for a path or name: plain when safe, else JSON-quoted (valid YAML)."""
    return text if re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_./-]*", text) else json.dumps(text, ensure_ascii=False)


def flow(value: Any) -> str:
    """A scorer entry or mapping in YAML flow style: {exact_match: {ignore_case: true}}."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    return _yaml_str(str(value))


def path_from(start: Path, target: Path, max_up: int = 3) -> str | None:
    """target relative to start when it climbs at most max_up folders, else None."""
    rel = Path(os.path.relpath(target.resolve(), start.resolve()))
    return None if rel.parts[:max_up + 1].count("..") > max_up else rel.as_posix()


def base_yaml(spec: BaseSpec, folder: Path) -> str:
    ref = spec.ref
    if spec.kind in ("gguf", "path") and not ref.startswith("pkg:"):
        ref = path_from(folder, Path(ref)) or ref  # relative to the file, which is how it is read
    return f"{{{spec.kind}: {json.dumps(ref, ensure_ascii=False)}}}"


def schema_line(schema: Path, folder: Path) -> str:
    """An editor's `$schema` line for the installed evalkit's schema, when the folder and the schema share a
    project (a checkout, or a virtual environment inside it): a short relative path that moves with both."""
    if not schema.is_file():
        return ""
    common = Path(os.path.commonpath([schema.resolve(), folder.resolve()]))
    rel = path_from(folder, schema) if common not in (Path(common.anchor), Path.home()) else None
    return f"# yaml-language-server: $schema={rel}\n" if rel else ""


def tokens_text(n: int) -> str:
    return f"{n} token{'s' * (n != 1)}"



@dataclass(frozen=True)
class Plan:
    """Everything the two files say."""

    name: str
    command: str
    base: str  # its YAML
    base_ref: str
    train: str  # paths as written, relative to the folder
    test: str
    n_train: int
    n_test: int
    shape: str
    answers: Answers
    template: Literal["auto", "chat", "none"]
    longest_answer: int
    max_new_tokens: int
    max_length: int
    eval_fraction: float
    full_steps: int
    max_steps: int | None
    learning_rate: str


def suite_text(p: Plan, schema: str) -> str:
    a, t = p.answers, p.name
    lines = [schema + f"# Written by `{p.command}`: a starter suite, yours to edit. It scores the base and an adapter",
             "# trained by recipe.yml on the test rows, compares them case by case, and gates the adapter.",
             "#   evalkit validate suite.yml   checks this file and every file it names; runs nothing",
             "#   evalkit run suite.yml        trains the adapter (when missing or stale), scores, gates",
             "# Paths are relative to this file.",
             f"name: {t}",
             f"base: {p.base}   # or {{path: ./model}}, {{gguf: file.gguf}}, {{id: org/name}}",
             "variants:",
             "  - {name: base}",
             "  - {name: lora, train: recipe.yml}   # trained when missing or stale",
             "tasks:",
             f"  - name: {t}",
             f"    data: {_yaml_str(p.test)}   # {p.n_test} rows: {p.shape}; never trained on"]
    lines += [f"    {c}" for c in _template_comment(p.template)]
    lines += [f"    # {c}" for c in _scorer_comment(a)]
    lines += [f"    scorers: [{', '.join(flow(s) for s in a.scorers())}]",
              f"    max_new_tokens: {p.max_new_tokens}   # the longest answer is {tokens_text(p.longest_answer)}, with a "
              "margin: a longer output is cut",
              "gates:",
              f"  # the adapter must score at least what the base scores on {a.main_metric}, paired case by case. A point",
              f"  # estimate: {p.n_test} cases can show only large drops; on a larger test set add `confidence: 0.95`",
              "  # with a margin (max_drop: 5) for a non-inferiority test at 95%",
              f"  - {{metric: {t}.{a.main_metric}, max_drop: 0, vs: base}}"]
    if a.kind == "json":
        lines += ["  # nearly every output must parse as JSON (an adapter that learned the format keeps it)",
                  f"  - {{metric: {t}.json_valid, min: 0.9}}"]
    lines += ["  # your own bar, once you know what good looks like:",
              f"  # - {{metric: {t}.{a.main_metric}, min: 0.8}}",
              "  # quiet failures, read from the adapter's training log: eval loss that turned up while train loss",
              "  # fell (overfitting), a NaN loss, a loss that barely fell (it learned little), a warmup that never ended",
              "  - {check: training_health}",
              "  # training prompts whose token lengths differ much from the test's (KS test and quantile shift)",
              "  - {check: length_match}",
              "  # on by default: stops_generating (outputs cut at max_new_tokens where the base stopped) and",
              "  # no_leakage (test cases that are also in the training data)"]
    return "\n".join(lines) + "\n"


def _template_comment(template: str) -> list[str]:
    if template == "chat":
        return ["# `prompt` rows and a base with a chat template: each prompt goes as one user turn through",
                "# that template, as an instruct model expects (recipe.yml trains the same way). `none` would",
                "# send the text raw, as a completion model expects",
                "template: chat"]
    if template == "none":
        return ["# the base has no chat template: `prompt` text goes raw, as a completion model expects",
                "template: none"]
    return []


def _scorer_comment(a: Answers) -> list[str]:
    shown = ", ".join(json.dumps(d, ensure_ascii=False) for d in a.distinct[:6]) + (", ..." if len(a.distinct) > 6 else "")
    norm = [w for k, w in (("ignore_case", "case"), ("remove_punctuation", "punctuation")) if getattr(a, k)]
    how = f" ignoring {' and '.join(norm)}" if norm else ""
    if a.kind == "json":
        return [f"JSON answers{' (given as text)' if a.json_text else ''}: exact match compares parsed JSON values",
                "(key order and spacing do not matter); json_valid: the share of outputs that parse"]
    if a.kind == "labels":
        return [f"short labels ({len(a.distinct)}: {shown}): exact match{how}",
                '(whitespace is normalized), so "Positive." counts as "positive"' if norm else "(whitespace is normalized)"]
    if a.kind == "short":
        return [f"short answers ({len(a.distinct)} distinct, e.g. {shown}): exact match{how}",
                "(whitespace normalized); f1: token overlap, for partial credit"]
    return ["free text: rouge_l (longest common subsequence of words) and f1 (token overlap), both in [0, 1];",
            "exact match would be near 0 for any model"]


def recipe_text(p: Plan, schema: str) -> str:
    held = held_out_rows(p.n_train, p.eval_fraction)
    lines = [schema + f"# LoRA on {p.base_ref}, trained on {p.train} (written by `{p.command}`).",
             "#   evalkit train recipe.yml   (`evalkit run suite.yml` trains it too, when missing or stale)",
             "# Relative paths resolve against this file's folder. The demo's defaults (trainers/recipes/lora.yml).",
             "name: lora",
             "method: lora                 # lora | qlora | dora",
             f"base: {p.base}   # the suite's base",
             "data:",
             f"  train: {_yaml_str(p.train)}   # {p.n_train} rows: {p.shape}"]
    if p.template == "chat":
        lines += ["  template: chat             # each prompt as one user turn of the chat template, as the suite sends it"]
    elif p.template == "none":
        lines += ["  template: none             # raw text: the base has no chat template"]
    if p.eval_fraction:
        lines += [f"  eval_fraction: {p.eval_fraction:g}          # held out of the train file ({held} rows): the eval loss "
                  "training_health reads"]
    else:
        lines += [f"  eval_fraction: 0             # {p.n_train} rows are too few to hold some out: training_health reads "
                  "the train loss only"]
    lines += [f"  check_against: [{_yaml_str(p.test)}]   # leakage report before training",
              "output: runs/adapter",
              f"seed: {SEED}",
              "lora:",
              "  r: 16",
              "  alpha: 32",
              "  dropout: 0.05",
              "  target_modules: all-linear",
              "training:",
              f"  learning_rate: {p.learning_rate}" + ("        # high for LoRA, for a short run; 2.0e-4 for hundreds of "
                                                    "steps" if p.learning_rate != "2.0e-4" else ""),
              "  lr_scheduler: cosine",
              "  warmup_ratio: 0.03",
              f"  epochs: {EPOCHS}"]
    if p.max_steps is not None:
        lines += [f"  # a first run on CPU: {p.max_steps} of the {p.full_steps} steps of {EPOCHS} epochs. Remove the cap "
                  "(or set null) to train",
                  "  # fully; on a GPU, also batch_size: 8",
                  f"  max_steps: {p.max_steps}"]
    else:
        lines += [f"  # {EPOCHS} epochs of {p.n_train - held} rows in batches of {BATCH_SIZE}: {p.full_steps} steps"]
    lines += [f"  batch_size: {BATCH_SIZE}",
              f"  max_length: {p.max_length}             # tokens per row (prompt and answer); longer rows are cut",
              "  completion_only_loss: true   # learn the answers, not the prompts",
              "  # logging_steps and eval_steps scale with the steps: enough points for training_health"]
    return "\n".join(lines) + "\n"


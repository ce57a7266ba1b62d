"""The suite: variants, tasks, gates and a promoted baseline, checked against each other (names that
exist, thresholds on their metric's scale, gates that apply to some variant), and where each part is
written. `evalkit.config.loader.load_suite` reads the YAML and validates it here.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Discriminator, Field, PrivateAttr, Tag, WithJsonSchema, model_validator

from evalkit.config.canary import DriftTask, LmEvalTask, MmluTask
from evalkit.config.gate import Gate
from evalkit.config.located import NAME
from evalkit.config.task import CasesTask, GenerateTask, JudgeTask, Task
from evalkit.config.variant import BackendConfig, Variant
from evalkit.errors import ConfigError, ModelError, YamlPath, did_you_mean, fmt_path, line_of, located
from evalkit.models.base import BaseSpec
from evalkit.shape import Shape, invalid, resolved

# ---------------------------------------------------------------- the task kinds

def _task_kind(value: Any) -> str | None:
    if isinstance(value, Mapping):
        kind = value.get("kind", "generate")
        return kind if isinstance(kind, str) else None
    return getattr(value, "kind", None)


AnyTask = Annotated[Annotated[GenerateTask, Tag("generate")] | Annotated[MmluTask, Tag("mmlu")]
                    | Annotated[LmEvalTask, Tag("lm_eval")] | Annotated[DriftTask, Tag("drift")]
                    | Annotated[JudgeTask, Tag("judge")], Discriminator(_task_kind)]


# ---------------------------------------------------------------- the promoted baseline

def _store_only(value: Any) -> Any:
    return {"store": value} if isinstance(value, str | Path) else value


class BaselineConfig(Shape):
    """A baseline store's promoted variant (`evalkit promote`), joining the run read-only: its
    scores come from the bundle, paired per case with the live variants'."""

    store: Annotated[Path, resolved] = Field(
        description="the store folder `evalkit promote` writes (relative to the suite file); read when the run starts")
    name: str = Field("promoted", pattern=NAME, description="its variant name in this run (what `vs:` names)")
    bundle: str | None = Field(None, description="the bundle to compare with (default: the latest promotion)")


BaselineEntry = Annotated[BaselineConfig, BeforeValidator(_store_only), WithJsonSchema(
    {"oneOf": [{"type": "string"}, BaselineConfig.model_json_schema()],
     "description": "a baseline store folder, or {store, name, bundle}"})]


# ---------------------------------------------------------------- the suite

class Suite(Shape):
    name: str = Field(pattern=NAME)
    description: str | None = None
    base: BaseSpec
    reference: str | None = Field(None, description="variant every comparison is made against (default: base, "
                                                    "else the first variant)")
    seed: int = 0
    backend: BackendConfig = Field(default_factory=BackendConfig, description="where variants run (default: hf, "
                                                                             "in this process)")
    variants: tuple[Variant, ...] = Field(min_length=1, strict=False)
    tasks: tuple[AnyTask, ...] = Field(strict=False)
    gates: tuple[Gate, ...] = Field((), strict=False)
    baseline: BaselineEntry | None = Field(None, description="compare with a promoted variant (`evalkit promote`)")
    baseline_mismatch: Literal["refuse", "intersect"] = Field(
        "refuse", description="when cases, prompts, settings differ from the baseline bundle's: refuse (exit 4, "
                              "listing what differs) or intersect (pair the cases both have, counts in every gate)")

    _path: Path = PrivateAttr(Path("suite.yml"))
    _lines: Mapping[YamlPath, int] = PrivateAttr(default_factory=dict)
    _raw: Mapping[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _references(self) -> Suite:
        names = [v.name for v in self.variants]
        for i, v in enumerate(self.variants):
            v._index = i  # kept by the variants a sweep or checkpoints make of it (`variant_path`)
        for i, n in enumerate(names):
            if names.index(n) != i:
                raise invalid(f"duplicate variant name '{n}'", at=("variants", i, "name"))
        for i, v in enumerate(self.variants):
            flag = "quantize" if v.quantize else "merge" if v.merge else None
            if flag and not self.backend_of(v).in_process:
                raise invalid(f"`{flag}` runs in this process: give variant '{v.name}' `backend: {{kind: hf}}`",
                              at=("variants", i, flag), hint="or, under `kind: vllm`, `fallback: hf`")
        reference = self.reference or ("base" if "base" in names else names[0])
        if reference not in names:
            raise invalid(f"unknown variant '{reference}'{did_you_mean(reference, names)}", at=("reference",))
        if self.baseline is not None and self.baseline.name in names:
            raise invalid(f"the baseline's name '{self.baseline.name}' is a variant's: give it another",
                          at=("baseline",), hint="baseline: {store: DIR, name: production}")
        tasks = {t.name: t for t in self.tasks}
        for i, t in enumerate(self.tasks):
            t._index = i
            if list(tasks).index(t.name) != i:
                raise invalid(f"duplicate task name '{t.name}'", at=("tasks", i, "name"))
            if isinstance(t, JudgeTask | DriftTask) and t.vs is not None and t.vs not in names:
                raise invalid(f"unknown variant '{t.vs}'{did_you_mean(t.vs, names)}", at=("tasks", i, "vs"))
        gated = [*names, self.baseline.name] if self.baseline else names  # gates may name the baseline
        gates = [self._gate(i, g, tasks, gated, reference) for i, g in enumerate(self.gates)]
        self._sweeps(reference, tasks, gates)
        for g in gates:
            self._gates_something(g, names)
        bases = {v.is_base for v in self.variants}
        if any(isinstance(t, CasesTask) for t in self.tasks) and False in bases:
            # on by default: a runaway adapter and a test set it was trained on both score quietly
            if not any(g.check == "stops_generating" for g in gates) and True in bases:
                gates.append(Gate.implicit("stops_generating"))
            if not any(g.check == "no_leakage" for g in gates):
                gates.append(Gate.implicit("no_leakage"))
        object.__setattr__(self, "reference", reference)
        object.__setattr__(self, "gates", _unique_ids(gates))
        return self

    def _sweeps(self, reference: str, tasks: Mapping[str, Task], gates: list[Gate]) -> None:
        """A search's objective is a metric the suite scores; a swept variant becomes its trials
        (`lora[r=16]`), named when the sweep runs: nothing can be compared against it, nor gate it
        by name."""
        swept = {v.name for v in self.variants if v.sweep}
        for v in self.variants:
            objective = v.sweep.objective if v.sweep else None
            if objective is not None:
                self._objective(objective.metric, tasks, ("variants", v._index, "sweep", "objective"))
        named: list[tuple[str | None, YamlPath]] = [(reference, ("reference",))]
        named += [(getattr(t, "vs", None), ("tasks", t._index, "vs")) for t in tasks.values()]
        named += [(getattr(g, key), ("gates", g._index, key)) for g in gates for key in ("variant", "vs")
                  if g._index is not None]
        for name, at in named:
            if name in swept:
                raise invalid(f"variant '{name}' is a sweep: it becomes one variant per trial, so it cannot be named "
                              "here", at=at, hint="gates without `variant:` apply to every trial; compare against "
                                                  "the base or a hand-written variant")

    @staticmethod
    def _objective(metric: str, tasks: Mapping[str, Task], at: YamlPath) -> None:
        """A search's objective is scored on each trial as it is trained: a metric of a task that
        generates and scores the suite's own cases."""
        tname, _, name = metric.partition(".")
        task = tasks.get(tname)
        if not isinstance(task, CasesTask):
            scored = [t for t, task in tasks.items() if isinstance(task, CasesTask)]
            raise invalid(f"objective {metric}: no task '{tname}' that generates and scores cases"
                          f"{did_you_mean(tname, scored)}", at=at)
        if name not in task.metrics:
            raise invalid(f"task '{tname}' has no metric '{name}'{did_you_mean(name, task.metrics)}", at=at)

    def _gates_something(self, g: Gate, names: list[str]) -> None:
        """A gate that applies to no variant would check nothing and read as a pass in CI."""
        if gate_targets(g, self):
            return
        if g.check in CHECK_APPLIES:
            covers = CHECK_COVERS[g.check]
        else:
            covers = "every variant with an adapter (`adapter:` or `train:`)"
            covers += f" other than '{g.vs}'" if g.vs else ""
        others = [n for n in names if n != g.vs]
        hint = (f"name the variant to gate, e.g. `variant: {others[-1]}` (variants: {', '.join(names)})"
                if others and g.check not in CHECK_APPLIES else f"variants: {', '.join(names)}")
        raise invalid(f"this gate applies to no variant: it covers {covers}, and the suite has none",
                      at=("gates", g._index), hint=hint)

    @staticmethod
    def _on_scale(g: Gate, where: YamlPath, span: tuple[float, float | None]) -> None:
        """A threshold outside its metric's range can never pass (or never fail): `min: 80` meant 0.8."""
        lo, hi = span
        for key in ("min", "max"):
            value = getattr(g, key)
            if value is None or (lo <= value and (hi is None or value <= hi)):
                continue
            percent = hi == 1 and 1 < value <= 100
            raise invalid(f"{key}: {value:g} is outside [{lo:g}, {'inf' if hi is None else f'{hi:g}'}], the range of "
                          f"{g.metric}" + (" (metrics are fractions, not percentages)" if percent else ""),
                          at=(*where, key), hint=f"did you mean {key}: {value / 100:g}?" if percent else None)
        if g.max_drop is not None and hi == 1 and g.max_drop > 100:
            raise invalid(f"max_drop: {g.max_drop:g} points is more than {g.metric} can drop (100 points)",
                          at=(*where, "max_drop"), hint="max_drop is in percentage points: 2 means 0.02")

    @staticmethod
    def _gate(i: int, g: Gate, tasks: Mapping[str, Task], variants: list[str], reference: str) -> Gate:
        where = ("gates", i)
        for key in ("variant", "vs"):
            value = getattr(g, key)
            if value is not None and value not in variants:
                raise invalid(f"unknown variant '{value}'{did_you_mean(value, variants)}", at=(*where, key),
                              hint="a promoted baseline joins the run with `baseline: STORE` (or "
                                   "`evalkit run --baseline STORE`)" if value == "promoted" else None)
        if g.metric is not None:
            tname, _, metric = g.metric.partition(".")
            if tname not in tasks:
                raise invalid(f"unknown task '{tname}'{did_you_mean(tname, tasks)}", at=(*where, "metric"))
            known = tasks[tname].metrics
            if metric not in known and not tasks[tname].open_metrics:
                raise invalid(f"task '{tname}' has no metric '{metric}'{did_you_mean(metric, known)}",
                              at=(*where, "metric"))
            span = tasks[tname].metric_range(metric)
            if span is not None:
                Suite._on_scale(g, where, span)
            if span is not None and span[1] is None and g.confidence is not None:
                # bench/bench_verdicts.py: on lognormal values the bootstrap-t bound of `max:` at 95%
                # passes up to 18% of the time at the threshold; without an upper bound on the
                # values no bound on their mean can promise its level (Bahadur & Savage, 1956)
                raise invalid(f"`confidence:` cannot hold its level on {g.metric}: its per-case values are "
                              "unbounded and heavy-tailed", at=(*where, "confidence"),
                              hint=f"drop `confidence:` to gate the mean of {g.metric} as a point estimate "
                                   "(top1_agreement, bounded, takes a confidence)")
        if g.max_drop is not None:
            if (g.vs or reference) == g.variant:
                raise invalid("a max_drop gate compares a variant with another one (`vs:`)", at=where)
            if g.vs is None:
                g = g.model_copy(update={"vs": reference})
        g._index = i
        return g

    # -- where it came from (set by the loader)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def dir(self) -> Path:
        return self._path.parent

    @property
    def lines(self) -> Mapping[YamlPath, int]:
        return self._lines

    @property
    def raw(self) -> Mapping[str, Any]:
        """The YAML as loaded, for the run record."""
        return self._raw

    def error(self, path: YamlPath, message: str, hint: str | None = None) -> ConfigError:
        """A located error about part of this suite found after loading (an adapter for another
        base, an unreachable judge): `FILE:LINE PATH: message`, like the loader's own."""
        return located(message, self.path, self.lines, path, hint)

    @contextlib.contextmanager
    def locating(self, path: YamlPath) -> Iterator[None]:
        """Errors raised while acting on one part of the suite (its recipe, a task's data, its base)
        name that part's FILE:LINE PATH; one that names its own file (a data row, a recipe key) keeps
        it, with the suite's line that led there as its hint."""
        try:
            yield
        except ConfigError as e:
            if e.file is None:
                raise ConfigError(e.message, file=self.path, line=line_of(self.lines, path),
                                  path=e.path or fmt_path(path), hint=e.hint) from None
            if Path(e.file).resolve() != self.path and not e.hint:
                e.hint = f"from {self.path.name}:{line_of(self.lines, path)} {fmt_path(path)}"
                e.args = (e.format(),)
            raise
        except ModelError as e:
            raise self.error(path, str(e)) from None

    def variant_path(self, name: str) -> YamlPath:
        """Where a variant is written: a sweep's trial and a checkpoint at their variant's entry."""
        v = self.variant(name)
        return ("variants", v._index, "train" if v.train else "adapter")

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    def backend_of(self, v: Variant) -> BackendConfig:
        return v.backend or self.backend

    def backend_path(self, v: Variant) -> YamlPath:
        """Where the backend a variant runs on is written: its own `backend:`, else the suite's."""
        return ("variants", self.variants.index(v), "backend") if v.backend else ("backend",)


# The variants a check without `variant:` covers: merge_equivalence compares merged variants with
# their unmerged twins; backend_parity every variant a server serves, base included (a server can
# serve the wrong base); the others look at every adapter (one the check could not run for fails).
CHECK_APPLIES: dict[str, Callable[[Suite, Variant], bool]] = {
    "merge_equivalence": lambda suite, v: v.merge,
    "backend_parity": lambda suite, v: suite.backend_of(v).kind != "hf",
}
CHECK_COVERS = {"merge_equivalence": "merged variants (`merge: true`)",
                "backend_parity": "variants served by a server (`backend:` kind openai or vllm)"}


def gate_targets(gate: Gate, suite: Suite) -> list[str]:
    """`variant:` when given, else every non-base variant (never the one compared against) that
    the gate's check, if any, applies to."""
    if gate.variant:
        return [gate.variant]
    applies = CHECK_APPLIES.get(gate.check or "", lambda suite, v: not v.is_base)
    return [v.name for v in suite.variants if v.name != gate.vs and applies(suite, v)]


def _unique_ids(gates: list[Gate]) -> tuple[Gate, ...]:
    """Gate ids (with the variant) name JUnit cases and pytest items, so two gates whose ids would
    meet on a variant must differ: the later one gets `#2`, `#3`."""
    taken: dict[str, list[str | None]] = {}  # id -> the `variant:` of each gate using it (None: all)
    for g in gates:
        users = taken.setdefault(g.label, [])
        clash = any(v is None or g.variant is None or v == g.variant for v in users)
        users.append(g.variant)
        g._id = f"{g.label}#{len(users)}" if clash else None
    return tuple(gates)

"""A variant's `sweep:` (many trainings of one recipe) and `checkpoints:` (adapters kept along one).

    sweep:
      lora.r: [2, 16]                                     # a grid: every combination of the lists
      lora.target_modules: [[q_proj, v_proj], all-linear]
      training.learning_rate: [6.0e-4, 2.0e-3]
      parallel: 2                                         # trials trained at once on this machine

A key is a recipe field by its dotted path; a list gives its values. With `trials: N` the sweep
is a search instead (optuna's `random` or `tpe` sampler): a list is a set of choices, and a range
`{low, high, log}` is sampled. Whether a key is a recipe field is checked against the recipe
(`evalkit.preflight`): this layer does not know recipes. Each trial is named by what it changes,
`lora[r=16,lr=1e-3]`, and trained into its own folder beside the recipe's output.
"""
from __future__ import annotations

import difflib
import hashlib
import math
import re
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, model_validator

from evalkit.errors import did_you_mean
from evalkit.shape import Shape, invalid, shown

GridValue = bool | int | float | str | tuple[str, ...] | None
FIELD_PATH = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"  # lora.r, training.learning_rate


class Range(Shape):
    """A searched number: `{low, high}`, `log: true` for a log scale, `step` for a grid of them.
    Integers when low and high are (a rank), floats otherwise (a learning rate)."""

    low: int | float
    high: int | float
    log: bool = False
    step: int | float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise invalid(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise invalid("a log scale needs low above 0", at=("low",))
        if self.log and self.step is not None:
            raise invalid("give `log` or `step`, not both (optuna samples one or the other)")
        return self

    @property
    def integer(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int) and not isinstance(self.step, float)


Dimension = tuple[GridValue, ...] | Range  # the values of a grid key, or a searched range


class Objective(Shape):
    """What an adaptive sampler (tpe) learns from: a task metric of each trial, as evaluated."""

    metric: str = Field(pattern=r"^[^.]+\.[^.]+$", description="task.metric, e.g. extract.exact_match")
    direction: Literal["maximize", "minimize"] = "maximize"


class Sweep(Shape):
    """Trials of one recipe: a grid (lists) or, with `trials:`, an optuna search."""

    params: Mapping[str, Dimension] = Field(default_factory=dict, description="recipe field path -> values "
                                                                              "(written as keys of `sweep:`)")
    trials: int | None = Field(None, ge=1, description="a search of N trials instead of the grid")
    sampler: Literal["random", "tpe"] | None = Field(None, description="a search's optuna sampler (default: tpe "
                                                                       "with an objective, else random)")
    objective: Objective | None = Field(None, description="the metric an adaptive sampler learns from (default: "
                                                          "each trial's final held-out loss, minimized)")
    seed: int | None = Field(None, description="the sampler's seed (default: the suite's)")
    max_trials: int = Field(64, ge=1, description="a grid larger than this is refused: say so to train it")
    parallel: int = Field(1, ge=1, le=256, description="trials trained at once on this machine, each by a worker "
                                                       "process (one GPU each where there are GPUs)")
    storage: str | None = Field(None, min_length=1, description="optuna storage URL the workers share (default: a "
                                                                "SQLite file beside the trials), e.g. "
                                                                "postgresql://host/db for workers on several machines")
    heartbeat: int = Field(30, ge=1, description="seconds between a worker's heartbeats; a trial silent for "
                                                 "twice this (its worker died) is given to another worker")

    model_config = ConfigDict(**Shape.model_config, json_schema_extra=lambda schema, cls: _keys_are_fields(schema))
    RESERVED: ClassVar[tuple[str, ...]] = ("trials", "sampler", "objective", "seed", "max_trials", "parallel", "storage", "heartbeat")

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        """Keys of its own stay; every other key is a recipe field path (checked against the recipe later)."""
        if not isinstance(data, Mapping):
            return data
        if "params" in data:
            raise invalid("write the swept fields as keys of `sweep:` (lora.r: [4, 16]), not under `params:`",
                          at=("params",))
        params = {k: v for k, v in data.items() if k not in cls.RESERVED}
        for key, value in params.items():
            if not isinstance(key, str) or not re.fullmatch(FIELD_PATH, key):
                raise invalid(f"{shown(key, 60)} is not a recipe field path (e.g. lora.r, training.learning_rate)"
                              f"{did_you_mean(str(key), cls.RESERVED)}", at=(key,))
            if not isinstance(value, list | Mapping):
                setting = difflib.get_close_matches(key, cls.RESERVED, n=1)
                raise invalid(f"a swept field takes a list of values (a grid) or a range {{low, high}}, got "
                              f"{shown(value, 60)}" + (f"; did you mean '{setting[0]}'?" if setting else ""), at=(key,))
            if isinstance(value, Mapping) and not set(value) <= set(Range.model_fields):
                inner = next(iter(value))
                raise invalid(f"a range takes {{low, high, log, step}}; a swept field is written by its whole path: "
                              f"`{key}.{inner}: [...]`, not nested under `{key}:`", at=(key,))
            if isinstance(value, list):
                if not value:
                    raise invalid("give at least one value", at=(key,))
                params[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        return {**{k: v for k, v in data.items() if k in cls.RESERVED}, "params": params}

    @model_validator(mode="after")
    def _consistent(self) -> Sweep:
        if not self.params:
            raise invalid("a sweep names at least one recipe field to vary, e.g. `lora.r: [4, 16]`")
        for key, dim in self.params.items():
            if isinstance(dim, Range) and self.trials is None:
                raise invalid("a range is searched: give `trials: N` (or a list of values for a grid)", at=(key,))
            if isinstance(dim, tuple):
                labels = [label(v) for v in dim]
                twice = sorted({x for x in labels if labels.count(x) > 1})
                if twice:
                    raise invalid(f"the same value twice: {', '.join(twice)}", at=(key,))
        if self.trials is None and (self.sampler or self.objective):
            raise invalid("`sampler` and `objective` belong to a search: give `trials: N`",
                          at=("sampler" if self.sampler else "objective",))
        if self.is_grid and self.size > self.max_trials:
            raise invalid(f"the grid has {self.size} trials ({' x '.join(str(len(v)) for v in self.grid.values())}), "
                          f"more than max_trials {self.max_trials}",
                          hint=f"set `max_trials: {self.size}` to train them all, or search with `trials: N`")
        return self

    @property
    def is_grid(self) -> bool:
        return self.trials is None

    @property
    def grid(self) -> dict[str, tuple[GridValue, ...]]:
        return {k: v for k, v in self.params.items() if isinstance(v, tuple)}

    @property
    def size(self) -> int:
        """Trials the sweep trains: the grid's combinations, or the search's `trials`."""
        return self.trials if self.trials is not None else math.prod(len(v) for v in self.grid.values())

    @property
    def sampler_name(self) -> Literal["grid", "random", "tpe"]:
        if self.is_grid:
            return "grid"
        return self.sampler or ("tpe" if self.objective else "random")


def _keys_are_fields(schema: dict[str, Any]) -> None:
    """In YAML the swept fields are keys of `sweep:` itself, beside its settings (`_known_keys`)."""
    params = schema["properties"].pop("params")
    schema["additionalProperties"] = {**params["additionalProperties"], "description": "a recipe field by its "
                                      "path (lora.r): a list of values (a grid), or a range {low, high} (a search)"}
    schema["propertyNames"] = {"pattern": f"^{FIELD_PATH}$"}


class Checkpoints(Shape):
    """Adapters kept along one training, each evaluated as a variant (`lora@step30`)."""

    every: int = Field(ge=1, description="optimizer steps between kept adapters (the final one is always kept)")


# ---------------------------------------------------------------- naming trials

SHORT = {"learning_rate": "lr", "target_modules": "modules", "batch_size": "batch", "grad_accum": "accum",
         "weight_decay": "wd", "max_steps": "steps", "lr_scheduler": "sched", "warmup_ratio": "warmup"}


def label(value: Any) -> str:
    """A value as a trial's name shows it: 1e-3, 16, q_proj+v_proj, all-linear."""
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else "null"
    if isinstance(value, float):
        if value != 0 and not 1e-2 <= abs(value) < 1e4:
            mantissa, exponent = f"{value:.2e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return f"{value:.3g}"
    if isinstance(value, tuple | list):
        return "+".join(label(v) for v in value)
    return str(value)


def short_names(keys: list[str]) -> dict[str, str]:
    """Each swept path's name in trial names: its last part (abbreviated), the whole path where two
    paths would share one."""
    short = {k: SHORT.get(k.rsplit(".", 1)[-1], k.rsplit(".", 1)[-1]) for k in keys}
    return {k: s if list(short.values()).count(s) == 1 else k for k, s in short.items()}


def trial_name(variant: str, params: Mapping[str, Any]) -> str:
    """`lora[r=16,lr=1e-3]`: the variant and what the trial changes, in the sweep's key order."""
    names = short_names(list(params))
    return f"{variant}[{','.join(f'{names[k]}={label(v)}' for k, v in params.items())}]"


def trial_folder(suffix: str) -> str:
    """A folder name for a trial from what its name adds to the variant's (`[r=16,lr=1e-3]`,
    `#3[r=8]`): `r=16,lr=1e-3`, `3-r=8`; any character a path should not hold replaced (with a
    short hash of the name then, so two trials never share a folder)."""
    inner = re.sub(r"^#(\d+)\[", r"\1-", suffix).removeprefix("[").removesuffix("]")
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", inner)[:120]
    if safe != inner:
        safe += "-" + hashlib.sha256(suffix.encode()).hexdigest()[:8]
    return safe


def checkpoint_name(variant: str, step: int) -> str:
    return f"{variant}@step{step}"

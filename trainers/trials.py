"""A sweep's trials as recipes: which recipe fields may be swept, a grid's combinations, and each
trial's recipe (the variant's recipe with the trial's values, trained into the trial's own folder).

Pure but for reading the recipe: the optuna study that hands trials to workers is trainers.sweep.
Errors are ConfigErrors without a file: the caller locates them at the suite's `sweep:` key.
"""
from __future__ import annotations

import itertools
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from evalkit.config.sweep import Sweep, trial_folder, trial_name
from evalkit.errors import ConfigError, did_you_mean
from trainers.recipe import Recipe, load_recipe

# evalkit names the trial and places its adapter; the base is the suite's
NOT_SWEPT = ("name", "output", "base")


@dataclass(frozen=True)
class Trial:
    """One configuration of a sweep: its variant name, the recipe values it sets, its adapter folder."""

    name: str
    params: Mapping[str, Any]  # recipe field path -> value (lists for module lists)
    folder: Path

    def recipe(self, recipe_file: Path, suite_dir: Path) -> Recipe:
        """The trial's recipe: the variant's, with the trial's values; a value the recipe refuses is
        reported with the trial's name."""
        overrides = {**self.params, "name": self.name, "output": str(self.folder)}
        try:
            return load_recipe(recipe_file, overrides, relative_to=suite_dir)
        except ConfigError as e:
            key = (e.path or "").removesuffix(" (override)")
            raise ConfigError(f"trial {self.name}: {key + ': ' if key else ''}{e.message}", hint=e.hint,
                              path=key if key in self.params else "") from None


def _leaves(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        shapes = [a for a in _members(field.annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        out += _leaves(shapes[0], path + ".") if shapes else [path]
    return out


def _members(annotation: Any) -> tuple[Any, ...]:
    """`X | None` -> (X, None); `Annotated[X, ...]` -> (X,); anything else -> (annotation,)."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return tuple(m for a in typing.get_args(annotation) for m in _members(a))
    return (annotation,)


def sweepable_fields() -> list[str]:
    """Every recipe field a sweep may vary, by its dotted path."""
    return [p for p in _leaves(Recipe) if p.split(".")[0] not in NOT_SWEPT]


def check_keys(sweep: Sweep) -> None:
    """Each swept key must be a recipe field (ConfigError with `path` = the key)."""
    fields = sweepable_fields()
    for key in sweep.params:
        if key not in fields:
            why = (f"'{key}' is set by the sweep itself" if key.split(".")[0] in NOT_SWEPT
                   else f"'{key}' is not a recipe field{did_you_mean(key, [*fields, *Sweep.RESERVED])}")
            raise ConfigError(why, path=key)


def check_storage(url: str) -> None:
    """A storage URL SQLAlchemy can read (the database itself is reached when the sweep runs)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(url)
    except ArgumentError as e:
        raise ConfigError(f"not a database URL: {e}", path="storage",
                          hint="e.g. sqlite:///sweep.db (a file) or postgresql://user@host/db") from None


def grid_trials(variant: str, sweep: Sweep, trials_dir: Path) -> list[Trial]:
    """Every combination of the grid's values, in the order the sweep lists its keys."""
    grid = sweep.grid
    trials = []
    for values in itertools.product(*grid.values()):
        params = {k: list(v) if isinstance(v, tuple) else v for k, v in zip(grid, values)}
        trials.append(make_trial(variant, params, trials_dir))
    return trials


def make_trial(variant: str, params: Mapping[str, Any], trials_dir: Path, number: int | None = None) -> Trial:
    """A search's trials carry their number (`lora#3[...]`): sampled values can look alike once shortened."""
    name = trial_name(variant if number is None else f"{variant}#{number}", params)
    return Trial(name, dict(params), trials_dir / trial_folder(name[len(variant):]))


def trials_dir(recipe: Recipe) -> Path:
    """Where a recipe's trials are trained: `trials/` beside its output (runs/lora/trials/r=16,lr=1e-3)."""
    return recipe.output.parent / "trials"

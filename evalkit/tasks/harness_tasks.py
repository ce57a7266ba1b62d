"""lm-eval tasks as a canary takes them: found (registry names, task YAML files, folders of them),
loaded (with an error naming the dataset when the hub is out of reach), and sliced (how many
documents each task gives, and which, seeded)."""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from evalkit.config.canary import LmEvalTask
from evalkit.errors import ConfigError
from evalkit.tasks.harness_lm import lm_eval_module, quiet


def task_manager(specs: Sequence[str]) -> Any:
    """lm-eval's TaskManager: registry names need its task folder indexed (~15 s); paths (task
    YAML files, folders of them) are indexed alone."""
    folders = tuple(s for s in specs if Path(s).is_dir())
    edits = tuple((str(f), f.stat().st_mtime_ns) for d in folders for f in sorted(Path(d).rglob("*.y*ml")))
    return _task_manager(folders, any(not Path(s).exists() for s in specs), edits)


@functools.lru_cache(maxsize=4)  # preflight and run index once (again when a folder's YAML changed)
def _task_manager(folders: tuple[str, ...], registry: bool, edits: tuple[tuple[str, int], ...]) -> Any:
    return lm_eval_module().tasks.TaskManager(include_path=list(folders) or None, include_defaults=registry)


def resolve_specs(specs: Sequence[str], tm: Any, where: str = "tasks") -> list[str]:
    """What lm-eval loads for each entry: a registry name or YAML path as given; a folder stands
    for every task defined in it."""
    from evalkit.errors import did_you_mean

    out: list[str] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            inside = sorted(name for name, e in tm.task_index.items()
                            if e.yaml_path is not None and path.resolve() in Path(e.yaml_path).resolve().parents
                            and str(e.kind).lower().endswith("task"))
            if not inside:
                raise ConfigError(f"no lm-eval task YAML (with a `task:` key) under {path}", path=where)
            out += inside
        elif path.exists() or spec in tm.task_index:
            out.append(spec)
        else:
            raise ConfigError(f"unknown lm-eval task '{spec}'{did_you_mean(spec, tm.all_tasks)}", path=where,
                              hint="a registry name (`lm-eval ls tasks`), or the path of a task YAML or folder")
    return out


def load_tasks(specs: Sequence[Any], tm: Any, where: str = "tasks") -> dict[str, Any]:
    """{task name: lm-eval Task} for the specs (names, paths or config dicts), with data a task
    cannot load (the Hugging Face hub out of reach) turned into an error naming its dataset."""
    loaded: dict[str, Any] = {}
    for spec in specs:
        try:
            loaded.update(quiet(tm.load)([spec])["tasks"])
        except ConfigError:
            raise
        except Exception as e:
            raise _data_error(spec, tm, e, where) from None
    return loaded


def _data_error(spec: Any, tm: Any, e: Exception, where: str) -> ConfigError:
    """A task that failed to build: when its data is on the hub and out of reach, the error names
    the dataset and how to use local files instead."""
    entry = tm.task_index.get(spec) if isinstance(spec, str) else None
    cfg = (entry.cfg if entry is not None else None) or (spec if isinstance(spec, Mapping) else {})
    task = spec if isinstance(spec, str) else cfg.get("task")
    first = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    dataset = cfg.get("dataset_path")
    hub = (dataset not in (None, "json", "csv", "parquet", "text", "arrow")
           and (isinstance(e, OSError) or any(w in type(e).__name__ for w in ("NotFound", "Offline", "Connection"))))
    if not hub:
        return ConfigError(f"lm-eval task '{task}' could not be built: {first}", path=where)
    name = f" ({cfg['dataset_name']})" if cfg.get("dataset_name") else ""
    return ConfigError(
        f"lm-eval task '{task}' could not load dataset '{dataset}'{name} from the Hugging Face hub: {first}",
        path=where,
        hint="offline, point the task at local files: copy its YAML, set `dataset_path: json` (or csv, parquet) "
             "and `dataset_kwargs: {data_files: {test: /abs/path/test.jsonl}}`, and list the YAML's path under "
             "`tasks:`")


def slice_sizes(task: LmEvalTask, docs: Mapping[str, int], seed: int,
           log: Callable[[str], None]) -> tuple[dict[str, int], dict[str, Any]]:
    """Documents per lm-eval task: `limit` each, the sample size `detect_drop` asks for spread over
    the tasks (as the MMLU canary spreads it over subjects), or all of them."""
    from evalkit.tasks.mmlu_data import can_clear, size_for_drop

    info: dict[str, Any] = {"seed": seed}
    if task.detect_drop is not None:
        counts, notes, sizing = size_for_drop(task.detect_drop, docs, task.confidence, task.power, task.discordance,
                                              unit="documents")
        info.update(sizing)
    else:
        counts = {t: min(task.limit, n) if task.limit else n for t, n in docs.items()}
        words, margin = can_clear(sum(counts.values()), task.discordance, task.confidence, task.power)
        notes = [f"{sum(counts.values())} documents: {words}"]
        info.update(limit=task.limit, confidence=task.confidence, power=task.power, discordance=task.discordance,
                    clears_max_drop=margin)
    total = sum(counts.values())
    info.update(n=total, power_note="; ".join(notes))
    log(f"{task.name}: {total} documents over {len(counts)} lm-eval task(s) (seed {seed}); {info['power_note']}")
    return counts, info


def seeded_indices(n_docs: int, take: int, seed: int, task: str) -> list[int]:
    """The first `take` of a seeded order of a task's documents, in document order."""
    from evalkit.tasks.mmlu_data import seeded_order

    return sorted(seeded_order(range(n_docs), f"evalkit-lm-eval:{seed}:{task}")[:take])

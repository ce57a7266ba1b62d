"""YAML suite -> typed Suite. Every user mistake becomes `FILE:LINE PATH: message` (exit 4).

yaml.safe_load gives the data; yaml.compose (same safe loader) gives the node tree, from which
we map each YAML path to its line. The JSON Schema shipped beside this file checks structure
and unknown keys; the semantic checks (files exist, names resolve) follow.
"""
from __future__ import annotations

import dataclasses
import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from evalkit import scorers
from evalkit.config.suite import Gate, GenerationConfig, ScorerSpec, Suite, Task, Variant
from evalkit.errors import ConfigError, YamlPath, did_you_mean, line_of, located
from evalkit.models.base import BaseSpec

TASK_METRICS = {"mmlu": ("accuracy",), "judge": ("rubric", "pairwise", "anchor_accuracy", "anchor_kappa")}


@cache
def suite_schema() -> dict[str, Any]:
    return json.loads(resources.files("evalkit.config").joinpath("suite.schema.json").read_text())


def _line_map(node: yaml.Node, path: YamlPath = (), lines: dict[YamlPath, int] | None = None) -> dict[YamlPath, int]:
    lines = {} if lines is None else lines
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value
            lines[path + (key,)] = k.start_mark.line + 1
            _line_map(v, path + (key,), lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _line_map(v, path + (i,), lines)
    return lines


class _Ctx:
    """Where the suite came from, to build located errors."""

    def __init__(self, file: Path, lines: dict[YamlPath, int]):
        self.file, self.lines = file, lines

    def line(self, path: YamlPath) -> int | None:
        return line_of(self.lines, path)

    def error(self, path: YamlPath, message: str, hint: str | None = None) -> ConfigError:
        return located(message, self.file, self.lines, path, hint)


def read_yaml(file: Path) -> tuple[Any, dict[YamlPath, int]]:
    """safe_load + line map; a YAML syntax error names the file, line and column."""
    if not file.is_file():
        raise ConfigError(f"file not found: {file}")
    text = file.read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = mark.line + 1 if mark else None
        problem = getattr(e, "problem", None) or str(e)
        col = f" (column {mark.column + 1})" if mark else ""
        raise ConfigError(f"invalid YAML: {problem}{col}", file=file, line=line) from None
    return data, (_line_map(node) if node is not None else {})


def _allowed_keys(schema_node: dict[str, Any], root: dict[str, Any], instance: Any) -> set[str]:
    """Keys a (possibly if/then composed) schema node accepts for this instance."""
    keys = set(schema_node.get("properties", {}))
    if "$ref" in schema_node:
        keys |= _allowed_keys(_resolve(root, schema_node["$ref"]), root, instance)
    for sub in schema_node.get("allOf", []):
        cond = sub.get("if")
        if cond is None:
            keys |= _allowed_keys(sub, root, instance)
            continue
        import jsonschema

        branch = sub.get("then") if jsonschema.Draft202012Validator(cond).is_valid(instance) else sub.get("else")
        if branch:
            keys |= _allowed_keys(branch, root, instance)
    return keys


def _resolve(root: dict[str, Any], ref: str) -> dict[str, Any]:
    node: Any = root
    for part in ref.lstrip("#/").split("/"):
        node = node[part]
    return node


def _schema_error(ctx: _Ctx, data: Any) -> ConfigError | None:
    import jsonschema

    schema = suite_schema()
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(data), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if not errors:
        return None
    err = jsonschema.exceptions.best_match(errors)
    # unknown keys are the most common mistake: find them wherever they are and suggest a fix
    for e in errors:
        if e.validator in ("additionalProperties", "unevaluatedProperties") and isinstance(e.instance, dict):
            allowed = _allowed_keys(e.schema, schema, e.instance)
            unknown = [k for k in e.instance if k not in allowed]
            if unknown:
                path = tuple(e.absolute_path) + (unknown[0],)
                return ctx.error(path, f"unknown key '{unknown[0]}'{did_you_mean(unknown[0], allowed)}")
    path = tuple(err.absolute_path)
    if err.validator == "required":
        return ctx.error(path, err.message.replace("is a required property", "is required"))
    if err.validator in ("oneOf", "anyOf") and path and path[0] == "gates":
        return ctx.error(path, "a gate needs `metric:` with `min:`, `max:`, `max_drop:` or `max_invalid:`, "
                               "or a `check:`")
    if err.validator == "oneOf" and path == ("base",):
        return ctx.error(path, "base needs exactly one of `gguf:`, `path:` or `id:`")
    if err.validator == "not" and path and path[0] == "variants":
        return ctx.error(path, "a variant takes `adapter:` or `train:`, not both")
    if err.validator == "enum":
        return ctx.error(path, f"{err.instance!r} is not one of {err.validator_value}")
    return ctx.error(path, err.message)


def load_suite(path: str | Path) -> Suite:
    file = Path(path)
    data, lines = read_yaml(file)
    ctx = _Ctx(file, lines)
    if not isinstance(data, dict):
        raise ctx.error((), "a suite must be a YAML mapping with name, base, variants and tasks")
    err = _schema_error(ctx, data)
    if err:
        raise err
    base_dir = file.resolve().parent
    base = _base(data["base"])
    variants = tuple(_variant(ctx, i, v, base_dir) for i, v in enumerate(data["variants"]))
    names = [v.name for v in variants]
    for i, n in enumerate(names):
        if names.index(n) != i:
            raise ctx.error(("variants", i, "name"), f"duplicate variant name '{n}'")
    reference = data.get("reference", "base" if "base" in names else names[0])
    if reference not in names:
        raise ctx.error(("reference",), f"unknown variant '{reference}'{did_you_mean(reference, names)}")
    tasks = tuple(_task(ctx, i, t, base_dir) for i, t in enumerate(data.get("tasks") or []))
    tnames = [t.name for t in tasks]
    for i, n in enumerate(tnames):
        if tnames.index(n) != i:
            raise ctx.error(("tasks", i, "name"), f"duplicate task name '{n}'")
    gates = _unique_ids([_gate(ctx, i, g, tasks, names, reference) for i, g in enumerate(data.get("gates") or [])])
    return Suite(name=data["name"], path=file.resolve(), base=base, variants=variants, tasks=tasks, gates=gates,
                 seed=data.get("seed", 0), reference=reference, raw=data, lines=lines)


def _unique_ids(gates: list[Gate]) -> tuple[Gate, ...]:
    """Gate ids (with the variant) name JUnit cases and pytest items, so two gates whose ids would
    meet on a variant must differ: the later one gets `#2`, `#3`."""
    taken: dict[str, list[str | None]] = {}  # id -> the `variant:` of each gate using it (None: all)
    out = []
    for g in gates:
        users = taken.setdefault(g.id, [])
        clash = any(v is None or g.variant is None or v == g.variant for v in users)
        users.append(g.variant)
        out.append(dataclasses.replace(g, id=f"{g.id}#{len(users)}") if clash else g)
    return tuple(out)


def _base(d: dict[str, Any]) -> BaseSpec:
    kind = next(k for k in ("gguf", "path", "id") if k in d)
    return BaseSpec(kind, d[kind], d.get("revision"))


def _variant(ctx: _Ctx, i: int, d: dict[str, Any], base_dir: Path) -> Variant:
    where = ("variants", i)
    adapter = train = None
    if "adapter" in d:
        adapter = (base_dir / d["adapter"]).resolve()
        if not adapter.is_dir():
            raise ctx.error(where + ("adapter",), f"adapter folder not found: {adapter}")
    if "train" in d:
        train = (base_dir / d["train"]).resolve()
        if not train.is_file():
            raise ctx.error(where + ("train",), f"recipe not found: {train}")
    if d.get("merge_into") == "quantized" and not d.get("quantize"):
        raise ctx.error(where + ("merge_into",), "merge_into: quantized needs `quantize:`")
    if (d.get("merge") or d.get("quantize")) and adapter is None and train is None:
        raise ctx.error(where, "`merge`/`quantize` apply to an adapter variant (give `adapter:` or `train:`)")
    return Variant(name=d["name"], adapter=adapter, train=train, quantize=d.get("quantize"),
                   merge=bool(d.get("merge", False)), merge_into=d.get("merge_into", "full"),
                   allow_pickle=bool(d.get("allow_pickle", False)),
                   allow_template_mismatch=bool(d.get("allow_template_mismatch", False)), line=ctx.line(where))


def _scorer(ctx: _Ctx, path: YamlPath, entry: Any, base_dir: Path) -> ScorerSpec:
    if isinstance(entry, str):
        name, params = entry, {}
    else:
        name, value = next(iter(entry.items()))
        if isinstance(value, dict):
            params = value
        else:
            sdef = _scorer_def(ctx, path, name)
            if sdef.primary is None:
                raise ctx.error(path + (name,), f"scorer '{name}' takes a mapping of parameters")
            params = {sdef.primary: value}
    sdef = _scorer_def(ctx, path, name)
    try:
        fn = scorers.build(name, params, base_dir)
    except ConfigError as e:
        raise ctx.error(path, e.message, e.hint) from None
    return ScorerSpec(name, params, fn, sdef.binary)


def _scorer_def(ctx: _Ctx, path: YamlPath, name: str):
    try:
        return scorers.get(name)
    except ConfigError as e:
        raise ctx.error(path, e.message) from None


def _task(ctx: _Ctx, i: int, d: dict[str, Any], base_dir: Path) -> Task:
    where = ("tasks", i)
    kind = d.get("kind", "generate")
    data = None
    if "data" in d:
        data = (base_dir / d["data"]).resolve()
        if not data.is_file():
            raise ctx.error(where + ("data",), f"data file not found: {data}")
    for key in ("rubric", "anchors"):
        if key in d and not (base_dir / d[key]).is_file():
            raise ctx.error(where + (key,), f"file not found: {(base_dir / d[key]).resolve()}")
    specs = tuple(_scorer(ctx, where + ("scorers", j), s, base_dir) for j, s in enumerate(d.get("scorers") or []))
    if kind == "generate" and not specs:
        raise ctx.error(where, f"task '{d['name']}' has no scorers", hint="add e.g. `scorers: [exact_match]`")
    names = [s.name for s in specs]
    for j, n in enumerate(names):
        if names.index(n) != j:
            raise ctx.error(where + ("scorers", j), f"scorer '{n}' listed twice")
    gen = GenerationConfig(max_new_tokens=d.get("max_new_tokens", 64), stop=tuple(d.get("stop", ())),
                           batch_size=d.get("batch_size", 8))
    common = {"name", "kind", "data", "scorers", "limit", "max_new_tokens", "stop", "batch_size", "description",
              "invalid"}
    params = {k: v for k, v in d.items() if k not in common}
    return Task(name=d["name"], kind=kind, data=data, scorers=specs, limit=d.get("limit"), generation=gen,
                params=params, invalid=d.get("invalid", "loss"), line=ctx.line(where), index=i)


def task_metrics(task: Task) -> tuple[str, ...]:
    return tuple(s.name for s in task.scorers) + TASK_METRICS.get(task.kind, ())


def _gate(ctx: _Ctx, i: int, d: dict[str, Any], tasks: tuple[Task, ...], variants: list[str], reference: str) -> Gate:
    where = ("gates", i)
    for key in ("variant", "vs"):
        if key in d and d[key] not in variants:
            raise ctx.error(where + (key,), f"unknown variant '{d[key]}'{did_you_mean(d[key], variants)}")
    if "metric" in d:
        tname, _, metric = d["metric"].partition(".")
        by_name = {t.name: t for t in tasks}
        if tname not in by_name:
            raise ctx.error(where + ("metric",), f"unknown task '{tname}'{did_you_mean(tname, by_name)}")
        known = task_metrics(by_name[tname])
        if metric not in known:
            raise ctx.error(where + ("metric",), f"task '{tname}' has no metric '{metric}'{did_you_mean(metric, known)}")
        alone = [k for k in ("max_drop", "max_invalid") if k in d]
        if alone and len([k for k in ("min", "max", "max_drop", "max_invalid") if k in d]) > 1:
            raise ctx.error(where + (alone[0],), f"`{alone[0]}` is a gate of its own: give it without other thresholds")
        if "max_drop" in d and d.get("vs", reference) == d.get("variant"):
            raise ctx.error(where, "a max_drop gate compares a variant with another one (`vs:`)")
    vs = d.get("vs", reference if "max_drop" in d else None)
    # a relative gate on a metric is another test than an absolute one: keep their ids apart
    label = d.get("name") or d.get("check") or (f"{d['metric']}-vs-{vs}" if "max_drop" in d else
                                                f"{d['metric']}-invalid" if "max_invalid" in d else d["metric"])
    params = {k: d[k] for k in ("max_abs_logit_diff", "min_top1_agreement") if k in d}
    return Gate(id=label, metric=d.get("metric"), variant=d.get("variant"), min=d.get("min"), max=d.get("max"),
                max_drop=d.get("max_drop"), max_invalid=d.get("max_invalid"), vs=vs,
                confidence=d.get("confidence"), check=d.get("check"), params=params, line=ctx.line(where))

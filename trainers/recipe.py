"""Training recipes: YAML -> a frozen, validated `Recipe`.

`method` (lora | qlora | dora) is a preset: it picks the defaults of `lora.use_dora` and whether
the base is loaded in 4 bits (`quantization`). Every field can be overridden in the file or with
`overrides` (nested dicts or dotted keys: {"training.max_steps": 2}). Errors name the file, the
line and the YAML path (`lora.yml:7 lora.r: ...`). Relative paths in the file resolve against the
file's folder; relative paths given in `overrides` resolve against the current directory.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from evalkit.errors import ConfigError, did_you_mean
from evalkit.models.base import BaseSpec

METHODS = ("lora", "qlora", "dora")


@dataclass(frozen=True)
class LoraParams:
    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "all-linear"
    use_dora: bool = False  # default: True for method dora


@dataclass(frozen=True)
class QuantParams:
    """4-bit base for QLoRA. compute_dtype auto: bfloat16 on CUDA, float32 on CPU."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


@dataclass(frozen=True)
class TrainParams:
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    epochs: float = 2
    max_steps: int | None = None  # caps training; wins over epochs when set
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 1024
    completion_only_loss: bool = True
    logging_steps: int = 10
    eval_steps: int | None = None  # None: at every logging step
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "auto"  # auto: paged_adamw_8bit for QLoRA on CUDA, adamw_torch otherwise
    gradient_checkpointing: bool | Literal["auto"] = "auto"  # auto: on for CUDA, off on CPU (faster there)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA when supported, else fp32


@dataclass(frozen=True)
class DataParams:
    train: Path  # jsonl: suite rows (messages + target) or prompt/completion rows
    eval_fraction: float = 0.1  # held-out split of the train file (never the test file)
    check_against: tuple[Path, ...] = ()  # eval files checked for leakage before training


@dataclass(frozen=True)
class Recipe:
    name: str
    method: Literal["lora", "qlora", "dora"]
    base: BaseSpec
    base_dir: Path  # where a relative base path resolves
    data: DataParams
    output: Path
    seed: int = 0
    lora: LoraParams = field(default_factory=LoraParams)
    training: TrainParams = field(default_factory=TrainParams)
    quantization: QuantParams | None = None
    source: Path | None = None  # the recipe file

    def to_dict(self) -> dict[str, Any]:
        """JSON-able resolved recipe (absolute paths), as recorded in provenance."""
        def plain(v: Any) -> Any:
            if isinstance(v, Path):
                return str(v)
            if isinstance(v, (tuple, list)):
                return [plain(x) for x in v]
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v
        d = plain(dataclasses.asdict(self))
        d["base"] = {k: v for k, v in d["base"].items() if v is not None}
        return d


# ----------------------------------------------------------------------------------------------
# loading

_RANGES: dict[str, tuple[float | None, float | None]] = {  # inclusive bounds
    "lora.r": (1, None), "lora.alpha": (0, None), "lora.dropout": (0, 0.999),
    "training.learning_rate": (0, None), "training.warmup_ratio": (0, 0.999), "training.epochs": (0, None),
    "training.max_steps": (1, None), "training.batch_size": (1, None), "training.grad_accum": (1, None),
    "training.max_length": (8, None), "training.logging_steps": (1, None), "training.eval_steps": (1, None),
    "training.weight_decay": (0, None), "training.max_grad_norm": (0, None), "data.eval_fraction": (0, 0.9),
}
_BASE_KINDS = ("gguf", "path", "id")


class _Ctx:
    """Where a value came from (file line, or an override), for error messages."""

    def __init__(self, file: Path | None, lines: dict[str, int], overridden: set[str]):
        self.file, self.lines, self.overridden = file, lines, overridden

    def error(self, ypath: str, message: str, hint: str | None = None) -> ConfigError:
        if any(ypath == o or ypath.startswith((o + ".", o + "[")) for o in self.overridden):
            return ConfigError(message, file=self.file, path=f"{ypath} (override)", hint=hint)
        line = self.lines.get(ypath)
        if line is None and "." in ypath:  # an unknown key's parent, or a missing field: point at the block
            line = self.lines.get(ypath.rsplit(".", 1)[0])
        return ConfigError(message, file=self.file, line=line, path=ypath, hint=hint)


def _node_lines(node: yaml.Node | None, prefix: str = "") -> dict[str, int]:
    out: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            path = f"{prefix}.{k.value}" if prefix else str(k.value)
            out[path] = k.start_mark.line + 1
            out.update(_node_lines(v, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            path = f"{prefix}[{i}]"
            out[path] = v.start_mark.line + 1
            out.update(_node_lines(v, path))
    return out


def _merge(raw: dict[str, Any], overrides: dict[str, Any], cwd: Path) -> dict[str, Any]:
    """Deep-merge overrides (nested dicts or dotted keys) into the file's dict. A `base` override
    replaces the whole block; relative paths in overrides are made absolute from cwd."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        *parents, last = key.split(".")
        d = nested
        for part in parents:
            d = d.setdefault(part, {})
        d[last] = _deep_merge(d[last], value) if isinstance(d.get(last), dict) and isinstance(value, dict) else value

    def absolute(p: Any) -> Any:
        if isinstance(p, list):
            return [absolute(x) for x in p]
        return str(cwd / p) if isinstance(p, str) and not p.startswith("pkg:") and not Path(p).is_absolute() else p

    if "output" in nested:
        nested["output"] = absolute(nested["output"])
    for block, keys in (("base", ("gguf", "path")), ("data", ("train", "check_against"))):
        if isinstance(nested.get(block), dict):
            nested[block] = {k: absolute(v) if k in keys else v for k, v in nested[block].items()}
    return _deep_merge(raw, nested)


def _dotted(d: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        out += _dotted(v, key) if isinstance(v, dict) and v and key != "base" else [key]
    return out


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        both = isinstance(v, dict) and isinstance(out.get(k), dict) and k != "base"
        out[k] = _deep_merge(out[k], v) if both else v
    return out


def _options(hint: Any) -> tuple[Any, ...]:
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def _convert(value: Any, hint: Any) -> tuple[bool, Any]:
    """(True, normalized value) when `value` fits one type (lists become tuples, ints floats)."""
    if hint is type(None):
        return value is None, None
    if typing.get_origin(hint) is Literal:
        return value in typing.get_args(hint), value
    if typing.get_origin(hint) is tuple:
        return isinstance(value, list) and all(isinstance(x, str) for x in value), tuple(value or ())
    if hint is bool:
        return isinstance(value, bool), value
    if isinstance(value, bool):
        return False, value
    if hint is int:
        return isinstance(value, int), value
    if hint is float:
        return isinstance(value, (int, float)), float(value) if isinstance(value, (int, float)) else value
    return isinstance(value, str) and value != "", value  # str


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        return ("one of " if len(choices) > 1 else "") + ", ".join(repr(c) for c in choices)
    if typing.get_origin(hint) is tuple:
        return "a list of strings"
    return {type(None): "null", bool: "true or false", int: "an integer", float: "a number",
            str: "a non-empty string"}[hint]


def _check(value: Any, hint: Any, ypath: str, ctx: _Ctx) -> Any:
    """Validate one value against a type hint (a type, Literal, tuple[str, ...] or a union of them)."""
    for option in _options(hint):
        ok, converted = _convert(value, option)
        if ok:
            return converted
    choices = [c for o in _options(hint) if typing.get_origin(o) is Literal for c in typing.get_args(o)]
    close = did_you_mean(value, map(str, choices)) if isinstance(value, str) and choices else ""
    expected = " or ".join(_describe(o) for o in _options(hint))
    raise ctx.error(ypath, f"expected {expected}, got {value!r}" + (close if "did you mean" in close else ""))


def _build(cls: type, raw: Any, prefix: str, ctx: _Ctx, **given: Any) -> Any:
    """A dataclass from a YAML mapping: unknown keys rejected, each field type- and range-checked
    (fields in `given` are parsed by the caller)."""
    if not isinstance(raw, dict):
        raise ctx.error(prefix, f"expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            raise ctx.error(f"{prefix}.{key}", f"unknown key '{key}'{did_you_mean(str(key), names)}")
    values: dict[str, Any] = dict(given)
    for name in names:
        if name in raw and name not in given:
            ypath = f"{prefix}.{name}"
            value = _check(raw[name], hints[name], ypath, ctx)
            lo, hi = _RANGES.get(ypath, (None, None))
            if isinstance(value, (int, float)) and not isinstance(value, bool) and (
                    (lo is not None and value < lo) or (hi is not None and value > hi)):
                bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
                raise ctx.error(ypath, f"must be {bounds}, got {value}")
            values[name] = value
    return cls(**values)


def _base_spec(raw: Any, ctx: _Ctx) -> BaseSpec:
    if not isinstance(raw, dict):
        raise ctx.error("base", "expected a mapping like {gguf: FILE}, {path: DIR} or {id: ORG/NAME}")
    for key in raw:
        if key not in (*_BASE_KINDS, "revision"):
            raise ctx.error(f"base.{key}", f"unknown key '{key}'{did_you_mean(str(key), (*_BASE_KINDS, 'revision'))}")
    kinds = [k for k in _BASE_KINDS if k in raw]
    if len(kinds) != 1:
        raise ctx.error("base", "give exactly one of gguf, path, id")
    ref = _check(raw[kinds[0]], str, f"base.{kinds[0]}", ctx)
    revision = _check(raw["revision"], str, "base.revision", ctx) if "revision" in raw else None
    return BaseSpec(kinds[0], ref, revision)


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read and validate a recipe file; `overrides` win over the file (see module doc)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read recipe: {e.strerror}", file=path) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(f"invalid YAML: {getattr(e, 'problem', None) or e}", file=path,
                          line=mark.line + 1 if mark else None) from None
    ctx = _Ctx(path, _node_lines(node), set(_dotted(overrides or {})))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ctx.error("", "a recipe must be a mapping")
    return _from_dict(_merge(raw, overrides or {}, Path.cwd()), path.resolve().parent, ctx, path.resolve())


def _from_dict(raw: dict[str, Any], folder: Path, ctx: _Ctx, source: Path | None) -> Recipe:
    top = [f.name for f in dataclasses.fields(Recipe) if f.name not in ("base_dir", "source")]
    for key in raw:
        if key not in top:
            raise ctx.error(str(key), f"unknown key '{key}'{did_you_mean(str(key), top)}")
    for key in ("method", "base", "data", "output"):
        if key not in raw:
            raise ctx.error(key, "missing required key")
    method = _check(raw["method"], Literal["lora", "qlora", "dora"], "method", ctx)
    name = _check(raw.get("name", method), str, "name", ctx)
    seed = _check(raw.get("seed", 0), int, "seed", ctx)
    if seed < 0:
        raise ctx.error("seed", f"must be >= 0, got {seed}")

    def resolve(p: str) -> Path:
        return (folder / p).resolve() if not Path(p).is_absolute() else Path(p)

    data_raw = raw["data"]
    data = _build(DataParams, data_raw, "data", ctx, train=Path("."), check_against=())
    if "train" not in data_raw:
        raise ctx.error("data.train", "missing required key (the training jsonl file)")
    train = resolve(_check(data_raw["train"], str, "data.train", ctx))
    against = data_raw.get("check_against", [])
    if isinstance(against, str):
        against = [against]
    against = tuple(resolve(p) for p in _check(against, tuple[str, ...], "data.check_against", ctx))
    for i, p in enumerate((train, *against)):
        if not p.is_file():
            ypath = "data.train" if i == 0 else f"data.check_against[{i - 1}]"
            raise ctx.error(ypath, f"file not found: {p}")
    data = dataclasses.replace(data, train=train, check_against=against)

    lora_raw = raw.get("lora", {})
    lora = _build(LoraParams, lora_raw, "lora", ctx)
    if not (isinstance(lora_raw, dict) and "use_dora" in lora_raw):
        lora = dataclasses.replace(lora, use_dora=method == "dora")
    training = _build(TrainParams, raw.get("training", {}), "training", ctx)
    quantization = None
    if method == "qlora":
        quantization = _build(QuantParams, raw.get("quantization", {}), "quantization", ctx)
    elif "quantization" in raw:
        raise ctx.error("quantization", f"only method 'qlora' trains on a quantized base (method is '{method}')")
    return Recipe(name=name, method=method, base=_base_spec(raw["base"], ctx), base_dir=folder, data=data,
                  output=resolve(_check(raw["output"], str, "output", ctx)), seed=seed, lora=lora,
                  training=training, quantization=quantization, source=source)


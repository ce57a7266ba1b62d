"""Training recipes: YAML -> a frozen, validated `Recipe`.

`method` (lora | qlora | dora) is a preset: it picks the defaults of `lora.use_dora` and whether
the base is loaded in 4 bits (`quantization`). Every field can be overridden in the file or with
`overrides` (nested dicts or dotted keys: {"training.max_steps": 2}). Errors name the file, the
line and the YAML path (`lora.yml:7 lora.r: ...`). Relative paths in the file resolve against the
file's folder; relative paths given in `overrides` resolve against the current directory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, PrivateAttr, ValidationError, WithJsonSchema, model_validator

from evalkit.errors import ConfigError, YamlPath, fmt_path, line_of
from evalkit.models.base import BaseSpec
from evalkit.rows import TEMPLATE_DOC, Template
from evalkit.shape import Shape, error_parts, existing, invalid, resolved, shown


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


_COMMAND_SCHEMA = {"oneOf": [{"type": "array", "minItems": 1, "items": {"type": ["string", "number"], "minLength": 1}},
                              {"type": "string", "minLength": 1}]}


def _command(value: Any) -> Any:
    """A command as a list of arguments, or one string split as a shell would; numbers are
    arguments too (`--num_processes, 2`)."""
    if isinstance(value, str):
        import shlex

        try:
            return shlex.split(value)
        except ValueError as e:  # an unclosed quote
            raise invalid(f"cannot split {shown(value, 80)} into arguments ({e})") from None
    if isinstance(value, list):
        return [str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v for v in value]
    return value


RecipeFile = Annotated[Path, existing("file")]


class LoraParams(Shape):
    r: int = Field(16, ge=1)
    alpha: float = Field(32, ge=0)
    dropout: float = Field(0.05, ge=0, le=0.999)
    target_modules: str | Annotated[tuple[str, ...], Field(strict=False)] = Field(
        "all-linear", description="module names, or all-linear")
    use_dora: bool | None = Field(None, description="default: true for method dora")


class QuantParams(Shape):
    """4-bit base for QLoRA. compute_dtype auto: bfloat16 on CUDA, float32 on CPU."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class EarlyStopping(Shape):
    """Stop when the held-out metric stops improving, and keep the best checkpoint (transformers'
    EarlyStoppingCallback with load_best_model_at_end): the guides' rule against overfitting."""

    patience: int = Field(3, ge=1, description="evaluations without improvement before stopping")
    metric: Literal["eval_loss", "eval_mean_token_accuracy"] = "eval_loss"
    threshold: float = Field(0.0, ge=0, description="the least change that counts as an improvement")


class TrainParams(Shape):
    learning_rate: float = Field(2e-4, ge=0)
    lr_scheduler: str = Field("cosine", min_length=1)
    warmup_ratio: float = Field(0.03, ge=0, le=0.999)
    epochs: float = Field(2, ge=0)
    max_steps: int | None = Field(None, ge=1, description="caps training; wins over epochs when set")
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(1024, ge=8)
    completion_only_loss: bool = True
    collator: Literal["completion", "language_modeling"] = Field(
        "completion", description="completion: trl's (padding masked by position); language_modeling: the "
                                  "classic DataCollatorForLanguageModeling(mlm=False), loss on every token but "
                                  "pad ids (with pad_token eos it masks EOS out of the loss)")
    pad_token: str | None = Field(None, min_length=1, description="eos, or a token of the vocabulary (default: "
                                                                  "the tokenizer's, else eos)")
    padding_side: Literal["right", "left"] | None = Field(None, description="default: the tokenizer's")
    early_stopping: EarlyStopping | None = None
    logging_steps: int | None = Field(
        None, ge=1, description="steps between train-loss logs (default: the run's total optimizer steps / 20, at "
                                "least 1, so a short run logs enough points for training_health); step 1 is "
                                "always logged")
    eval_steps: int | None = Field(
        None, ge=1, description="steps between held-out evaluations (default: total steps / 4, at least 1: 4-5 "
                                "per run, each a forward over the held-out rows)")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    optim: str = Field("auto", min_length=1, description="auto: paged_adamw_8bit for QLoRA on CUDA, adamw_torch "
                                                         "otherwise")
    gradient_checkpointing: bool | Literal["auto"] = Field("auto", description="auto: on for CUDA, off on CPU")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on CUDA when supported, else fp32")


class DataParams(Shape):
    train: RecipeFile = Field(description="jsonl: the rows evaluation reads (messages or prompt, plus target or "
                                          "completion: see evalkit.rows)")
    template: Template = Field("auto", description=TEMPLATE_DOC)
    eval_fraction: float = Field(0.1, ge=0, le=0.9, description="held-out split of the train file (never the test "
                                                                "file)")
    check_against: Annotated[tuple[RecipeFile, ...], BeforeValidator(_one_or_many), Field(strict=False)] = Field(
        (), description="eval files checked for leakage before training")


class Recipe(Shape):
    """A training recipe. `method` is a preset for `lora.use_dora` and the 4-bit base."""

    name: str | None = Field(None, min_length=1, description="default: the method")
    method: Literal["lora", "qlora", "dora"]
    base: BaseSpec
    data: DataParams
    output: Annotated[Path, resolved]
    seed: int = Field(0, ge=0)
    lora: LoraParams = LoraParams()
    training: TrainParams = TrainParams()
    quantization: QuantParams | None = None
    launcher: Annotated[tuple[Annotated[str, Field(min_length=1)], ...], BeforeValidator(_command),
                        Field(strict=False, min_length=1), WithJsonSchema(_COMMAND_SCHEMA)] | None = Field(
        None, description="train in processes this command starts, e.g. [accelerate, launch, --multi_gpu, "
                          "--num_processes, 2] (DDP; on CPU over gloo): evalkit appends `-m trainers.launched JOB`. "
                          "Part of the fingerprint (more processes: a larger effective batch). Default: train in "
                          "evalkit's process")

    _base_dir: Path = PrivateAttr(Path("."))  # where a relative base path resolves
    _source: Path | None = PrivateAttr(None)  # the recipe file
    _origins: dict[YamlPath, tuple[Path, int]] = PrivateAttr(default_factory=dict)  # see `error`
    _overridden: set[str] = PrivateAttr(default_factory=set)

    @model_validator(mode="after")
    def _preset(self) -> Recipe:
        if self.quantization is not None and self.method != "qlora":
            raise invalid(f"only method 'qlora' trains on a quantized base (method is '{self.method}')",
                          at=("quantization",))
        t = self.training
        if t.collator == "language_modeling" and t.completion_only_loss:
            raise invalid("the language_modeling collator trains on every token: set completion_only_loss: false",
                          at=("training", "collator"))
        if t.early_stopping is not None and self.data.eval_fraction == 0:
            raise invalid("early stopping watches held-out loss: give data.eval_fraction above 0",
                          at=("training", "early_stopping"))
        updates: dict[str, Any] = {}
        if self.name is None:
            updates["name"] = self.method
        if self.lora.use_dora is None:
            updates["lora"] = self.lora.model_copy(update={"use_dora": self.method == "dora"})
        if self.method == "qlora" and self.quantization is None:
            updates["quantization"] = QuantParams()
        for key, value in updates.items():
            object.__setattr__(self, key, value)
        return self

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    @property
    def source(self) -> Path | None:
        return self._source

    def error(self, path: YamlPath, message: str, hint: str | None = None) -> ConfigError:
        """A mistake in part of this recipe found after loading (a target module the base lacks, a
        base that cannot be read): `FILE:LINE PATH: message` where that part is written."""
        return _located(message, path, self._source, self._origins, self._overridden, hint)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able resolved recipe (absolute paths), as recorded in provenance."""
        d = self.model_dump(mode="json")
        d["base"] = {"kind": self.base.kind, "ref": self.base.ref,
                     **({"revision": self.base.revision} if self.base.revision else {})}
        d["base_dir"], d["source"] = str(self.base_dir), str(self.source) if self.source else None
        return d


# ----------------------------------------------------------------------------------------------
# loading

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


Origins = dict[YamlPath, tuple[Path, int]]  # where each key of a recipe (and what it extends) is written


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None, *,
                relative_to: Path | None = None) -> Recipe:
    """Read and validate a recipe file; `overrides` win over the file (see module doc). Their
    relative paths resolve against `relative_to` (a suite's folder, for a sweep), else the cwd."""
    path = Path(path)
    raw, origins = _read(path, ())
    data = _merge(raw, overrides or {}, relative_to or Path.cwd())
    try:
        recipe = Recipe.model_validate(data, context={"base_dir": path.resolve().parent})
    except ValidationError as e:
        raise _error(e, data, path, origins, set(_dotted(overrides or {}))) from None
    recipe._base_dir, recipe._source = path.resolve().parent, path.resolve()
    recipe._origins, recipe._overridden = origins, set(_dotted(overrides or {}))
    return recipe


def _read(path: Path, chain: tuple[Path, ...]) -> tuple[dict[str, Any], Origins]:
    """A recipe file's mapping, over the recipe it `extends:` (a chain of them; its relative paths
    against its own folder), with where each key is written."""
    from evalkit.config.loader import read_yaml

    raw, lines = read_yaml(path, "recipe")
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError("a recipe must be a mapping", file=path, line=line_of(lines, ()))
    for key in raw:  # `3:` is a YAML int: no field has such a name, and `extends:` merges by name
        if not isinstance(key, str):
            raise ConfigError(f"a recipe's keys are field names, not {shown(key, 40)}", file=path,
                              line=line_of(lines, (str(key),)), path=str(key))
    origins = {key: (path, line) for key, line in lines.items()}
    if "extends" not in raw:
        return raw, origins
    parent, line = raw.pop("extends"), line_of(lines, ("extends",))
    if not isinstance(parent, str) or not parent.strip():
        raise ConfigError(f"`extends:` takes the path of another recipe, got {shown(parent, 80)}", file=path, line=line,
                          path="extends")
    file = path.parent / parent
    try:
        found = file.is_file()
    except (OSError, ValueError) as e:  # a name too long for the file system, a NUL byte
        raise ConfigError(f"not a usable path: {shown(parent, 80)} ({e})", file=path, line=line, path="extends") from None
    if not found:
        raise ConfigError(f"no recipe at {file}", file=path, line=line, path="extends")
    chain = (*chain, path.resolve())
    if file.resolve() in chain:
        names = " -> ".join(p.name for p in (*chain[chain.index(file.resolve()):], file.resolve()))
        raise ConfigError(f"`extends:` makes a cycle: {names}", file=path, line=line, path="extends")
    inherited, inherited_origins = _read(file, chain)
    return _deep_merge(_merge({}, inherited, file.resolve().parent), raw), {**inherited_origins, **origins}


def _error(e: ValidationError, data: Any, file: Path, origins: Origins, overridden: set[str]) -> ConfigError:
    path, message, hint = error_parts(e, data)
    return _located(message, path, file, origins, overridden, hint)


def _located(message: str, path: YamlPath, file: Path | None, origins: Origins, overridden: set[str],
             hint: str | None) -> ConfigError:
    ypath = fmt_path(path)
    if any(ypath == o or ypath.startswith((o + ".", o + "[")) for o in overridden):
        return ConfigError(message, file=file, path=f"{ypath} (override)", hint=hint)
    at = path
    while at not in origins and at:
        at = at[:-1]
    where, line = origins.get(at, (file, None))
    return ConfigError(message, file=where, line=line, path=ypath, hint=hint)

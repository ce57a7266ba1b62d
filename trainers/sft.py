"""Train a LoRA / QLoRA / DoRA adapter with trl's SFTTrainer, and reuse it while it is fresh.

`ensure_adapter` is the entry point: it trains only when the adapter is missing or its fingerprint
(recipe + training data + base model + library versions) changed, trains into a temp folder next
to the output and moves it into place at the end, so an interrupted run never leaves a folder that
looks finished. trl, peft, datasets and bitsandbytes are imported only when training.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from evalkit.compat import checkpointing_arg, disable_cpu_bf16_repack, trained_tokens, undo_cpu_bf16_repack
from evalkit.errors import ConfigError, ModelError, YamlPath, missing_extra
from evalkit.formatting import fmt_number
from evalkit.leakage import NORMALIZATION, find_overlap, train_index
from evalkit.memory import PeakMemory
from evalkit.models.base import ResolvedBase, load_base, resolve_base
from evalkit.types import template_hash
from trainers.checkpoints import ADAPTER_FILES, Checkpoint, Keeper, check_every, kept_checkpoints, write_checkpoints
from trainers.data import load_training_rows, read_rows, split_rows
from trainers.launch import train_launched
from trainers.provenance import (
    SCHEMA_VERSION,
    device_info,
    file_record,
    fingerprint,
    fingerprint_parts,
    read_provenance,
    recorded_versions,
    stale_reason,
    write_provenance,
)
from trainers.recipe import Recipe, TrainParams, load_recipe

Log = Callable[[str], Any]


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    reused: bool
    provenance: dict[str, Any]
    checkpoints: tuple[Checkpoint, ...] = ()  # by step; see trainers/checkpoints.py


def ensure_adapter(recipe: str | Path | Recipe, *, force: bool = False, log: Log = print,
                   overrides: dict[str, Any] | None = None, checkpoint_every: int | None = None) -> TrainResult:
    """The recipe's adapter: reused when its provenance fingerprint matches (and, with
    `checkpoint_every`, its checkpoints every that many steps are kept whole), else (re)trained."""
    check_every(checkpoint_every)
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    with _located(recipe, ("base",)):
        resolved = resolve_base(recipe.base, base_dir=recipe.base_dir)
    data_record = file_record(recipe.data.train)
    recipe_dict = recipe.to_dict()
    parts = fingerprint_parts(recipe_dict, data_record["sha256"], resolved)
    fp = fingerprint(parts)
    out = recipe.output
    old = read_provenance(out) if all((out / f).is_file() for f in ADAPTER_FILES) else None
    reason = "forced" if force else stale_reason(old, parts)
    if old is not None and old.get("fingerprint") == fp and not force:
        kept, missing = kept_checkpoints(out, old, checkpoint_every)
        if missing is None:
            log(f"reused adapter at {out} (fingerprint {fp[:12]})")
            return TrainResult(out, True, old, kept)
        reason = missing
    log(f"training {recipe.name} ({recipe.method}) into {out}: {reason}")

    rows = load_training_rows(recipe.data.train, recipe.data.template)
    leakage = check_leakage(recipe, rows, log)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()  # not mkdtemp: the finished folder keeps the usual (umask) permissions
    try:
        started = datetime.now(UTC)
        t0 = time.perf_counter()
        if recipe.launcher:  # in the processes it starts (trainers/launch.py)
            run = train_launched(recipe, resolved, tmp, log=log, checkpoint_every=checkpoint_every)
        else:
            run = train_adapter(recipe, resolved, rows, tmp, log=log, checkpoint_every=checkpoint_every)
        marks = run.pop("checkpoint_marks", [])
        provenance = {
            "schema_version": SCHEMA_VERSION,
            "fingerprint": fp,
            "fingerprint_parts": parts,
            "name": recipe.name,
            "method": recipe.method,
            "recipe_file": str(recipe.source) if recipe.source else None,
            "recipe": recipe_dict,
            "base": {"kind": recipe.base.kind, "ref": recipe.base.ref, "revision": recipe.base.revision,
                     "path": resolved.path, "sha256": resolved.sha256},
            # train_index: normalized-input hash -> training row ids, for leakage checks at evaluation
            "data": {"train": data_record, **run.pop("data"), "train_index": train_index(rows),
                     "train_index_normalization": NORMALIZATION},
            "leakage": leakage,
            "seed": recipe.seed,
            "versions": recorded_versions(),
            "started_at": started.isoformat(timespec="seconds"),
            **run,
            "wall_time_s": round(time.perf_counter() - t0, 2),
        }
        checkpoints = write_checkpoints(tmp, out, provenance, marks, t0)
        write_provenance(tmp, provenance)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"saved adapter to {out} in {provenance['wall_time_s']:.0f}s ({provenance['tokens_per_s']:.0f} tokens/s, "
        f"train loss {fmt_number(run['final_train_loss'], '.3f')}, eval loss {fmt_number(run['final_eval_loss'], '.3f')})")
    return TrainResult(out, False, provenance, checkpoints)


@contextlib.contextmanager
def _located(recipe: Recipe, path: YamlPath) -> Iterator[None]:
    """An error raised while acting on one part of the recipe (loading its base) is reported at the
    recipe's line for that part, unless it names a file of its own."""
    try:
        yield
    except ConfigError as e:
        if e.file is not None:
            raise
        raise recipe.error(path, e.message, e.hint) from None
    except ModelError as e:
        raise recipe.error(path, str(e)) from None


def check_leakage(recipe: Recipe, rows: list[dict[str, Any]], log: Log) -> list[dict[str, Any]]:
    """Eval cases of `data.check_against` files whose input also appears in the training file."""
    index = train_index(rows)
    report = []
    for path in recipe.data.check_against:
        pairs = find_overlap(read_rows(path), index)
        report.append({"file": str(path), "sha256": file_record(path)["sha256"], "overlap": len(pairs),
                       "pairs": [list(p) for p in pairs]})
        if pairs:
            shown = ", ".join(f"{e}~{t}" for e, t in pairs[:5]) + (" ..." if len(pairs) > 5 else "")
            log(f"WARNING leakage: {len(pairs)} eval case(s) of {path.name} also in the training data: {shown}")
        else:
            log(f"leakage check: no case of {path.name} appears in the training data")
    return report


def _remove_orphans(out: Path) -> None:
    """Temp folders of trainings killed before they could clean up (their process is gone)."""
    prefix = f".{out.name}.tmp-"
    for d in out.parent.glob(prefix + "*"):
        try:
            os.kill(int(d.name[len(prefix):].split("-")[0]), 0)
        except (ValueError, IndexError, ProcessLookupError):
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output exists and is not a folder: {out}")
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _import(module: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise missing_extra(module.split(".")[0], extra) from None


# ----------------------------------------------------------------------------------------------
# training


def resolve_settings(recipe: Recipe, device: str) -> dict[str, Any]:
    """The recipe's `auto` choices made concrete for this device (recorded in provenance)."""
    import torch

    t, q, cuda = recipe.training, recipe.quantization, device == "cuda"
    precision = t.precision
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    compute = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision]
    if q is not None and q.compute_dtype != "auto":
        compute = q.compute_dtype
    return {
        "device": device,
        "precision": precision,
        "dtype": compute,  # the base's non-quantized weights and the 4-bit compute dtype
        "optim": t.optim if t.optim != "auto" else ("paged_adamw_8bit" if q is not None and cuda else "adamw_torch"),
        "gradient_checkpointing": cuda if t.gradient_checkpointing == "auto" else t.gradient_checkpointing,
    }


def _processes() -> int:
    """How many processes train together: the world size a launcher (torchrun, mpirun) sets, as
    accelerate reads it; 1 in evalkit's own process."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


LOG_POINTS = 20  # train-loss points a run logs by default: enough for training_health to see a trend
EVAL_POINTS = 4  # held-out evaluations a run makes by default (each a forward over the held-out rows)


def total_steps(t: TrainParams, train_rows: int, processes: int = 1) -> int:
    """The optimizer steps a run will take: max_steps, else epochs x batches per epoch (each
    process of a launcher takes a batch per step)."""
    if t.max_steps:
        return t.max_steps
    return max(1, math.ceil(t.epochs * math.ceil(train_rows / (t.batch_size * t.grad_accum * processes))))


def step_schedule(t: TrainParams, train_rows: int, processes: int = 1) -> dict[str, int]:
    """Total steps and the logging / eval intervals: the recipe's when given, else scaled to the
    run's length, so a 10-step run logs every step instead of at steps 1 and 10 only."""
    total = total_steps(t, train_rows, processes)
    return {"total_steps": total, "logging_steps": t.logging_steps or max(1, total // LOG_POINTS),
            "eval_steps": t.eval_steps or max(1, total // EVAL_POINTS)}


def guard_4bit_for_training(model) -> int:
    """Make a 4-bit base safe to train on CPU whatever ran before: turn off the AVX512-BF16 repack
    (see `disable_cpu_bf16_repack`) and undo it on layers an earlier no-grad forward already
    repacked, whose gradients would otherwise be silently wrong. Returns how many were undone."""
    disable_cpu_bf16_repack(model)
    return sum(undo_cpu_bf16_repack(module) for module in model.modules())


def _warn_raw_prompts(recipe: Recipe, rows: list[dict[str, Any]], tok, log: Log) -> None:
    """`prompt` text trained raw on a base that has a chat template: likely a chat model fed the
    wrong format, which nothing else would say (evaluation warns the same way)."""
    from evalkit.rows import raw_prompt_hint

    if recipe.data.template == "auto" and isinstance(rows[0]["prompt"], str) and getattr(tok, "chat_template", None):
        warning = recipe.error(("data", "train"), "the rows are `prompt` text, trained raw, but the base has a chat "
                                                  "template: an instruct model learns from chats",
                               hint=raw_prompt_hint("data.template"))
        log(f"WARNING: {warning}")


def train_adapter(recipe: Recipe, resolved: ResolvedBase, rows: list[dict[str, Any]], out_dir: Path, *,
                  model=None, log: Log = print, checkpoint_every: int | None = None) -> dict[str, Any]:
    """Train and save the adapter (+ tokenizer and chat template) into `out_dir`; returns the run
    record for provenance. `model` may be a base already loaded in this process (for QLoRA: in 4 bits).
    `checkpoint_every`: also keep the adapter of every that many steps (trainers/checkpoints.py)."""
    import torch

    libs = _training_libraries()
    from transformers import set_seed

    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = resolve_settings(recipe, device)
    _check_quantization(recipe)
    set_seed(recipe.seed)
    model, tok = _model_for_training(recipe, resolved, rows, settings, model, libs.peft, log)
    check_target_modules(recipe, model)
    _pad_as_recipe(tok, recipe)
    _warn_raw_prompts(recipe, rows, tok, log)
    train_rows, eval_rows = split_rows(rows, recipe.data.eval_fraction, recipe.seed)
    settings["processes"] = _processes()
    settings |= step_schedule(recipe.training, len(train_rows), settings["processes"])
    stopping = recipe.training.early_stopping
    try:
        trainer = _sft_trainer(libs, model, tok, _sft_config(libs.trl, recipe, settings, out_dir, bool(eval_rows)),
                               _lora_config(libs.peft, recipe), train_rows, eval_rows,
                               collator=_classic_collator(tok, log) if recipe.training.collator == "language_modeling"
                               else None)
    except ValueError as e:  # peft's, on target modules it cannot adapt (checked above: a net for what that misses)
        if not isinstance(e, libs.peft.utils.NoMatchingPeftModuleError) and "Target module" not in str(e):
            raise
        raise recipe.error(("lora", "target_modules"),
                           f"peft: {str(e).splitlines()[0].rstrip('.')}; {_linear_modules_text(model)}") from None
    if len(trainer.train_dataset) == 0:  # trl drops rows whose completion max_length cut off entirely
        raise recipe.error(("training", "max_length"),
                           f"no training row fits in max_length {recipe.training.max_length} tokens with its answer")
    if recipe.quantization is not None and settings["dtype"] == "float32":
        _keep_adapter_float32(trainer)
    _log_steps(trainer, log)
    if stopping is not None:
        from transformers import EarlyStoppingCallback

        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=stopping.patience,
                                                   early_stopping_threshold=stopping.threshold))
    keeper = Keeper(checkpoint_every, out_dir) if checkpoint_every else None
    if keeper is not None:
        trainer.add_callback(keeper.callback(trainer, tok))
    # with early stopping the model at the end is the best checkpoint, already evaluated
    measured = _train(trainer, device, final_eval=bool(eval_rows) and stopping is None)

    if trainer.is_world_process_zero():  # one writer when a launcher runs several processes
        trainer.model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)  # tokenizer + chat_template.jinja: the template evaluation must use
    if keeper is not None:
        keeper.evaluate(trainer)  # each checkpoint's held-out loss, in the log before the curve is read
    trainer.accelerator.wait_for_everyone()  # no process still reads _trainer (early stopping's best checkpoint)
    shutil.rmtree(out_dir / "_trainer", ignore_errors=True)
    curve = _loss_curve(trainer.state.log_history)
    kept = _early_stopping_record(trainer, recipe) if stopping is not None else None
    if kept is not None:
        log(f"early stopping kept the checkpoint of step {kept['best_step']} ({kept['metric']} "
            f"{fmt_number(kept['best_metric'], '.4f')}) of {trainer.state.global_step}")
    return {
        "data": {"train_rows": len(train_rows), "eval_rows": len(eval_rows), "format":
                 "text" if isinstance(rows[0]["prompt"], str) else "chat",
                 "prompt_tokens": prompt_tokens(tok, rows, recipe.seed)},
        "chat_template_sha256": template_hash(tok),
        "chat_template_file": "chat_template.jinja" if (out_dir / "chat_template.jinja").is_file() else None,
        "settings": settings,
        "device": device_info(device),
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0, 3),
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        **measured,
        "final_train_loss": next((c["loss"] for c in reversed(curve) if "loss" in c), None),
        "final_eval_loss": (kept["best_metric"] if kept and stopping and stopping.metric == "eval_loss" else
                            next((c["eval_loss"] for c in reversed(curve) if "eval_loss" in c), None)),
        "early_stopping": kept,
        "log": curve,
        **(keeper.record() if keeper is not None else {}),
    }


def _early_stopping_record(trainer, recipe: Recipe) -> dict[str, Any]:
    """What early stopping did, for provenance: the saved adapter is the checkpoint of `best_step`."""
    stopping, state = recipe.training.early_stopping, trainer.state
    assert stopping is not None  # called with early stopping
    return {**stopping.model_dump(), "best_step": state.best_global_step, "best_metric": state.best_metric,
            "stopped_at_step": state.global_step, "stopped_early": state.global_step < state.max_steps}


MAX_RECORDED_PROMPTS = 10_000


def prompt_tokens(tok, rows: list[dict[str, Any]], seed: int) -> list[int]:
    """Each training prompt's length in tokens as evaluation renders it (the chat template with the
    generation prompt), for the length_match check; a seeded sample of MAX_RECORDED_PROMPTS rows
    of a larger file."""
    import random

    from evalkit.backends.base import encode, render_prompt
    from evalkit.types import Case

    if len(rows) > MAX_RECORDED_PROMPTS:
        rows = random.Random(seed).sample(rows, MAX_RECORDED_PROMPTS)
    cases = (Case(r["id"], prompt=r["prompt"]) if isinstance(r["prompt"], str) else
             Case(r["id"], messages=tuple(r["prompt"])) for r in rows)
    return [len(encode(tok, render_prompt(tok, c)).ids) for c in cases]


def _pad_as_recipe(tok, recipe: Recipe) -> None:
    """The recipe's `pad_token` (`eos`: the guides' `tokenizer.pad_token = tokenizer.eos_token`) and
    `padding_side`, set on the tokenizer every collator pads with."""
    t = recipe.training
    if t.pad_token is not None:
        token = tok.eos_token if t.pad_token == "eos" else t.pad_token
        if token not in tok.get_vocab():
            raise recipe.error(("training", "pad_token"), f"pad token {token!r} is not in the vocabulary of the base's "
                               "tokenizer", hint="give `eos` or a token it has")
        tok.pad_token = token
    if t.padding_side is not None:
        tok.padding_side = t.padding_side


def _classic_collator(tok, log: Log):
    """transformers' DataCollatorForLanguageModeling(mlm=False), as the guides use it: labels are
    the input ids with every pad id set to -100, so with pad = eos the end of turn is never learned."""
    from transformers import DataCollatorForLanguageModeling

    if tok.pad_token_id is not None and tok.pad_token_id == tok.eos_token_id:
        log(f"WARNING: pad token is the EOS token ({tok.eos_token!r}) and the language_modeling collator labels "
            f"every pad id -100: EOS is masked out of the loss, so the adapter may never learn to stop "
            f"(evalkit's stops_generating check catches it)")
    classic = DataCollatorForLanguageModeling(tok, mlm=False)
    return lambda features: classic([{"input_ids": f["input_ids"]} for f in features])


@dataclass(frozen=True)
class _Libraries:
    trl: Any
    datasets: Any
    peft: Any


def _training_libraries() -> _Libraries:
    """trl, datasets and peft, imported only when training (a missing one names the extra)."""
    return _Libraries(_import("trl", "train"), _import("datasets", "train"), _import("peft", "train"))


def _check_quantization(recipe: Recipe) -> None:
    """QLoRA here means an NF4 base with double quantization, through bitsandbytes."""
    if recipe.quantization is None:
        return
    _import("bitsandbytes", "quant")
    if recipe.quantization.quant_type != "nf4" or not recipe.quantization.double_quant:
        raise recipe.error(("quantization",), "this runner trains QLoRA on an NF4 base with double quantization")


def _model_for_training(recipe: Recipe, resolved: ResolvedBase, rows: list[dict[str, Any]], settings: dict[str, Any],
                        model, peft, log: Log):
    """(model, tokenizer): the base loaded for training (or the one given), made safe to train in 4 bits."""
    import torch

    quantized = recipe.quantization is not None
    with _located(recipe, ("base",)):
        if model is None:
            model, tok = load_base(resolved, quantize="nf4" if quantized else None,
                                   dtype=getattr(torch, settings["dtype"]), device=settings["device"])
        else:
            from evalkit.models.base import load_tokenizer

            tok = load_tokenizer(resolved)
    if tok.chat_template is None and not isinstance(rows[0]["prompt"], str):
        raise recipe.error(("base",), f"base '{resolved.spec.ref}' has no chat template, and the rows of "
                           f"{recipe.data.train.name} are chat messages",
                           hint="give prompt/completion rows, or a base whose tokenizer has a chat template")
    if quantized:
        if undone := guard_4bit_for_training(model):
            log(f"undid the CPU bf16 repack on {undone} 4-bit layers (a no-grad forward ran before training)")
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=settings["gradient_checkpointing"])
    return model, tok


def _sft_config(trl, recipe: Recipe, settings: dict[str, Any], out_dir: Path, has_eval: bool):
    """trl's SFTConfig from the recipe's `training` block; an option trl rejects is a ConfigError there.
    Early stopping saves a checkpoint at every evaluation (weights only) to load the best at the end."""
    t = recipe.training
    stopping = t.early_stopping
    saving = ({"save_strategy": "steps", "save_steps": settings["eval_steps"], "save_only_model": True,
               "load_best_model_at_end": True, "metric_for_best_model": stopping.metric,
               "greater_is_better": stopping.metric != "eval_loss"} if stopping is not None
              else {"save_strategy": "no"})
    try:
        return trl.SFTConfig(
            output_dir=str(out_dir / "_trainer"), report_to="none", disable_tqdm=True, **saving,
            seed=recipe.seed, data_seed=recipe.seed, use_cpu=settings["device"] == "cpu",
            num_train_epochs=t.epochs, max_steps=t.max_steps or -1,
            per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.batch_size,
            gradient_accumulation_steps=t.grad_accum, learning_rate=t.learning_rate,
            lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio
            weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, optim=settings["optim"],
            bf16=settings["precision"] == "bf16", fp16=settings["precision"] == "fp16",
            **{checkpointing_arg(trl.SFTConfig): settings["gradient_checkpointing"]},
            logging_steps=settings["logging_steps"], logging_first_step=True,
            eval_strategy="steps" if has_eval else "no", eval_steps=settings["eval_steps"],
            eval_on_start=has_eval,  # the base's held-out loss (step 0): what training_health measures learning by
            max_length=t.max_length, completion_only_loss=t.completion_only_loss)
    except ValueError as e:  # e.g. an unknown optim or scheduler name
        raise recipe.error(("training",), str(e).splitlines()[0]) from None


def _lora_config(peft, recipe: Recipe):
    lora = recipe.lora
    try:
        return peft.LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, use_dora=lora.use_dora, bias="none",
            target_modules=lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules),
            task_type="CAUSAL_LM")
    except ValueError as e:  # a combination peft refuses
        raise recipe.error(("lora",), str(e).splitlines()[0]) from None


# layers LoRA can adapt (peft.tuners.lora refuses any other), by class name: transformers' Conv1D
# (GPT-2) and bitsandbytes' 4-bit and 8-bit layers (subclasses of Linear) included
_LORA_LAYERS = ("Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "Conv1D", "MultiheadAttention")
_LINEAR_LAYERS = ("Linear", "Conv1D")


def _is_layer(module, kinds: tuple[str, ...]) -> bool:
    return any(c.__name__ in kinds for c in type(module).__mro__)


def _linear_modules_text(model) -> str:
    names = dict.fromkeys(name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                          if name and _is_layer(m, _LINEAR_LAYERS))
    return f"its linear modules are {', '.join(names)}" if names else "it has no linear module"


def check_target_modules(recipe: Recipe, model) -> None:
    """Every name in `lora.target_modules` must match a layer of the base that LoRA can adapt, as
    peft matches them (a name: a module path or its last parts; a string: a regex of the whole
    path), before training starts. peft refuses only when none matches, and skips a misspelled
    name among good ones without a word."""
    targets = recipe.lora.target_modules
    if targets == "all-linear":
        return
    modules = [(name, m) for name, m in model.named_modules() if name]
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise recipe.error(("lora", "target_modules"), f"{targets!r} is not a valid regular expression ({e})",
                               hint="give a list of module names, or all-linear") from None
        if not any(pattern.fullmatch(name) and _is_layer(m, _LORA_LAYERS) for name, m in modules):
            raise recipe.error(("lora", "target_modules"), f"{targets!r} matches no layer of the base LoRA can adapt "
                               f"(a string is a regex of whole module paths); {_linear_modules_text(model)}",
                               hint="give a list of module names, or all-linear")
        return
    matched = {t: [m for name, m in modules if name == t or name.endswith("." + t)] for t in targets}
    missing = [t for t, ms in matched.items() if not ms]
    if missing:
        raise recipe.error(("lora", "target_modules"),
                           f"{missing} not found in the base; {_linear_modules_text(model)}")
    unfit = {t: type(ms[0]).__name__ for t, ms in matched.items() if not any(_is_layer(m, _LORA_LAYERS) for m in ms)}
    if unfit:
        shown = ", ".join(f"'{t}' is a {kind}" for t, kind in unfit.items())
        raise recipe.error(("lora", "target_modules"), f"LoRA adapts linear, embedding and convolution layers: "
                           f"{shown}; {_linear_modules_text(model)}")


def _sft_trainer(libs: _Libraries, model, tok, args, peft_config, train_rows: list[dict[str, Any]],
                 eval_rows: list[dict[str, Any]], collator=None):
    """trl's SFTTrainer on prompt/completion datasets, without datasets' progress bars while it maps them."""
    def as_dataset(rs: list[dict[str, Any]]):
        return libs.datasets.Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rs])

    datasets_bars = libs.datasets.is_progress_bar_enabled()
    libs.datasets.disable_progress_bars()
    try:
        return libs.trl.SFTTrainer(model=model, args=args, train_dataset=as_dataset(train_rows),
                                   eval_dataset=as_dataset(eval_rows) if eval_rows else None,
                                   processing_class=tok, peft_config=peft_config, data_collator=collator)
    finally:
        if datasets_bars:
            libs.datasets.enable_progress_bars()


def _keep_adapter_float32(trainer) -> None:
    """trl casts QLoRA adapter weights to bf16 (the paper's GPU recipe); with a float32 compute
    dtype (CPU) that only loses precision in the updates, so keep them in float32."""
    import torch

    for p in trainer.model.parameters():
        if p.requires_grad and p.dtype == torch.bfloat16:
            p.data = p.data.float()


def _log_steps(trainer, log: Log) -> None:
    """Log train / eval loss per logging step in one short line (instead of trl's raw dicts)."""
    from transformers import PrinterCallback, TrainerCallback

    class LogCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            shown = [f"{k} {logs[k]:.4f}" for k in ("loss", "eval_loss") if k in (logs or {})]
            if shown:
                log(f"  step {state.global_step}/{state.max_steps}: " + ", ".join(shown))

    trainer.remove_callback(PrinterCallback)  # prints raw dicts; LogCallback says it shorter
    trainer.add_callback(LogCallback())


def _train(trainer, device: str, *, final_eval: bool) -> dict[str, Any]:
    """Run training (and the held-out loss of the final adapter, when the last step logged none);
    returns its time, tokens and peak memory for the run record."""
    with PeakMemory(device) as peak:
        t0, cpu0 = time.perf_counter(), time.process_time()
        trainer.train()
        train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
        history = trainer.state.log_history
        if final_eval and not any(h.get("step") == trainer.state.global_step and "eval_loss" in h for h in history):
            trainer.evaluate()
    tokens = trained_tokens(trainer, history)
    return {
        "train_time_s": round(train_s, 2),
        "train_cpu_time_s": round(train_cpu_s, 2),  # all threads; on a busy shared machine wall time says less
        "train_tokens": int(tokens),
        "tokens_per_s": round(tokens / train_s, 1) if train_s > 0 else 0.0,
        "peak_memory_mb": round(peak.mb, 1),
        "peak_memory_kind": peak.source,  # see evalkit/memory.py
    }


def _loss_curve(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Train and held-out eval loss (and lr, accuracy) per logging step, merged by step."""
    keep = ("loss", "eval_loss", "learning_rate", "grad_norm", "mean_token_accuracy", "eval_mean_token_accuracy")
    by_step: dict[int, dict[str, Any]] = {}
    for h in history:
        vals = {k: round(float(h[k]), 6) for k in keep if k in h}
        if vals:
            entry = by_step.setdefault(h["step"], {"step": h["step"], "epoch": round(h.get("epoch", 0), 4)})
            entry.update(vals)
    return [by_step[s] for s in sorted(by_step)]


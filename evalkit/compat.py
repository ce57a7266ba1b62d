"""Every use evalkit makes of a private or unstable third-party API, in one place.

Each function says which versions it was checked on and why evalkit needs it; tests/test_compat.py
fails loudly (naming the function) when an upgrade removes or reshapes what it relies on. The
tested version ranges are pinned in pyproject.toml (tests/test_compat.py checks the installed
versions are inside them). Checked on: lm-eval 0.4.13, transformers 5.24, trl 1.16, peft 0.21,
bitsandbytes 0.50.

Nothing here imports a heavy library at module import time.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

# ---------------------------------------------------------------- lm-eval

# The hook TemplateLM.loglikelihood hands its tokenized requests to (lm-eval 0.4.13).
TEMPLATE_LM_HOOK = "_loglikelihood_tokens"


@contextlib.contextmanager
def lm_eval_task_progress_off() -> Iterator[None]:
    """Silence the progress bar lm-eval's `Task.build_all_requests` draws for every task.

    Why: the canary runs up to 57 generated tasks (one per MMLU subject), so lm-eval would draw 57
    "Building contexts" bars per variant; it offers no switch, so the module-level `tqdm` name it
    calls is swapped for one with `disable=True` while the block runs. Checked on lm-eval 0.4.13
    (`lm_eval/api/task.py`: `from tqdm import tqdm`, called by name).
    """
    import lm_eval.api.task as lm_task

    bar = lm_task.tqdm
    lm_task.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        lm_task.tqdm = bar


# ---------------------------------------------------------------- bitsandbytes

def disable_cpu_bf16_repack(model: Any) -> int:
    """Turn off bitsandbytes' AVX512-BF16 repack of 4-bit weights on every Linear4bit of `model`;
    returns how many layers were touched (0 without bitsandbytes).

    Why: on AVX512-BF16 CPUs, Linear4bit repacks its weight at the first no-grad forward (eval),
    after which gradients through the frozen layers are silently wrong (QLoRA learns nothing).
    The switch is the undocumented instance attribute `support_avx512bf16_for_cpu` that
    `Linear4bit.forward` reads. Checked on bitsandbytes 0.50.2.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def undo_cpu_bf16_repack(module: Any) -> bool:
    """Restore the standard 4-bit layout of a Linear4bit that an earlier no-grad forward already
    repacked for AVX512-BF16; True if it did. Other modules are left alone.

    Why: see `disable_cpu_bf16_repack`; a base evaluated before training in the same process may
    already be repacked. Uses the private `bitsandbytes.functional._convert_weight_packed_for_cpu_inverse`
    (the one bitsandbytes itself calls before saving) and the `packing_format_for_cpu` flag on the
    weight's QuantState. Checked on bitsandbytes 0.50.2.
    """
    import bitsandbytes as bnb

    state = getattr(getattr(module, "weight", None), "quant_state", None)
    if not (isinstance(module, bnb.nn.Linear4bit) and state is not None and getattr(state, "packing_format_for_cpu", False)):
        return False
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    # bitsandbytes annotates Linear4bit.weight as a Parameter; it is a Params4bit, which has quant_state
    module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)  # type: ignore[attr-defined]
    return True


# ---------------------------------------------------------------- trl / transformers

def trained_tokens(trainer: Any, history: Sequence[Mapping[str, Any]]) -> int:
    """Tokens trl's SFTTrainer trained on (for tokens/s in the provenance).

    Why: trl keeps the running count in the private `SFTTrainer._total_train_tokens` (set to 0 in
    `__init__`, increased per batch in `compute_loss`) and logs it only as the `num_tokens` metric
    of each logging step; the attribute is exact at the end, the log is the fallback. Checked on
    trl 1.16.
    """
    return int(getattr(trainer, "_total_train_tokens", None) or max((h.get("num_tokens", 0) for h in history), default=0))


def checkpointing_arg(config_cls: type) -> str:
    """The name of the activation (gradient) checkpointing switch of a TrainingArguments dataclass.

    Why: transformers 5 renamed `gradient_checkpointing` to `activation_checkpointing` and keeps the
    old name as a deprecated alias that warns; earlier releases know only the old name. Checked on
    transformers 5.24 with trl 1.16's SFTConfig.
    """
    fields = getattr(config_cls, "__dataclass_fields__", {})
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


def kv_cache_arg() -> str:
    """The name under which a transformers forward takes and returns the KV cache.

    Why: transformers 5.x renamed `past_key_values` to `cache` (in the forward's arguments and in
    `CausalLMOutputWithPast`) and keeps the old name as a deprecated alias that warns on every
    call; earlier 5.x releases know only the old name. `evalkit serve` runs its own decode loop, so
    it passes the cache itself. Checked on transformers 5.24.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


def select_cache_rows(cache: Any, rows: Any) -> bool:
    """Keep only `rows` (a 1-D index tensor) of a KV cache's batch, in place; False when this cache
    type cannot (then the caller keeps computing finished rows).

    Why: `Cache.batch_select_indices` is transformers' own tool for dropping beams (contrastive
    search used it) but not documented for users; `evalkit serve` uses it to stop spending compute
    on a request that finished or was cancelled while others in its batch go on. Checked on
    transformers 5.24 (DynamicCache).
    """
    select = getattr(cache, "batch_select_indices", None)
    if select is None:
        return False
    try:
        select(rows)
    except (NotImplementedError, AttributeError, TypeError):
        return False
    return True


def unmark_gguf_quantized(model: Any) -> None:
    """Let `save_pretrained` write a model loaded from a GGUF file as a plain model.

    Why: transformers dequantizes GGUF weights to float tensors on load but leaves the model
    marked as quantized (`model.hf_quantizer`, `config.quantization_config`) and so refuses to
    save it. evalkit converts a GGUF once into a safetensors folder (reloads are ~16 s faster), so
    it drops the marker. Checked on transformers 5.24.
    """
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _version(dist: str) -> str:
    from evalkit.environment import package_versions

    return package_versions([dist])[dist] or "not installed"

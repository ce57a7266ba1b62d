"""Canaries for the third-party internals evalkit.compat relies on, and for the tested version pins.

Each test fails with a message naming the evalkit.compat function whose assumption broke, so an
upgrade (a CI that resolved newer versions) says what to re-check instead of misbehaving later.
Fast: no model is loaded (the bitsandbytes round trip uses one 64x64 layer).
"""
from __future__ import annotations

import importlib.metadata
import inspect
import re
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from evalkit import compat

REPO = Path(__file__).resolve().parent.parent
PINNED = ("lm-eval", "transformers", "trl", "peft", "bitsandbytes")


# ---------------------------------------------------------------- lm-eval

def test_template_lm_routes_loglikelihood_through_the_hook_the_canary_implements():
    """The canary's BackendLM (evalkit.tasks.mmlu) is a TemplateLM: TemplateLM.loglikelihood
    tokenizes with _encode_pair and calls self._loglikelihood_tokens(requests, disable_tqdm=...)
    with ((ctx, cont), ctx_tokens, cont_tokens), an abstract method lm-eval's own LMs implement."""
    from lm_eval.api.model import TemplateLM

    assert compat.TEMPLATE_LM_HOOK in TemplateLM.__abstractmethods__, (
        "compat.TEMPLATE_LM_HOOK: TemplateLM no longer declares _loglikelihood_tokens")
    seen = []

    class Probe(TemplateLM):
        eot_token_id = 0

        def tok_encode(self, string, add_special_tokens=None, **kwargs):
            return [len(string)]

        def _encode_pair(self, context, continuation):
            return [len(context)], [len(continuation)]  # 10 and 2

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
            seen.append((requests, disable_tqdm))
            return [(-1.0, True)] * len(requests)

        loglikelihood_rolling = generate_until = None  # type: ignore[assignment]

    instances = [SimpleNamespace(args=("Q?\nAnswer:", " A"), task_name="t"),
                 SimpleNamespace(args=("Q?\nAnswer:", " B"), task_name="t")]
    assert Probe().loglikelihood(instances, disable_tqdm=True) == [(-1.0, True)] * 2
    assert seen == [([(("Q?\nAnswer:", " A"), [10], [2]), (("Q?\nAnswer:", " B"), [10], [2])], True)], (
        "compat.TEMPLATE_LM_HOOK: loglikelihood no longer hands ((context, continuation), context tokens, "
        "continuation tokens) to _loglikelihood_tokens")


def test_lm_eval_task_module_calls_tqdm_by_name():
    """compat.lm_eval_task_progress_off swaps lm_eval.api.task.tqdm, which Task.build_all_requests calls."""
    import lm_eval.api.task as lm_task
    from lm_eval.api.task import Task

    assert hasattr(lm_task, "tqdm"), "compat.lm_eval_task_progress_off: lm_eval.api.task has no tqdm"
    assert re.search(r"\btqdm\(", inspect.getsource(Task.build_all_requests)), (
        "compat.lm_eval_task_progress_off: Task.build_all_requests no longer calls tqdm(...) by name")
    bar = lm_task.tqdm
    with compat.lm_eval_task_progress_off():
        assert lm_task.tqdm(range(3)).disable is True
    assert lm_task.tqdm is bar


# ---------------------------------------------------------------- bitsandbytes

@pytest.fixture
def linear4bit():
    import bitsandbytes as bnb
    import torch

    torch.manual_seed(0)
    weight = torch.randn(64, 64)
    module = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    module.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", module=module)
    return module.to("cpu").eval()  # quantizes


def test_bnb_cpu_repack_switch_is_read_by_forward(linear4bit):
    """compat.disable_cpu_bf16_repack sets the attribute Linear4bit.forward checks before repacking."""
    import bitsandbytes as bnb
    import torch

    assert hasattr(linear4bit, "support_avx512bf16_for_cpu"), (
        "compat.disable_cpu_bf16_repack: Linear4bit has no support_avx512bf16_for_cpu")
    forward = inspect.getsource(bnb.nn.Linear4bit.forward)
    assert "support_avx512bf16_for_cpu" in forward and "packing_format_for_cpu" in forward, (
        "compat.disable_cpu_bf16_repack: Linear4bit.forward no longer decides the CPU repack the way it did")
    assert compat.disable_cpu_bf16_repack(torch.nn.Sequential(linear4bit, torch.nn.Linear(2, 2))) == 1
    with torch.no_grad():
        linear4bit(torch.randn(2, 64))
    assert not getattr(linear4bit.weight.quant_state, "packing_format_for_cpu", False)


def test_bnb_repack_inverse_round_trips(linear4bit):
    """compat.undo_cpu_bf16_repack: bitsandbytes.functional._convert_weight_packed_for_cpu_inverse
    exists with (packed_weight, quant_state, ...) and restores the standard 4-bit layout."""
    import bitsandbytes.functional as F
    import torch

    fn = getattr(F, "_convert_weight_packed_for_cpu_inverse", None)
    assert fn is not None, "compat.undo_cpu_bf16_repack: bitsandbytes.functional._convert_weight_packed_for_cpu_inverse is gone"
    assert tuple(inspect.signature(fn).parameters)[:2] == ("packed_weight", "quant_state")
    x = torch.randn(3, 64)
    with torch.enable_grad():  # a forward with grad never repacks
        expected = linear4bit(x.requires_grad_()).detach()
    original = linear4bit.weight.data.clone()
    assert compat.undo_cpu_bf16_repack(linear4bit) is False  # nothing to undo
    linear4bit.weight.data, linear4bit.weight.quant_state = F._convert_weight_packed_for_cpu(
        linear4bit.weight.data, linear4bit.weight.quant_state)  # what a no-grad forward does on AVX512-BF16
    assert compat.undo_cpu_bf16_repack(linear4bit) is True
    assert torch.equal(linear4bit.weight.data, original) and not linear4bit.weight.quant_state.packing_format_for_cpu
    with torch.enable_grad():
        assert torch.allclose(linear4bit(x).detach(), expected, rtol=0.01, atol=0.01)  # absmax went through bf16
    assert compat.undo_cpu_bf16_repack(torch.nn.Linear(2, 2)) is False


# ---------------------------------------------------------------- trl / transformers

def test_trl_sft_trainer_counts_train_tokens():
    """compat.trained_tokens reads SFTTrainer._total_train_tokens (and the logged num_tokens)."""
    import trl

    source = inspect.getsource(trl.SFTTrainer)
    assert re.search(r"self\._total_train_tokens\s*=\s*0", inspect.getsource(trl.SFTTrainer.__init__)), (
        "compat.trained_tokens: SFTTrainer.__init__ no longer sets _total_train_tokens")
    assert re.search(r"self\._total_train_tokens\s*\+=", source), (
        "compat.trained_tokens: SFTTrainer no longer adds each batch's tokens to _total_train_tokens")
    assert '"num_tokens"' in source, "compat.trained_tokens: SFTTrainer no longer logs num_tokens"
    assert compat.trained_tokens(SimpleNamespace(_total_train_tokens=7), []) == 7
    assert compat.trained_tokens(SimpleNamespace(), [{"num_tokens": 3}, {"loss": 1.0}, {"num_tokens": 9.0}]) == 9


def test_checkpointing_arg_names_a_field_of_sft_config():
    import trl

    name = compat.checkpointing_arg(trl.SFTConfig)
    assert name in trl.SFTConfig.__dataclass_fields__
    assert name == "activation_checkpointing"  # transformers 5: the old name is a deprecated alias
    assert compat.checkpointing_arg(type("Old", (), {"__dataclass_fields__": {"gradient_checkpointing": 0}})) == (
        "gradient_checkpointing")


def test_gguf_quantized_marker_is_hf_quantizer(tmp_path):
    """compat.unmark_gguf_quantized: save_pretrained refuses a model whose `hf_quantizer` is not
    serializable (as after a GGUF load) and saves it once the marker is dropped."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    model.hf_quantizer = SimpleNamespace(quantization_config=SimpleNamespace(quant_method="gguf"))
    model.config.quantization_config = {"quant_method": "gguf"}
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "refused")
    compat.unmark_gguf_quantized(model)
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file() and not hasattr(model.config, "quantization_config")


def test_kv_cache_arg_is_what_a_causal_lm_takes_and_returns():
    """compat.kv_cache_arg names the forward's cache argument and the output's cache field."""
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    name = compat.kv_cache_arg()
    assert name in CausalLMOutputWithPast.__dataclass_fields__, f"compat.kv_cache_arg: output has no {name}"
    assert name in inspect.signature(LlamaForCausalLM.forward).parameters, f"compat.kv_cache_arg: forward takes no {name}"


def test_select_cache_rows_drops_batch_rows_of_a_dynamic_cache():
    """compat.select_cache_rows: Cache.batch_select_indices keeps the given rows, in place."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    keys = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 4, 8).contiguous()
    cache.update(keys, keys.clone(), 0)
    assert compat.select_cache_rows(cache, torch.tensor([0, 2])) is True
    kept = cache.layers[0].keys
    assert kept.shape[0] == 2 and kept[:, 0, 0, 0].tolist() == [0.0, 2.0]
    assert compat.select_cache_rows(object(), torch.tensor([0])) is False  # a cache that cannot


def test_no_private_third_party_api_outside_compat():
    """The private names above are used nowhere else (the lm-eval LM's override of TemplateLM's hook,
    which must be defined on the class, aside)."""
    private = (r"_convert_weight_packed_for_cpu", r"support_avx512bf16_for_cpu", r"_total_train_tokens",
               r"\bhf_quantizer\b", r"task\.tqdm\b", r"SFTConfig\.__dataclass_fields__", r"\._name_or_path\b")
    for path in [*REPO.glob("evalkit/**/*.py"), *REPO.glob("trainers/**/*.py")]:
        if path.name == "compat.py":
            continue
        text = path.read_text()
        for pattern in private:
            assert not re.search(pattern, text), f"{path.relative_to(REPO)} matches {pattern}: move it into evalkit/compat.py"
        if path.name != "harness_lm.py":
            assert "_loglikelihood_tokens" not in text, path


# ---------------------------------------------------------------- version pins

def declared_requirements() -> list[str]:
    """What evalkit declares: the checkout's pyproject.toml when the tests run from a source tree
    (an editable install's metadata can lag behind it), else the installed distribution's metadata."""
    pyproject = REPO / "pyproject.toml"
    if pyproject.is_file():
        project = tomllib.loads(pyproject.read_text())["project"]
        if project["name"] == "evalkit":
            return [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    return importlib.metadata.requires("evalkit") or []


def test_tested_libraries_are_pinned_from_above():
    from packaging.requirements import Requirement

    reqs = {Requirement(r).name: Requirement(r) for r in declared_requirements()}
    for name in PINNED:
        uppers = [s for s in reqs[name].specifier if s.operator in ("<", "<=", "==", "~=")]
        assert uppers, f"{name} is not pinned from above in pyproject.toml ({reqs[name]})"


def outside_declared_ranges(version_of=importlib.metadata.version) -> list[str]:
    """One line per installed requirement whose version evalkit's declared range excludes."""
    from packaging.requirements import Requirement

    outside = []
    for text in declared_requirements():
        req = Requirement(text)
        if req.name == "evalkit":
            continue
        try:
            installed = version_of(req.name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an extra this environment does not install
        if not req.specifier.contains(installed, prereleases=True):
            outside.append(f"{req.name} {installed} is outside evalkit's tested range '{req.specifier}'")
    return outside


def test_installed_versions_are_within_the_declared_ranges():
    outside = outside_declared_ranges()
    assert not outside, ("; ".join(outside) + ". Re-run the tests on the new version (tests/test_compat.py checks the "
                         "private APIs evalkit.compat relies on), then move the bound in pyproject.toml.")


def test_a_newer_release_is_named():
    def newer_transformers(name: str) -> str:
        return "5.25.0" if name == "transformers" else importlib.metadata.version(name)

    assert outside_declared_ranges(newer_transformers) == [
        "transformers 5.25.0 is outside evalkit's tested range '<5.25,>=5.0'"]

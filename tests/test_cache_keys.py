"""Every component of every cache key: changing it must change the key (so the cached result is
not reused), and what is deliberately left out must not. Dropping a component from a key makes
its test here fail."""
from __future__ import annotations

from pathlib import Path

import pytest
from helpers import variant

from evalkit.cache import adapter_active_key, drift_key, generation_key, loglikelihood_key
from evalkit.config.suite import GenerationConfig
from evalkit.context import variant_fingerprint
from evalkit.judge.client import JudgeClient, JudgeConfig
from evalkit.models.adapters import AdapterInfo
from evalkit.models.base import BaseSpec, ResolvedBase


def assert_each_changes(key, base: dict, changes: dict, same: dict | None = None) -> None:
    ref = key(**base)
    for name, value in changes.items():
        assert key(**{**base, name: value}) != ref, f"changing {name} must change the key"
    for name, value in (same or {}).items():
        assert key(**{**base, name: value}) == ref, f"{name} is not part of the key"


def test_generation_key():
    gen = GenerationConfig(max_new_tokens=64, stop=("\n",), batch_size=8)
    assert_each_changes(generation_key, {"model": "fp", "gen": gen, "prompt": "p"},
                        {"model": "fp2", "prompt": "p ",
                         "gen": GenerationConfig(max_new_tokens=65, stop=("\n",), batch_size=8)})
    assert_each_changes(generation_key, {"model": "fp", "gen": gen, "prompt": "p"},
                        {"gen": GenerationConfig(max_new_tokens=64, stop=("\n", "}"), batch_size=8)},
                        # greedy outputs do not depend on the batch (test_e2e compares batch 1 with batch N)
                        same={"gen": GenerationConfig(max_new_tokens=64, stop=("\n",), batch_size=1)})


def test_loglikelihood_key():
    assert_each_changes(loglikelihood_key, {"model": "fp", "context": [1, 2], "continuation": [3]},
                        {"model": "fp2", "context": [1, 2, 4], "continuation": [5]})


def test_drift_key():
    assert_each_changes(drift_key, {"model": "fp", "passage": [1, 2, 3], "top_k": 64},
                        {"model": "fp2", "passage": [1, 2], "top_k": 128})


def test_adapter_active_key():
    assert_each_changes(adapter_active_key, {"model": "fp", "prompts": ["a"], "tolerance": 1e-4},
                        {"model": "fp2", "prompts": ["a", "b"], "tolerance": 1e-3})


def _info(sha: str) -> AdapterInfo:
    return AdapterInfo(path=Path("a"), config={}, weights=Path("a/adapter_model.safetensors"), sha256=sha,
                       is_dora=False, provenance=None)


def test_variant_fingerprint():
    def fp(base="b", adapter="a", quantize=None, merge=False, merge_into="full", template="t"):
        v = variant("v", "a").model_copy(update={"quantize": quantize, "merge": merge, "merge_into": merge_into})
        return variant_fingerprint(ResolvedBase(BaseSpec.of("path", "x"), "x", base), v,
                                   _info(adapter) if adapter else None, template)

    assert_each_changes(fp, {"quantize": "nf4", "merge": True},
                        {"base": "b2", "adapter": "a2", "quantize": "int8", "merge": False, "merge_into": "quantized",
                         "template": "t2"})
    assert fp(adapter=None) != fp()


@pytest.mark.parametrize("change", ["model", "temperature", "max_tokens", "response_format", "messages", "sample",
                                    "attempt", "endpoint"])
def test_judge_key(change):
    cfg = {"base_url": "http://127.0.0.1:1/v1", "model": "judge", "temperature": 0.0, "max_tokens": 64,
           "response_format": "none"}
    request = {"messages": [{"role": "user", "content": "grade"}], "sample": 0, "attempt": 0}
    endpoint = {"base_url": cfg["base_url"], "id": "judge", "fingerprint": "f1"}
    other = {"model": "judge2", "temperature": 0.7, "max_tokens": 65, "response_format": "json_schema",
             "messages": [{"role": "user", "content": "grade!"}], "sample": 1, "attempt": 1,
             "endpoint": {**endpoint, "fingerprint": "f2"}}

    def key(cfg=cfg, request=request, endpoint=endpoint) -> str:
        return JudgeClient(JudgeConfig(**cfg), identity=endpoint).request_key(**request)

    if change in cfg:
        assert key(cfg={**cfg, change: other[change]}) != key()
    elif change in request:
        assert key(request={**request, change: other[change]}) != key()
    else:
        assert key(endpoint=other["endpoint"]) != key()


def test_training_fingerprint():
    from trainers.provenance import fingerprint, fingerprint_parts

    recipe = {"name": "a", "method": "lora", "seed": 0, "output": "/o", "source": "/r.yml", "base_dir": "/",
              "base": {"kind": "path", "ref": "x"}, "lora": {"r": 16}, "training": {"learning_rate": 2e-4},
              "quantization": None, "data": {"train": "/t.jsonl", "eval_fraction": 0.1, "check_against": []}}
    base = ResolvedBase(BaseSpec.of("path", "x"), "x", "sha-b")

    def fp(recipe=recipe, data="sha-d", base=base):
        return fingerprint(fingerprint_parts(recipe, data, base))

    ref = fp()
    for changed in ({**recipe, "method": "dora"}, {**recipe, "seed": 1}, {**recipe, "lora": {"r": 8}},
                    {**recipe, "training": {"learning_rate": 1e-4}}, {**recipe, "quantization": {"quant_type": "nf4"}},
                    {**recipe, "data": {**recipe["data"], "eval_fraction": 0.2}}):
        assert fp(recipe=changed) != ref, changed
    assert fp(data="sha-d2") != ref and fp(base=ResolvedBase(base.spec, "x", "sha-b2")) != ref
    # where files live, and the leakage report's inputs, do not change the adapter
    for same in ({**recipe, "name": "b"}, {**recipe, "output": "/p"}, {**recipe, "source": "/s.yml"},
                 {**recipe, "data": {**recipe["data"], "train": "/u.jsonl", "check_against": ["/x"]}}):
        assert fp(recipe=same) == ref, same

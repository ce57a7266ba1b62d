"""Every component of every cache key: changing it must change the key (so the cached result is
not reused), and what is deliberately left out must not. Dropping a component from a key makes
its test here fail; changing how a key is built fails the frozen values (the cache of earlier
runs must keep answering). And the one cache-through helper every get/compute/put site uses."""
from __future__ import annotations

from pathlib import Path

import pytest
from helpers import variant

import evalkit.cache
from evalkit.cache import (
    Cache,
    Deliver,
    adapter_active_key,
    cached,
    drift_key,
    drift_summary_key,
    generation_key,
    judge_key,
    loglikelihood_key,
    seed_probe_key,
)
from evalkit.config.generation import DECODER, GenerationConfig
from evalkit.config.judge import JudgeConfig
from evalkit.context import variant_fingerprint
from evalkit.judge.client import JudgeClient
from evalkit.models.adapters import AdapterInfo
from evalkit.models.base import BaseSpec, ResolvedBase


def assert_each_changes(key, base: dict, changes: dict, same: dict | None = None) -> None:
    ref = key(**base)
    for name, value in changes.items():
        assert key(**{**base, name: value}) != ref, f"changing {name} must change the key"
    for name, value in (same or {}).items():
        assert key(**{**base, name: value}) == ref, f"{name} is not part of the key"


def test_generation_key():
    def key(model: str, gen: GenerationConfig, prompt: str) -> str:
        return generation_key(model, gen.key(), prompt)

    gen = GenerationConfig(max_new_tokens=64, stop=("\n",), batch_size=8)
    assert_each_changes(key, {"model": "fp", "gen": gen, "prompt": "p"},
                        {"model": "fp2", "prompt": "p ",
                         "gen": GenerationConfig(max_new_tokens=65, stop=("\n",), batch_size=8)})
    assert_each_changes(key, {"model": "fp", "gen": gen, "prompt": "p"},
                        {"gen": GenerationConfig(max_new_tokens=64, stop=("\n", "}"), batch_size=8)},
                        # greedy outputs do not depend on the batch (test_e2e compares batch 1 with batch N)
                        same={"gen": GenerationConfig(max_new_tokens=64, stop=("\n",), batch_size=1)})
    assert gen.key()["decoder"] == DECODER  # another decoder's outputs are never reused


def test_loglikelihood_key():
    assert_each_changes(loglikelihood_key, {"model": "fp", "context": [1, 2], "continuation": [3]},
                        {"model": "fp2", "context": [1, 2, 4], "continuation": [5]})


def test_drift_key():
    assert_each_changes(drift_key, {"model": "fp", "passage": [1, 2, 3], "top_k": 64},
                        {"model": "fp2", "passage": [1, 2], "top_k": 128})


def test_drift_summary_key():
    assert_each_changes(drift_summary_key, {"model": "fp", "reference": "ref", "passage": [1, 2, 3], "top_k": 64},
                        {"model": "fp2", "reference": "ref2", "passage": [1, 2], "top_k": 128})


def test_seed_probe_key():
    endpoint = {"base_url": "http://127.0.0.1:1/v1", "id": "judge", "fingerprint": "f1"}
    assert_each_changes(seed_probe_key, {"endpoint": endpoint, "temperature": 0.7},
                        {"endpoint": {**endpoint, "fingerprint": "f2"}, "temperature": 1.0})


def test_key_values_are_frozen(monkeypatch):
    """The values computed before the keys moved into cache.py (evalkit's version pinned: a release
    changes every key on purpose). A key built another way leaves every cached result unused."""
    monkeypatch.setattr(evalkit.cache, "__version__", "0.0.0-frozen")
    endpoint = {"base_url": "http://x/v1", "id": "judge"}
    request = {"model": "judge", "temperature": 0.0, "max_tokens": 64, "response_format": "none",
               "messages": [{"role": "user", "content": "grade"}], "sample": 0, "attempt": 0}
    assert {
        "generation": generation_key("fp", {"max_new_tokens": 64, "stop": ["\n"], "greedy": True}, "p"),
        "loglikelihood": loglikelihood_key("fp", [1, 2], [3]),
        "drift": drift_key("fp", [1, 2, 3], 64),
        "drift_summary": drift_summary_key("fp", "ref", [1, 2, 3], 64),
        "adapter_active": adapter_active_key("fp", ["a"], 1e-4),
        "judge": judge_key(endpoint, request),
        "seed_probe": seed_probe_key(endpoint, 0.7),
    } == {
        "generation": "00a4319eaff46afd640176e33df3f3e21aab5874fe38bb966f4766e347762531",
        "loglikelihood": "f6079e293e12d2ac45c208adf34fe6bafc74e7fbdb1963c40f1487f454bdd964",
        "drift": "55cc6469818d94aee8c6144afa3ec08448f3242357c93673892d99a017b4c09c",
        "drift_summary": "62f5a28dbb6676573630424cf07e2016916ddd5fe29a3c5b4e879bf98a54198a",
        "adapter_active": "17d6c414f9d291dce8a00b0b23c3883813b16275a3263d0c47c820fcabb74c93",
        "judge": "b50065bf2027081185e92c1a5dce6e09137155efdce85e99879f478d194885f6",
        "seed_probe": "0020997317fc37a2efabbce8ddd126983cf6cead117cca704d294f198ec49c84",
    }


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


def test_cached_reads_what_is_cached_and_caches_the_rest_as_it_is_delivered(tmp_path):
    cache = Cache(tmp_path / "c.sqlite")
    cache.put("b", [2])
    asked: list[list[int]] = []

    def compute(todo: list[int], deliver: Deliver[int]) -> None:
        asked.append(todo)
        deliver({todo[0]: 10})
        assert cache.get("a", count=False) == [10]  # committed as it arrives: an interrupted run keeps it
        deliver({i: 10 * (i + 1) for i in todo[1:]})

    got = cached(cache, ["a", "b", "c"], compute, decode=lambda v: v[0], encode=lambda v: [v])
    assert got == [(10, False), (2, True), (30, False)] and asked == [[0, 2]]
    assert (cache.hits, cache.misses) == (1, 2)
    again = cached(cache, ["a", "b", "c"], compute, count=False, decode=lambda v: v[0], encode=lambda v: [v])
    assert again == [(10, True), (2, True), (30, True)] and len(asked) == 1  # nothing left to compute
    assert (cache.hits, cache.misses) == (1, 2)  # count=False: not counted


def test_cached_keeps_a_refused_value_out_of_the_cache_and_refuses_a_compute_that_drops_one(tmp_path):
    cache = Cache(tmp_path / "c.sqlite")
    got = cached(cache, ["ok", "failed"], lambda todo, deliver: deliver({0: "ok", 1: "failed: 503"}),
                 keep=lambda v: not v.startswith("failed"))
    assert got == [("ok", False), ("failed: 503", False)]
    assert cache.get("ok") == "ok" and cache.get("failed") is None  # a failure is asked again next run
    with pytest.raises(RuntimeError, match="1 of 2 results to compute were never delivered"):
        cached(cache, ["x", "y"], lambda todo, deliver: deliver({todo[0]: "x"}))

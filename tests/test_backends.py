"""Backends: variants run on a real OpenAI-compatible server (evalkit serve over HTTP, through the
`openai` backend) give what the in-process `hf` reference gives; faults are survived or stop the
run with finished work kept; replicas share the work; what is served, not the URL, keys the cache."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from fault_proxy import FaultProxy
from helpers import EXTRACT_ROWS, make_adapter, write_jsonl, write_suite

from evalkit.backends.base import PROBES
from evalkit.cli import main
from evalkit.serve.server import make_server

pytest.importorskip("openai")
SUBJECTS = ["anatomy", "virology"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("backend-adapters")
    return {"lora": make_adapter(tiny_model_dir, root / "lora", seed=3, scale_b=40),
            "other": make_adapter(tiny_model_dir, root / "other", seed=4, scale_b=40),
            "zero": make_adapter(tiny_model_dir, root / "zero", zero_b=True)}


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapters):
    srv = make_server(str(tiny_model_dir), adapters, port=0, log=lambda _: None)
    srv.start()
    yield srv
    srv.close()


def suite(tmp_path: Path, base: Path, adapter: Path, *, backend: dict | None = None, canary: bool = True,
          variants: list[dict] | None = None, name: str = "suite.yml", gates: list[dict] | None = None) -> Path:
    write_jsonl(tmp_path / "data.jsonl", EXTRACT_ROWS)
    tasks: list[dict] = [{"name": "extract", "data": "data.jsonl", "scorers": ["exact_match", "json_valid"],
                          "max_new_tokens": 8, "stop": ["}"]}]
    if canary:
        tasks.append({"name": "canary", "kind": "mmlu", "per_subject": 2, "subjects": SUBJECTS, "n_shot": 1})
    doc: dict = {"name": "backends", "base": {"path": str(base)},
                 "variants": variants or [{"name": "base"}, {"name": "lora", "adapter": str(adapter)}],
                 "tasks": tasks}
    if backend:
        doc["backend"] = backend
    if gates:
        doc["gates"] = gates
    return write_suite(tmp_path / name, doc)


def probe_requests(variants: int = 2) -> int:
    """What a run asks each replica before any work: every variant's probes alone (its identity),
    then all of them at once (the mixed-traffic probe)."""
    return len(PROBES) * variants * (2 if variants > 1 else 1)


def active_requests(adapters: int = 1) -> int:
    """adapter_active on a server, the first time (a pass is cached): the prompt logprobs of each
    adapter and of its base on the probes and the first two cases."""
    return 2 * (len(PROBES) + 2) * adapters


def run(capsys, path: Path, out: Path, *extra: str) -> tuple[int, str]:
    code = main(["run", str(path), "--out", str(out), "-q", *extra])
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def samples(run_dir: Path) -> dict[tuple[str, str, str], dict]:
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    return {(r["task"], r["variant"], r["case_id"]): r for r in rows}


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def assert_same(ours: dict, ref: dict) -> None:
    """Generation outputs identical; canary answers identical, loglikelihoods within fp32 noise."""
    assert set(ours) == set(ref)
    for key, r in ref.items():
        o = ours[key]
        assert (o["output"], o["prompt"]) == (r["output"], r["prompt"]), key
        assert {k: v["value"] for k, v in o["scores"].items()} == {k: v["value"] for k, v in r["scores"].items()}, key
        if key[0] == "canary":
            assert o["meta"]["loglikelihoods"] == pytest.approx(r["meta"]["loglikelihoods"], abs=1e-4), key


def test_openai_backend_against_evalkit_serve_equals_hf(capsys, tmp_path, tiny_model_dir, adapters, server):
    """Point 2 on the tiny model: the extract task's greedy outputs and the canary's per-question
    answers through evalkit serve (token ids over HTTP, prompt logprobs) equal the hf reference."""
    code, text = run(capsys, suite(tmp_path, tiny_model_dir, adapters["lora"]), tmp_path / "hf", "--no-cache")
    assert code == 0, text
    before = dict(server.counts)
    remote = suite(tmp_path, tiny_model_dir, adapters["lora"], name="remote.yml",
                   backend={"kind": "openai", "base_url": server.url, "concurrency": 4})
    cache = str(tmp_path / "cache.sqlite")
    code, text = run(capsys, remote, tmp_path / "remote", "--cache", cache)
    assert code == 0, text
    assert_same(samples(tmp_path / "remote"), samples(tmp_path / "hf"))
    asked = server.counts["completions"] - before["completions"]
    # 2 variants x (6 cases + 4 canary questions x 4 choices, one request each), probes, adapter_active
    assert asked == 2 * (6 + 4 * 4) + probe_requests() + active_requests(), asked

    rec = {v["name"]: v for v in results(tmp_path / "remote")["variants"]}
    lora = rec["lora"]["backend"]
    assert lora["engine"] == "openai" and lora["endpoints"] == [server.url] and lora["served_name"] == "lora"
    assert lora["served"]["served"]["fingerprint"] == server.engine.fingerprints["lora"]
    assert lora["served"]["served"]["parent"] == "base" and lora["server_version"].startswith("evalkit ")
    assert results(tmp_path / "hf")["variants"][1]["backend"] == {
        "engine": "hf", "endpoints": [], "served_name": None, "served": None, "server_version": None,
        "fallback": None, "mixed_traffic": None}

    assert rec["lora"]["backend"]["mixed_traffic"] == {"probe": "passed", "differing": 0,
                                                       "asked": 2 * len(PROBES), "isolated": False}

    # a rerun is answered by the cache: only the probes reach the server
    before = server.counts["completions"]
    code, text = run(capsys, remote, tmp_path / "again", "--cache", cache)
    assert code == 0 and server.counts["completions"] - before == probe_requests(), text
    assert all(s["cached"] for s in samples(tmp_path / "again").values())


def test_lm_eval_tasks_through_the_openai_backend_equal_hf(capsys, tmp_path, tiny_model_dir, adapters, server):
    """`kind: lm_eval` on a server: a multiple_choice task (prompt logprobs of token ids) and a
    generate_until one (greedy completions cut at the task's `until`) give per document what the
    hf reference gives."""
    from test_lm_eval_task import ARC_YAML, MATH_YAML, arc_rows, write_task

    write_task(tmp_path / "tasks", "tiny_arc", ARC_YAML, arc_rows(6))
    write_task(tmp_path / "tasks", "tiny_math", MATH_YAML, [{"question": f"{i} plus {i}", "answer": str(2 * i)}
                                                            for i in range(4)])
    doc = {"name": "lm-eval-remote", "base": {"path": str(tiny_model_dir)},
           "variants": [{"name": "base"}, {"name": "lora", "adapter": str(adapters["lora"])}],
           "tasks": [{"name": "lm", "kind": "lm_eval", "tasks": ["tasks"]}]}
    code, text = run(capsys, write_suite(tmp_path / "hf.yml", doc), tmp_path / "hf", "--no-cache")
    assert code == 0, text
    remote = write_suite(tmp_path / "remote.yml", doc | {"backend": {"kind": "openai", "base_url": server.url}})
    code, text = run(capsys, remote, tmp_path / "remote", "--no-cache")
    assert code == 0, text
    ours, ref = samples(tmp_path / "remote"), samples(tmp_path / "hf")
    assert set(ours) == set(ref) and len(ref) == 2 * (6 + 4)
    for key, r in ref.items():
        o = ours[key]
        assert (o["output"], o["prompt"], o["scores"]) == (r["output"], r["prompt"], r["scores"]), key
        if "loglikelihoods" in r["meta"]:
            assert o["meta"]["loglikelihoods"] == pytest.approx(r["meta"]["loglikelihoods"], abs=1e-4), key


def test_the_cache_keys_what_is_served_not_the_url(capsys, tmp_path, tiny_model_dir, adapters, server):
    """Another adapter served under the variant's name (same URL, same name) is asked afresh."""
    cache = str(tmp_path / "cache.sqlite")
    backend = {"kind": "openai", "base_url": server.url}
    first = suite(tmp_path, tiny_model_dir, adapters["lora"], backend=backend, canary=False)
    code, text = run(capsys, first, tmp_path / "r1", "--cache", cache)
    assert code == 0, text
    swapped = suite(tmp_path, tiny_model_dir, adapters["lora"], backend=backend, canary=False, name="swapped.yml",
                    variants=[{"name": "base"}, {"name": "lora", "served_name": "other"}])
    before = server.counts["completions"]
    code, text = run(capsys, swapped, tmp_path / "r2", "--cache", cache)
    assert code == 0, text
    # lora's 6 cases again (and adapter_active: another model); base cached
    assert server.counts["completions"] - before == probe_requests() + active_requests() + 6
    fresh = samples(tmp_path / "r2")
    assert not any(s["cached"] for k, s in fresh.items() if k[1] == "lora")
    assert all(s["cached"] for k, s in fresh.items() if k[1] == "base")


def test_replicas_share_the_work(capsys, tmp_path, tiny_model_dir, adapters, server):
    """Two servers over the same model: the work is split between them, the results are the one
    reference's, and a replica whose identity differs would be refused (same entry checked)."""
    second = make_server(engine=server.engine, port=0, log=lambda _: None)
    second.start()
    try:
        path = suite(tmp_path, tiny_model_dir, adapters["lora"], canary=False,
                     backend={"kind": "openai", "base_url": [server.url, second.url], "concurrency": 2})
        before = (server.counts["completions"], second.counts["completions"])
        code, text = run(capsys, path, tmp_path / "rep", "--no-cache")
        assert code == 0, text
        a, b = server.counts["completions"] - before[0], second.counts["completions"] - before[1]
        p = probe_requests()
        assert a + b == 12 + 2 * p + active_requests() and a > p and b > p, (a, b)  # each did probes and work
        code, text = run(capsys, suite(tmp_path, tiny_model_dir, adapters["lora"], canary=False, name="hf.yml"),
                         tmp_path / "hf", "--no-cache")
        assert_same(samples(tmp_path / "rep"), samples(tmp_path / "hf"))
    finally:
        second.close()


def test_faults_are_survived_and_a_dead_endpoint_keeps_finished_work(capsys, tmp_path, tiny_model_dir, adapters,
                                                                     server):
    """Point 5: 429, 500, a timeout, a dropped connection and a garbled body are retried and the run
    ends 0 with the reference's outputs; a server that stays down ends the run with exit 2, what
    finished is cached, and the rerun asks only for the rest."""
    cache = str(tmp_path / "cache.sqlite")
    ref_path = suite(tmp_path, tiny_model_dir, adapters["lora"], canary=False, name="hf.yml")
    assert run(capsys, ref_path, tmp_path / "hf", "--no-cache")[0] == 0
    with FaultProxy(server.url, faults=["429", "500", "slow", "drop", "garbage"], slow_s=2.0) as proxy:
        backend = {"kind": "openai", "base_url": proxy.url, "concurrency": 1, "timeout": 1.0, "backoff": 0.01}
        path = suite(tmp_path, tiny_model_dir, adapters["lora"], canary=False, backend=backend)
        code, text = run(capsys, path, tmp_path / "faulty", "--cache", cache)
        assert code == 0, text
        assert sum(proxy.counts[f] for f in ("429", "500", "slow", "drop", "garbage")) == 5
        assert_same(samples(tmp_path / "faulty"), samples(tmp_path / "hf"))

    with FaultProxy(server.url, slow_s=0) as proxy:
        backend = {"kind": "openai", "base_url": proxy.url, "concurrency": 1, "retries": 2, "backoff": 0.01}
        path = suite(tmp_path, tiny_model_dir, adapters["other"], canary=False, backend=backend, name="down.yml",
                     variants=[{"name": "base"}, {"name": "lora2", "served_name": "other"}])
        calls = {"n": 0}
        real = proxy.next_fault

        def break_after_three() -> str | None:  # the probes and three cases pass, then the server is down
            calls["n"] += 1
            proxy.down = calls["n"] > probe_requests() + active_requests() + 3
            return real()

        proxy.next_fault = break_after_three  # type: ignore[method-assign]
        code, text = run(capsys, path, tmp_path / "down", "--cache", cache)
        assert code == 2, text
        assert "failed after 2 retries (HTTP 500" in text and "3 of 6 requests finished and are cached" in text, text
        proxy.down, proxy.next_fault = False, real  # type: ignore[method-assign]
        forwarded = proxy.counts["forwarded"]
        code, text = run(capsys, path, tmp_path / "resumed", "--cache", cache)
        assert code == 0, text
        assert proxy.counts["forwarded"] - forwarded == probe_requests() + 3  # the probes, and three cases left
        assert sum(s["cached"] for s in samples(tmp_path / "resumed").values()) == 6 + 3


def test_a_server_that_mixes_models_up_is_caught_and_then_sent_one_variant_at_a_time(
        capsys, tmp_path, tiny_model_dir, adapters, server):
    """Point 4's companion probe: a server that answers base requests with the adapter whenever
    adapter requests are in flight too (vLLM CPU's reported bug, emulated by the proxy in front of
    evalkit serve) fails the mixed-traffic probe; the run then never has two variants in flight,
    and its outputs are the reference's."""
    code, text = run(capsys, suite(tmp_path, tiny_model_dir, adapters["lora"], canary=False, name="hf.yml"),
                     tmp_path / "hf", "--no-cache")
    assert code == 0, text
    with FaultProxy(server.url) as proxy:
        proxy.contaminate = ("base", "lora")
        path = suite(tmp_path, tiny_model_dir, adapters["lora"], canary=False,
                     backend={"kind": "openai", "base_url": proxy.url, "concurrency": 4})
        code, text = run(capsys, path, tmp_path / "mixed", "--no-cache")
        assert code == 0, text
        assert proxy.counts["contaminated"] >= 1  # the probe's burst hit the bug, the work never did
        assert "probe answers changed when the variants' requests were in flight together" in text, text
        mixing = results(tmp_path / "mixed")["variants"][0]["backend"]["mixed_traffic"]
        assert mixing["probe"] == "failed" and mixing["isolated"] and mixing["differing"] >= 1, mixing
        assert_same(samples(tmp_path / "mixed"), samples(tmp_path / "hf"))


def test_backend_parity_catches_an_inert_or_another_adapter_with_numbers(capsys, tmp_path, tiny_model_dir, adapters,
                                                                        server):
    """Point 4: with the adapter's files local, the server serving under the variant's name the
    right adapter passes; an inert copy (zero B) or another adapter fails, with numbers and a
    diagnosis; adapter_active, served adapter vs served base, fails the inert one."""
    lora = str(adapters["lora"])
    variants = [{"name": "base"}, {"name": "right", "adapter": lora, "served_name": "lora"},
                {"name": "inert", "adapter": lora, "served_name": "zero"},
                {"name": "swapped", "adapter": lora, "served_name": "other"}]
    path = suite(tmp_path, tiny_model_dir, adapters["lora"], canary=False, variants=variants,
                 backend={"kind": "openai", "base_url": server.url},
                 gates=[{"check": "backend_parity"}, {"check": "adapter_active"}])
    code, text = run(capsys, path, tmp_path / "parity", "--no-cache")
    assert code == 1, text
    checks = {(c["name"], c["variant"]): c for c in results(tmp_path / "parity")["checks"]}
    parity = {v: checks[("backend_parity", v)] for v in ("base", "right", "inert", "swapped")}
    assert parity["base"]["passed"] and parity["right"]["passed"], parity
    assert parity["right"]["details"]["max_abs_logprob_diff"] < 1e-4
    assert parity["right"]["details"]["top1_agreement"] == 1.0 and "greedy continuations 4/4 identical" in \
        parity["right"]["message"]
    inert, swapped = parity["inert"], parity["swapped"]
    assert not inert["passed"] and "the served adapter is inert: it answers as its base 'base'" in inert["message"]
    assert not swapped["passed"] and "another adapter or model" in swapped["message"]
    for c in (inert, swapped):
        assert c["details"]["max_abs_logprob_diff"] > 0.05 and "max |logprob diff|" in c["message"], c
    assert not checks[("adapter_active", "inert")]["passed"] and checks[("adapter_active", "right")]["passed"]
    assert "changes nothing" in checks[("adapter_active", "inert")]["message"]
    failed = {g["id"] for g in results(tmp_path / "parity")["gates"] if not g["passed"]}
    assert failed == {"backend_parity[inert]", "backend_parity[swapped]", "adapter_active[inert]"}, failed


def test_vllm_kind_with_a_base_url_connects_instead_of_starting_one(capsys, tmp_path, tiny_model_dir, adapters,
                                                                  server):
    """`kind: vllm` with `base_url` talks to a server already running (here evalkit serve): nothing
    is started, vLLM's refusals still apply, and the record names the engine."""
    path = suite(tmp_path, tiny_model_dir, adapters["lora"], canary=False,
                 backend={"kind": "vllm", "base_url": server.url})
    code, text = run(capsys, path, tmp_path / "connected", "--no-cache")
    assert code == 0 and "starting vLLM" not in text, text
    assert {v["backend"]["engine"] for v in results(tmp_path / "connected")["variants"]} == {"vllm"}
    merged = suite(tmp_path, tiny_model_dir, adapters["lora"], canary=False, name="merged.yml",
                   backend={"kind": "vllm", "base_url": server.url},
                   variants=[{"name": "base"}, {"name": "lora", "adapter": str(adapters["lora"]), "merge": True}])
    code, text = run(capsys, merged, tmp_path / "x", "--no-cache")
    assert code == 4 and "variants[1].merge: `merge` runs in this process" in text and "fallback: hf" in text, text


def test_backend_config_errors_are_located(capsys, tmp_path, tiny_model_dir, adapters, server):
    path = suite(tmp_path, tiny_model_dir, adapters["lora"], canary=False,
                 backend={"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "retries": 0})
    code, text = run(capsys, path, tmp_path / "x")
    assert code == 4 and "suite.yml:" in text and "backend: backend endpoint unreachable at http://127.0.0.1:9/v1" \
        in text, text

    path = suite(tmp_path, tiny_model_dir, adapters["lora"], canary=False, backend={"kind": "openai", "base_url": server.url},
                 variants=[{"name": "base"}, {"name": "lora", "served_name": "lorra"}])
    code, text = run(capsys, path, tmp_path / "x")
    assert code == 4 and "variant 'lora': model 'lorra' is not listed" in text and "did you mean 'lora'" in text, text

    path = suite(tmp_path, tiny_model_dir, adapters["lora"], canary=False, backend={"kind": "openai", "base_url": server.url},
                 variants=[{"name": "base"}, {"name": "lora", "adapter": str(adapters["lora"]), "quantize": "nf4"}])
    code, text = run(capsys, path, tmp_path / "x")
    assert code == 4 and "variants[1].quantize: `quantize` runs in this process" in text, text

    path = suite(tmp_path, tiny_model_dir, adapters["lora"], canary=False, backend={"kind": "openai"})
    code, text = run(capsys, path, tmp_path / "x")
    assert code == 4 and "backend: backend `openai` needs `base_url`" in text, text

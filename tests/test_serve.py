"""`evalkit serve` on a tiny random Llama with one adapter, spoken to through the openai client."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from helpers import make_adapter, suite_of, variant, write_jsonl

from evalkit.errors import ConfigError
from evalkit.serve import make_server, serve_main

openai = pytest.importorskip("openai")
KEY_ENV = "EVALKIT_TEST_SERVE_KEY"
HI = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("serve") / "lora", seed=3, scale_b=40)


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapter, tmp_path_factory):
    other = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("serve") / "other", seed=4, scale_b=40)
    srv = make_server(str(tiny_model_dir), {"lora": adapter, "other": other}, port=0, log=lambda _: None)
    srv.start()
    yield srv
    srv.close()


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=30)


def raw(url: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url.removesuffix("/v1") + path, data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_and_chat_per_adapter(server, tiny_model_dir):
    before = dict(server.counts)  # the server is the module's: other tests may have used it first
    c = client(server.url)
    assert [m.id for m in c.models.list()] == ["base", "lora", "other"]
    answers = {}
    for name in ("base", "lora", "other"):
        r = c.chat.completions.create(model=name, messages=HI, max_tokens=8)
        assert r.model == name and r.choices[0].message.role == "assistant"
        assert r.usage.completion_tokens <= 8 and r.choices[0].finish_reason in ("stop", "length")
        answers[name] = r.choices[0].message.content
    assert len(set(answers.values())) == 3  # the request's `model` picked the adapter

    # "base" is the plain model: the same text as generating without peft at all
    from evalkit.backends.hf import generate, render_prompt
    from evalkit.config.suite import GenerationConfig
    from evalkit.models.base import BaseSpec, load_base, resolve_base
    from evalkit.types import Case

    model, tok = load_base(resolve_base(BaseSpec.of("path", str(tiny_model_dir))))
    direct = generate(model, tok, [render_prompt(tok, Case("x", messages=tuple(HI)))], GenerationConfig(8))[0]
    assert answers["base"] == direct.text

    sampled = [c.chat.completions.create(model="lora", messages=HI, max_tokens=8, temperature=1.0, seed=7)
               .choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seed makes sampling reproducible
    assert server.counts["chat"] - before["chat"] == 5 and server.counts["models"] - before["models"] == 1


def test_errors_are_openai_shaped_json(server):
    with pytest.raises(openai.NotFoundError) as e:
        client(server.url).chat.completions.create(model="dora", messages=HI)
    assert e.value.body["code"] == "model_not_found" and "available: base, lora" in e.value.body["message"]
    status, body = raw(server.url, "/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = raw(server.url, "/v1/chat/completions", json.dumps({"model": "base", "messages": []}).encode())
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = raw(server.url, "/v1/chat/completions",
                       json.dumps({"model": "base", "messages": HI, "max_tokens": 10**6}).encode())
    assert status == 400 and body["error"]["param"] == "max_tokens"
    assert raw(server.url, "/v1/nothing")[0] == 404
    assert raw(server.url, "/v1/models/lora") == (200, {
        "id": "lora", "object": "model", "created": server.engine.created, "owned_by": "evalkit",
        "fingerprint": server.engine.fingerprints["lora"]})


def test_models_list_a_content_fingerprint_per_name(server, tiny_model_dir, adapter):
    """The base's is its content hash; an adapter's covers the adapter and the base it runs on."""
    from evalkit.models.adapters import inspect_adapter
    from evalkit.models.base import BaseSpec, resolve_base
    from evalkit.types import stable_hash

    listed = {m.id: m.model_dump() for m in client(server.url).models.list()}
    base = resolve_base(BaseSpec.of("path", str(tiny_model_dir))).sha256
    assert listed["base"]["fingerprint"] == base
    assert listed["lora"]["fingerprint"] == stable_hash([base, inspect_adapter(adapter).sha256])
    assert len({m["fingerprint"] for m in listed.values()}) == 3


def test_bearer_key_and_judge_preflight(server, monkeypatch):
    from evalkit.config.suite import JudgeTask
    from evalkit.judge.client import JudgeConfig
    from evalkit.tasks import judge

    monkeypatch.setenv(KEY_ENV, "serve-secret")
    guarded = make_server(engine=server.engine, port=0, api_key_env=KEY_ENV, log=lambda _: None)
    guarded.start()
    try:
        with pytest.raises(openai.AuthenticationError):
            client(guarded.url, "wrong").models.list()
        assert [m.id for m in client(guarded.url, "serve-secret").models.list()] == ["base", "lora", "other"]
        task = JudgeTask.model_construct(name="t", kind="judge", mode="pairwise", judge=JudgeConfig(
            base_url=guarded.url, model="lora", api_key_env=KEY_ENV))
        judge.preflight(task)
        monkeypatch.setenv(KEY_ENV, "wrong")
        with pytest.raises(ConfigError, match="refused the API key"):
            judge.preflight(task)
    finally:
        guarded.close()
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ConfigError, match=f"{KEY_ENV} is not set"):
        make_server(engine=server.engine, port=0, api_key_env=KEY_ENV)


def test_judge_task_against_evalkit_serve(server, tmp_path):
    """The tiny random model is a hopeless judge: its verdicts are recorded invalid, never a pass."""
    from evalkit.cache import Cache
    from evalkit.config.suite import JudgeTask
    from evalkit.context import LoadedVariant, RunContext
    from evalkit.models.base import ResolvedBase
    from evalkit.shape import parse
    from evalkit.tasks import judge

    (tmp_path / "rubric.md").write_text("- Correct\n")
    write_jsonl(tmp_path / "data.jsonl", [{"id": "a", "prompt": "2+2?"}, {"id": "b", "prompt": "Capital of France?"}])
    task = parse(JudgeTask, {"name": "helpful", "kind": "judge", "data": "data.jsonl", "rubric": "rubric.md",
                             "judge": {"base_url": server.url, "model": "base", "max_tokens": 12, "invalid_retries": 0}},
                 base_dir=tmp_path)
    suite = suite_of(tmp_path / "s.yml", tasks=(task,), variants=(variant("lora", tmp_path),))
    engine = server.engine
    lv = LoadedVariant(suite.variants[0], engine.model, "lora", None, "lora-fp")
    ctx = RunContext(suite, ResolvedBase(suite.base, "x", "0"), engine.tokenizer, [lv], Cache(tmp_path / "c.sqlite"),
                     log=lambda _: None, progress=False)
    judge.preflight(task)
    before = server.counts["chat"]
    result = judge.run(ctx, task)
    scores = [s.scores["rubric"] for s in result.samples]
    assert all(s.value is None and s.reason.startswith("invalid: ") for s in scores)
    j = result.extras["judge"]
    assert j["calls"] == 2 == server.counts["chat"] - before
    assert j["endpoint"] == {"base_url": server.url, "id": "base", "owned_by": "evalkit",
                             "fingerprint": server.engine.fingerprints["base"]} and j["endpoint_verified"]
    judge.run(ctx, task)
    assert server.counts["chat"] - before == 4  # rerun: invalid verdicts are never cached, so asked again

    # with response_format json_schema, evalkit serve guides the same hopeless model to valid verdicts
    guided = task.model_copy(update={"judge": task.judge.model_copy(update={"response_format": "json_schema"})})
    scores = [s.scores["rubric"] for s in judge.run(ctx, guided).samples]
    assert all(s.valid and 0 <= s.value <= 1 and s.meta["raw"] in (1, 2, 3, 4, 5) for s in scores)


def test_serve_main_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="needs --suite SUITE or --base MODEL"):
        serve_main([])
    with pytest.raises(ConfigError, match="NAME=PATH"):
        serve_main(["--base", "some/model", "--adapter", "lora"])


def test_response_format_json_schema_always_validates(server):
    """A tiny random model cannot write JSON, but guided decoding makes every verdict valid."""
    from evalkit.judge import verdicts as V

    c = client(server.url)
    for schema in (V.rubric_schema((1.0, 5.0)), V.rubric_schema(V.PASS_FAIL), V.PAIRWISE_SCHEMA):
        fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}}
        for temperature, seed in ((0.0, None), (1.0, 5)):
            r = c.chat.completions.create(model="lora", messages=HI, max_tokens=6, temperature=temperature, seed=seed,
                                          response_format=fmt)
            V.parse_verdict(r.choices[0].message.content, schema)  # raises if invalid
    status, body = raw(server.url, "/v1/chat/completions", json.dumps(
        {"model": "base", "messages": HI, "response_format": {"type": "xml"}}).encode())
    assert status == 400 and body["error"]["param"] == "response_format"

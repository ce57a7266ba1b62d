"""`evalkit serve` on a tiny random Llama with adapters, spoken to through clients evalkit did not
write (the openai client, lm-eval's local-completions) and raw HTTP for what clients never send."""
from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from helpers import sequential_then_together, suite_of, variant, write_jsonl

from evalkit.errors import ConfigError
from evalkit.serve.cli import serve_main
from evalkit.serve.protocol import Limits
from evalkit.serve.server import make_server

openai = pytest.importorskip("openai")
KEY_ENV = "EVALKIT_TEST_SERVE_KEY"
HI = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def adapter(tiny_lora):
    return tiny_lora


@pytest.fixture(scope="module")
def server(tiny_server):
    return tiny_server


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=30)


def raw(url: str, path: str, body: bytes | None = None, method: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url.removesuffix("/v1") + path, data=body, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_and_chat_per_adapter(server, tiny_model_dir):
    before = dict(server.counts)  # the server is the module's: other tests may have used it first
    c = client(server.url)
    assert [m.id for m in c.models.list()] == ["base", "lora", "other", "dora"]
    answers = {}
    for name in ("base", "lora", "other", "dora"):
        r = c.chat.completions.create(model=name, messages=HI, max_tokens=8)
        assert r.model == name and r.choices[0].message.role == "assistant"
        assert r.usage.completion_tokens <= 8 and r.choices[0].finish_reason in ("stop", "length")
        answers[name] = r.choices[0].message.content
    assert len({answers[n] for n in ("base", "lora", "other")}) == 3  # the request's `model` picked the adapter
    first = {n: c.completions.create(model=n, prompt="Hi", max_tokens=1, logprobs=0).choices[0].logprobs.token_logprobs[0]
             for n in ("base", "dora")}
    assert first["base"] != pytest.approx(first["dora"], abs=1e-3)  # DoRA runs apart from the mixed batches

    # "base" is the plain model: the same text as generating without peft at all
    from evalkit.backends.base import encode, render_prompt
    from evalkit.backends.hf_plan import generate
    from evalkit.config.generation import GenerationConfig
    from evalkit.models.base import BaseSpec, load_base, resolve_base
    from evalkit.types import Case

    model, tok = load_base(resolve_base(BaseSpec.of("path", str(tiny_model_dir))))
    direct = generate(model, tok, [encode(tok, render_prompt(tok, Case("x", messages=tuple(HI))))], GenerationConfig(8))[0]
    assert answers["base"] == direct.text

    sampled = [c.chat.completions.create(model="lora", messages=HI, max_tokens=8, temperature=1.0, seed=7)
               .choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seed makes sampling reproducible
    assert server.counts["chat"] - before["chat"] == 6 and server.counts["models"] - before["models"] == 1


def test_errors_are_openai_shaped_json(server):
    with pytest.raises(openai.NotFoundError) as e:
        client(server.url).chat.completions.create(model="nope", messages=HI)
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
        "root": server.engine.roots["lora"], "parent": "base", "max_model_len": 512,
        "fingerprint": server.engine.fingerprints["lora"]})
    assert raw(server.url, "/v1/models/base")[1]["parent"] is None


def test_models_list_a_content_fingerprint_per_name(server, tiny_model_dir, adapter):
    """The base's is its content hash; an adapter's covers the adapter and the base it runs on."""
    from evalkit.models.adapters import inspect_adapter
    from evalkit.models.base import BaseSpec, resolve_base
    from evalkit.types import stable_hash

    listed = {m.id: m.model_dump() for m in client(server.url).models.list()}
    base = resolve_base(BaseSpec.of("path", str(tiny_model_dir))).sha256
    assert listed["base"]["fingerprint"] == base
    assert listed["lora"]["fingerprint"] == stable_hash([base, inspect_adapter(adapter).sha256])
    assert len({m["fingerprint"] for m in listed.values()}) == 4


def test_bearer_key_and_judge_preflight(server, monkeypatch):
    from evalkit.config.judge import JudgeConfig
    from evalkit.config.task import JudgeTask
    from evalkit.tasks import judge

    monkeypatch.setenv(KEY_ENV, "serve-secret")
    guarded = make_server(engine=server.engine, port=0, api_key_env=KEY_ENV, log=lambda _: None)
    guarded.start()
    try:
        with pytest.raises(openai.AuthenticationError):
            client(guarded.url, "wrong").models.list()
        assert [m.id for m in client(guarded.url, "serve-secret").models.list()] == ["base", "lora", "other", "dora"]
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


def test_judge_task_against_evalkit_serve(server, tmp_path, tiny_model_dir):
    """The tiny random model is a hopeless judge: its verdicts are recorded invalid, never a pass."""
    from evalkit.backends.hf import HFBackend
    from evalkit.cache import Cache
    from evalkit.config.task import JudgeTask
    from evalkit.context import RunContext, RunVariant
    from evalkit.judge import verdicts as V
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
    lv = RunVariant(suite.variants[0], None, "lora-fp", HFBackend.over(engine.model, engine.tokenizer, {"lora": "lora"}))
    ctx = RunContext(suite=suite, base=ResolvedBase(suite.base, "x", "0"), tokenizer=engine.tokenizer, variants=[lv],
                     cache=Cache(tmp_path / "c.sqlite"), log=lambda _: None, progress=False)
    judge.preflight(task)
    before = server.counts["chat"]
    result = judge.run(ctx, task)
    scores = [s.scores["rubric"] for s in result.samples]
    assert all(s.value is None and s.reason.startswith("invalid: ") for s in scores)
    j = result.extras["judge"]
    assert j["calls"] == 2 == server.counts["chat"] - before
    assert j["endpoint"] == {"base_url": server.url, "id": "base", "owned_by": "evalkit", "root": str(tiny_model_dir),
                             "fingerprint": server.engine.fingerprints["base"]} and j["endpoint_verified"]
    judge.run(ctx, task)
    assert server.counts["chat"] - before == 4  # rerun: invalid verdicts are never cached, so asked again

    # with response_format json_schema the server constrains the reply to the verdict schema (closed,
    # an integer score, a bounded reason: verdicts.request_schema), so the same model's verdicts
    # are valid once max_tokens leaves room for the reason
    guided = task.model_copy(update={"judge": task.judge.model_copy(update={"response_format": "json_schema",
                                                                             "max_tokens": 100})})
    scores = [s.scores["rubric"] for s in judge.run(ctx, guided).samples]
    assert all(s.valid and 0 <= s.value <= 1 and s.meta["raw"] in (1, 2, 3, 4, 5) for s in scores)
    r = client(server.url).chat.completions.create(model="base", messages=HI, max_tokens=6, response_format={
        "type": "json_schema", "json_schema": {"name": "verdict", "schema": V.request_schema(V.rubric_schema((1.0, 5.0)))}})
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith('{"score": ')


def test_serve_main_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="needs --suite SUITE or --base MODEL"):
        serve_main([])
    with pytest.raises(ConfigError, match="NAME=PATH"):
        serve_main(["--base", "some/model", "--adapter", "lora"])


def test_response_format_json_schema_always_validates(server):
    """A tiny random model cannot write JSON; constrained decoding (llguidance) makes every reply
    valid for any schema it can enforce: nesting, arrays, enums, bounded strings; json_object too.
    (The schemas are closed and bounded: an open one lets this model add keys until max_tokens.)"""
    import jsonschema

    from evalkit.judge import verdicts as V

    bounded = {"type": "string", "maxLength": 12}
    nested = {"type": "object", "required": ["items", "meta"], "additionalProperties": False, "properties": {
        "items": {"type": "array", "maxItems": 3, "items": {
            "type": "object", "required": ["n", "ok"], "additionalProperties": False,
            "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}}}},
        "meta": {"type": "object", "required": ["label", "kind"], "additionalProperties": False,
                 "properties": {"label": bounded, "kind": {"enum": ["a", "b"]}}}}}
    pairwise = V.PAIRWISE_SCHEMA | {"properties": V.PAIRWISE_SCHEMA["properties"] | {"reason": bounded},
                                    "additionalProperties": False}
    c = client(server.url)
    for schema in (nested, pairwise):
        fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}}
        for temperature, seed in ((0.0, None), (1.0, 5)):
            r = c.chat.completions.create(model="lora", messages=HI, max_tokens=200, temperature=temperature,
                                          seed=seed, response_format=fmt)
            assert r.choices[0].finish_reason == "stop", (temperature, r.choices[0].message.content[:300])
            jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = c.chat.completions.create(model="base", messages=HI, max_tokens=8, response_format={"type": "json_object"})
    assert r.choices[0].message.content.startswith("{")  # any JSON object; this model never closes one
    for fmt, param in (({"type": "xml"}, "response_format.type"), ({"type": "json_schema"}, "response_format.json_schema"),
                       ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
                        "response_format")):
        status, body = raw(server.url, "/v1/chat/completions", json.dumps(
            {"model": "base", "messages": HI, "response_format": fmt}).encode())
        assert (status, body["error"]["param"]) == (400, param), body


# ---------------------------------------------------------------- completions, logprobs, batching

def test_completions_prompt_forms_echo_and_logprobs(server):
    c = client(server.url)
    tok = server.engine.tokenizer
    ids = tok("The capital of France is", add_special_tokens=False)["input_ids"]
    one = c.completions.create(model="lora", prompt="The capital of France is", max_tokens=4)
    as_ids = c.completions.create(model="lora", prompt=ids, max_tokens=4)
    assert one.choices[0].text == as_ids.choices[0].text and one.usage.prompt_tokens == len(ids)
    many = c.completions.create(model="lora", prompt=[ids, ids[:3]], max_tokens=4, n=2, temperature=1.0, seed=3)
    assert [ch.index for ch in many.choices] == [0, 1, 2, 3]  # prompt i, sample j -> i * n + j
    assert many.usage.prompt_tokens == len(ids) + 3 and many.usage.completion_tokens <= 16
    strings = c.completions.create(model="lora", prompt=["a b", "c d e"], max_tokens=2)
    assert len(strings.choices) == 2

    # echo + logprobs: the prompt's tokens first (the first one without a logprob), then the reply
    r = c.completions.create(model="base", prompt=ids, max_tokens=0, echo=True, logprobs=20).choices[0]
    assert r.text == tok.decode(ids) and r.finish_reason == "length"
    lp = r.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and all(len(t) >= 20 for t in lp.top_logprobs[1:])
    assert lp.text_offset[0] == 0
    r = c.completions.create(model="base", prompt=ids, max_tokens=3, echo=True, logprobs=1).choices[0]
    assert len(r.logprobs.token_logprobs) == len(ids) + 3 and r.text.startswith(tok.decode(ids))
    greedy = r.logprobs.token_logprobs[-1]
    assert greedy == max(r.logprobs.top_logprobs[-1].values())  # lm-eval's is_greedy check
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        c.completions.create(model="base", prompt="x", max_tokens=0)

    chat = c.chat.completions.create(model="lora", messages=HI, max_tokens=3, logprobs=True, top_logprobs=5)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 5 for t in content)
    assert content[0].logprob == content[0].top_logprobs[0].logprob  # greedy: the chosen token is the likeliest


def test_a_request_does_not_depend_on_its_batch(server):
    """The same prompt alone and in a batch with longer prompts on other adapters (left padding,
    peft's per-row adapter mixing): token logprobs agree to float noise, greedy tokens exactly."""
    from evalkit.backends.decoder import Delta, Finished, Generation

    engine = server.engine
    tok = engine.tokenizer
    prompt = tok("Once upon a time", add_special_tokens=False)["input_ids"]
    longer = tok("A much longer prompt, which makes the short one padded on the left in its batch",
                 add_special_tokens=False)["input_ids"]

    def run(jobs_spec):
        done = threading.Event()
        outs = [[] for _ in jobs_spec]
        left = [len(jobs_spec)]

        def sink(i):
            def put(ev):
                if isinstance(ev, Delta):
                    outs[i].extend(ev.tokens)
                if isinstance(ev, Finished):
                    left[0] -= 1
                    if not left[0]:
                        done.set()
            return put
        engine.submit([Generation(name, p, 12, sink(i), logprobs=0) for i, (name, p) in enumerate(jobs_spec)])
        assert done.wait(30)
        return outs

    batches = engine.stats["batches"]
    for name in ("base", "lora"):
        alone = run([(name, prompt)])[0]
        mixed = run([("other", longer), (name, prompt), ("base" if name != "base" else "lora", longer)])[1]
        assert [t.token for t in alone] == [t.token for t in mixed]
        worst = max(abs(a.logprob - b.logprob) for a, b in zip(alone, mixed))
        assert worst < 1e-4, worst  # measured: about 1e-6
    assert engine.stats["batches"] - batches == 4  # each run was one batch


def test_lm_eval_local_completions_matches_its_hf_backend(server, tiny_model_dir):
    """lm-eval's own API client (tokenizing through the server's /tokenize) scores an MMLU slice
    by loglikelihood with the same per-question answers as lm-eval's hf backend."""
    from evalkit.tasks import mmlu
    from evalkit.tasks.mmlu_data import load_questions, plan_slice

    sl = plan_slice(load_questions(), per_subject=2, subjects=["anatomy", "virology", "formal_logic", "marketing"],
                    n_shot=1, seed=0)
    configs = mmlu.task_configs(sl.questions, sl.fewshot, 1)
    ref = mmlu.records_from_results(mmlu.simple_evaluate(
        "hf", configs, model_args=f"pretrained={tiny_model_dir}", device="cpu", batch_size=4))
    before = server.counts["completions"]
    got = mmlu.records_from_results(mmlu.simple_evaluate(
        "local-completions", configs, model_args=f"base_url={server.url}/completions,model=base,num_concurrent=4"))
    assert server.counts["completions"] - before == 4 * len(sl.ids)  # one request per answer letter
    assert set(got) == set(ref) == set(sl.ids)
    for qid in sl.ids:
        assert got[qid]["prompt"] == ref[qid]["prompt"]
        assert (got[qid]["choice"], got[qid]["correct"]) == (ref[qid]["choice"], ref[qid]["correct"]), qid
        assert got[qid]["loglikelihoods"] == pytest.approx(ref[qid]["loglikelihoods"], abs=1e-4)


# ---------------------------------------------------------------- streaming and cancellation

def test_streaming_with_the_openai_client(server):
    c = client(server.url)
    whole = c.chat.completions.create(model="lora", messages=HI, max_tokens=12)
    chunks = list(c.chat.completions.create(model="lora", messages=HI, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()

    whole = c.completions.create(model="other", prompt="Hello", max_tokens=10, echo=True)
    chunks = list(c.completions.create(model="other", prompt="Hello", max_tokens=10, echo=True, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def _steps_settle(engine, within: float = 5.0) -> int:
    """The engine's step count once it stops moving (it is idle again)."""
    end = time.monotonic() + within
    last = engine.stats["steps"]
    while time.monotonic() < end:
        time.sleep(0.3)
        now = engine.stats["steps"]
        if now == last and not engine.queued:
            return now
        last = now
    raise AssertionError("the engine kept generating")


def test_cancelling_a_stream_or_a_request_stops_generation(server):
    engine = server.engine
    c = client(server.url)
    start = _steps_settle(engine)
    stream = c.completions.create(model="lora", prompt="Tell me a long story", max_tokens=450, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    stopped = _steps_settle(engine)
    assert stopped - start < 200  # 450 steps had it run to the end

    # a plain request whose client gives up is cancelled too
    with pytest.raises(openai.APITimeoutError):
        openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=0.3).completions.create(
            model="lora", prompt="Tell me a long story", max_tokens=450)
    assert _steps_settle(engine) - stopped < 300


# ---------------------------------------------------------------- limits and errors

def test_oversized_bodies_and_prompts_are_refused_before_any_compute(server):
    steps = server.engine.stats["steps"]
    t0 = time.perf_counter()
    # answered from the Content-Length, before the 2 MB arrive (the client sends its first 64 KiB)
    body = b'{"model": "base", "messages": "' + b"x" * 2_000_000 + b'"}'
    status, err = _http(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                        % (len(body), body[:65536]))
    assert (status, err["error"]["code"]) == (413, "request_too_large")
    assert time.perf_counter() - t0 < 1
    long_prompt = " ".join(["word"] * 9000)
    t0 = time.perf_counter()
    with pytest.raises(openai.BadRequestError) as e:
        client(server.url).chat.completions.create(model="base", messages=[{"role": "user", "content": long_prompt}])
    assert time.perf_counter() - t0 < 1
    assert e.value.body["code"] == "context_length_exceeded" and "maximum context length is 512" in e.value.body["message"]
    assert server.engine.stats["steps"] == steps  # nothing reached the model
    r = client(server.url).chat.completions.create(model="base", messages=HI, max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")
    # a chunked body (no Content-Length) is cut off at the limit too
    status, body = _http(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + b"".join(b"%x\r\n%s\r\n" % (65536, b"x" * 65536) for _ in range(20)) + b"0\r\n\r\n")
    assert status == 413


def _http(server, request: bytes, timeout: float = 10) -> tuple[int, dict]:
    """A raw exchange on a socket, for requests no client library would send."""
    host, port = server.url.removeprefix("http://").removesuffix("/v1").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 1 << 30


BAD = [  # (body, status, param or code)
    ({"model": "base", "messages": HI, "stop": 5}, 400, "stop"),
    ({"model": "base", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ({"model": "base", "messages": HI, "temperature": "hot"}, 400, "temperature"),
    ({"model": "base", "messages": HI, "temperature": 3}, 400, "temperature"),
    ({"model": "base", "messages": HI, "n": 0}, 400, "n"),
    ({"model": "base", "messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ({"model": "base", "messages": HI, "top_logprob": 3}, 400, "top_logprob"),
    ({"model": "base", "messages": HI, "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ({"model": "base", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400,
     "messages[0].content[0].type"),
    ({"model": "base", "prompt": [10**9]}, 400, "prompt"),
    ({"model": "base", "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ({"model": "base", "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    # found by the fuzz test (each was a 500, or worse)
    ({"model": "base", "prompt": ["x", ""]}, 400, "prompt"),  # an empty prompt failed its whole batch
    ({"model": "base", "prompt": "x", "logit_bias": {"49152": 1}}, 400, "logit_bias"),  # past the vocabulary
    ({"model": "base", "prompt": "x", "logit_bias": {"-1": 1}}, 400, "logit_bias"),  # biased the last token
    ({"model": "base", "prompt": "x", "logit_bias": {"²": 1}}, 400, "logit_bias"),
    ({"model": "base", "messages": [{"role": "user", "content": "\udfff"}]}, 400, "messages[0].content"),
    ({"model": "\ud800", "prompt": "x"}, 400, "model"),
    ({"model": "base", "prompt": ["x"] * 65, "n": 16}, 400, "n"),  # was "busy, retry later" with nothing queued
]


@pytest.mark.parametrize(("body", "status", "param"), BAD, ids=[p for _, _, p in BAD])
def test_bad_requests_get_openai_errors(server, body, status, param):
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    got, err = raw(server.url, path, json.dumps(body).encode())
    assert (got, err["error"]["param"]) == (status, param), err
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["message"]


# ---------------------------------------------------------------- the OpenAI spec, parameter by parameter

def _post(url: str, path: str, body: dict) -> tuple[int, str]:
    """Status and text of a POST (a stream's events as text)."""
    req = urllib.request.Request(url.removesuffix("/v1") + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_every_openai_parameter_is_accepted_at_its_default(server):
    """The spec walk: every parameter the `openai` package's request types declare for
    /v1/completions and /v1/chat/completions (and the fields of stream_options, of each message
    role, of a text part and of a json_schema) is sent alone at its documented default and as null,
    then all at once as clients like promptfoo send them: each request is a 200. A parameter a new
    `openai` release adds fails the coverage check until openai_spec says what its default is."""
    import openai.types.chat as oc
    import openai_spec as spec
    from openai.types.shared_params.response_format_json_schema import JSONSchema

    coverage = {"completions": (set(spec.COMPLETIONS), spec.params("completions")),
                "chat": (set(spec.CHAT), spec.params("chat")),
                "stream_options": (set(spec.STREAM_OPTIONS), spec.typed_dict_keys(oc.ChatCompletionStreamOptionsParam)),
                "text part": (set(spec.TEXT_PART), spec.typed_dict_keys(oc.ChatCompletionContentPartTextParam)),
                "json_schema": (set(spec.JSON_SCHEMA), spec.typed_dict_keys(JSONSchema)),
                **{f"{role} message": ({"role", "content", *spec.MESSAGE_FIELDS[role]}, spec.typed_dict_keys(t))
                   for role, t in spec.message_types().items()}}
    for what, (table, declared) in coverage.items():
        assert table == declared, f"{what}: openai_spec lacks {sorted(declared - table)}, has extra {sorted(table - declared)}"

    refused = []
    # --max-tokens-cap 16 (completions' default) keeps the defaults cheap: a chat's is then 16, not 256
    capped = make_server(engine=server.engine, port=0, log=lambda _: None, limits=Limits(max_tokens_cap=16))
    capped.start()

    def expect_200(path: str, body: dict, what: str) -> None:
        status, text = _post(capped.url, path, body)
        if status != 200:
            refused.append(f"{what}: {status} {text[:200]}")

    def each(table: dict) -> list[tuple[str, object]]:  # every (key, value): the default, and null
        return [(k, v) for k, d in table.items() if d is not spec.REQUIRED for v in ([d] if d is None else [d, None])]

    try:
        plain = {"completions": {"model": "lora", "prompt": "Hi", "max_tokens": 1},
                 "chat": {"model": "lora", "messages": HI, "max_tokens": 1}}
        for endpoint, table in (("completions", spec.COMPLETIONS), ("chat", spec.CHAT)):
            path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
            for key, value in each(table):
                expect_200(path, plain[endpoint] | {key: value}, f"{endpoint} {key}={value!r}")
            everything = {k: v for k, v in table.items() if v is not spec.REQUIRED}
            expect_200(path, plain[endpoint] | everything, f"{endpoint} with every default at once")
            for key, value in each(spec.STREAM_OPTIONS):
                expect_200(path, plain[endpoint] | {"stream": True, "stream_options": {key: value}},
                           f"{endpoint} stream_options.{key}={value!r}")
        chat = plain["chat"]
        for role in ("developer", "system", "user", "assistant"):
            for key, value in each(spec.MESSAGE_FIELDS[role]):
                message = {"role": role, "content": "Hello.", key: value}
                expect_200("/v1/chat/completions", chat | {"messages": [*HI, message, *HI]}, f"{role} message {key}={value!r}")
        for key, value in each(spec.TEXT_PART):
            part = {"type": "text", "text": "Say hello."} | {key: value}
            expect_200("/v1/chat/completions", chat | {"messages": [{"role": "user", "content": [part]}]},
                       f"text part {key}={value!r}")
        for key, value in each(spec.JSON_SCHEMA):
            schema = {"name": "answer", "schema": {"type": "object"}} | {key: value}
            expect_200("/v1/chat/completions", chat | {"response_format": {"type": "json_schema", "json_schema": schema}},
                       f"json_schema {key}={value!r}")
    finally:
        capped.close()
    assert not refused, "\n".join(refused)


UNSUPPORTED = [  # (endpoint, body, param, message): a value other than the default is refused, and says why
    ("completions", {"best_of": 2}, "best_of", "best_of: choosing the best of several candidates is not supported, so "
     "evalkit serve accepts only null or 1 (got 2); ask for n choices instead"),
    ("completions", {"best_of": True}, "best_of", None),
    ("completions", {"suffix": "}"}, "suffix", None),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "tools: tool calling is not "
     'supported, so evalkit serve accepts only null or [] (got [{"type": "function", "function": {"name...)'),
    ("chat", {"tool_choice": "required"}, "tool_choice", None),
    ("chat", {"functions": [{"name": "f"}]}, "functions", None),
    ("chat", {"function_call": {"name": "f"}}, "function_call", None),
    ("chat", {"audio": {"voice": "alloy", "format": "wav"}}, "audio", None),
    ("chat", {"modalities": ["text", "audio"]}, "modalities", None),
    ("chat", {"prediction": {"type": "content", "content": "x"}}, "prediction", None),
    ("chat", {"moderation": {"model": "omni-moderation-latest"}}, "moderation", None),
    ("chat", {"web_search_options": {}}, "web_search_options", None),
    ("chat", {"reasoning_effort": "high"}, "reasoning_effort",
     'reasoning_effort: the served models do not reason, so evalkit serve accepts only null or "none" (got "high")'),
    ("chat", {"verbosity": "low"}, "verbosity", None),
    ("chat", {"messages": [*HI, {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}]},
     "messages[1].tool_calls", None),
    ("chat", {"messages": [{"role": "tool", "content": "42", "tool_call_id": "c"}]}, "messages[0].role",
     "messages[0].role: tool messages are not supported: evalkit serve does not call tools"),
    ("chat", {"messages": [{"role": "function", "name": "f", "content": "42"}]}, "messages[0].role", None),
]


@pytest.mark.parametrize(("endpoint", "extra", "param", "message"), UNSUPPORTED, ids=[u[2] for u in UNSUPPORTED])
def test_unsupported_values_are_refused_naming_the_parameter(server, endpoint, extra, param, message):
    """A 400 whose `param` names the parameter, and whose message is one sentence: the place, what
    is not supported, what is accepted (the message once read "best_of: 'best_of': best_of is not
    supported; use n by evalkit serve")."""
    if endpoint == "completions":
        path, body = "/v1/completions", {"model": "base", "prompt": "Hi", "max_tokens": 1}
    else:
        path, body = "/v1/chat/completions", {"model": "base", "messages": HI, "max_tokens": 1}
    status, text = _post(server.url, path, body | extra)
    err = json.loads(text)["error"]
    assert (status, err["param"], err["type"]) == (400, param, "invalid_request_error"), err
    got = err["message"]
    key = param.rsplit(".", 1)[-1]
    assert got.startswith(f"{param}: ") and f"'{key}'" not in got and "\n" not in got and ". " not in got, got
    assert "supported" in got or "do not" in got, got  # why
    if message is not None:
        assert got == message


def test_ignored_parameters_take_any_value(server):
    """What never changes an answer (who asks, storage, billing tier, caching) is accepted whatever it says."""
    c = client(server.url)
    plain = c.chat.completions.create(model="lora", messages=HI, max_tokens=4).choices[0].message.content
    tagged = c.chat.completions.create(model="lora", messages=HI, max_tokens=4, user="u-1", metadata={"run": "7"},
                                       store=True, service_tier="flex", safety_identifier="h", prompt_cache_key="k",
                                       extra_body={"prompt_cache_options": {"mode": "explicit"}},
                                       stream_options=None, parallel_tool_calls=False)
    assert tagged.choices[0].message.content == plain


def test_bad_http_gets_json_errors(server):
    status, body = raw(server.url, "/v1/chat/completions", b'{"model": "base", "messages": "\xff\xfe"}')
    assert status == 400 and "not UTF-8" in body["error"]["message"]
    # found by the fuzz test: JSON that Python's parser refuses with other errors than a syntax error
    for text, says in ((b"[" * 100_000, "nested too deeply"), (b'{"n": ' + b"9" * 5000 + b"}", "4300 digits")):
        for path in ("/v1/completions", "/tokenize"):
            status, body = raw(server.url, path, text)
            assert status == 400 and says in body["error"]["message"], (path, body)
    status, body = raw(server.url, "/detokenize", b'{"tokens": [5, null]}')  # null passed the id check
    assert (status, body["error"]["message"]) == (400, "tokens: null is not a token id (an integer in 0..49151)")
    for method in ("PUT", "DELETE", "OPTIONS", "PATCH"):
        status, body = raw(server.url, "/v1/chat/completions", b"{}", method=method)
        assert (status, body["error"]["code"]) == (405, "method_not_allowed"), method
    status, body = raw(server.url, "/v1/completions")
    assert (status, body["error"]["code"]) == (405, "method_not_allowed")
    assert raw(server.url, "/v2/anything", b"{}")[0] == 404
    # a body shorter than its Content-Length: a 400 once the server's body timeout (0.5 s here) passes
    t0 = time.perf_counter()
    status, body = _http(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{}")
    assert status == 400 and "stopped after 2 of 100 bytes" in body["error"]["message"]
    assert time.perf_counter() - t0 < 3


def test_sampling_parameters_are_honoured(server):
    c = client(server.url)
    forced = c.completions.create(model="base", prompt="x", max_tokens=3, logit_bias={"42": 100})
    assert forced.choices[0].text == server.engine.tokenizer.decode([42] * 3)
    plain = c.completions.create(model="base", prompt="x y z", max_tokens=8).choices[0].text
    penalised = c.completions.create(model="base", prompt="x y z", max_tokens=8, frequency_penalty=2.0,
                                     extra_body={"repetition_penalty": 5.0}).choices[0].text
    assert plain != penalised  # the tiny model repeats itself; the penalties change that
    first = c.completions.create(model="base", prompt="x", max_tokens=6, temperature=1.5, top_p=0.9, seed=1,
                                 extra_body={"top_k": 5, "min_p": 0.05})
    again = c.completions.create(model="base", prompt="x", max_tokens=6, temperature=1.5, top_p=0.9, seed=1,
                                 extra_body={"top_k": 5, "min_p": 0.05})
    assert first.choices[0].text == again.choices[0].text


def test_edges_of_the_sampling_ranges_generate(server):
    """Values the shapes accept at the edge of their ranges generate instead of failing their batch:
    a temperature of 5e-324 (was NaN probabilities) is greedy; the default max_tokens stays within
    the server's --max-tokens-cap (was 256 for a chat whatever the cap)."""
    c = client(server.url)
    greedy = c.completions.create(model="base", prompt="x", max_tokens=4).choices[0].text
    assert c.completions.create(model="base", prompt="x", max_tokens=4, temperature=5e-324).choices[0].text == greedy
    r = c.completions.create(model="base", prompt="x", max_tokens=4, temperature=1.0, top_p=1e-300, seed=1,
                             extra_body={"repetition_penalty": 1e-9, "top_k": 10**12, "min_p": 1.0})
    assert r.choices[0].finish_reason == "length"
    capped = make_server(engine=server.engine, port=0, log=lambda _: None, limits=Limits(max_tokens_cap=3))
    capped.start()
    try:
        r = client(capped.url).chat.completions.create(model="lora", messages=HI)
        assert r.usage.completion_tokens <= 3
    finally:
        capped.close()


def test_request_timeout_is_a_504(tiny_model_dir):
    srv = make_server(str(tiny_model_dir), {}, port=0, log=lambda _: None, limits=Limits(request_timeout_s=0.2))
    srv.start()
    try:
        with pytest.raises(openai.APIStatusError) as e:
            client(srv.url).completions.create(model="base", prompt="x", max_tokens=450)
        assert e.value.status_code == 504 and e.value.body["code"] == "timeout"
        assert client(srv.url).completions.create(model="base", prompt="x", max_tokens=1).choices[0].text is not None
    finally:
        srv.close()


def test_sigint_stops_the_server_promptly(tiny_model_dir):
    proc = subprocess.Popen([sys.executable, "-m", "evalkit.cli", "serve", "--base", str(tiny_model_dir), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        for line in proc.stdout:
            if "evalkit serve: http" in line:
                url = line.split()[2]
                break
        assert url, "the server did not start"
        busy = threading.Thread(target=lambda: _swallow(lambda: client(url).completions.create(
            model="base", prompt="x", max_tokens=450, stream=False)), daemon=True)
        busy.start()
        time.sleep(0.5)
        proc.send_signal(2)  # SIGINT, as Ctrl-C
        t0 = time.perf_counter()
        assert proc.wait(timeout=10) == 0
        assert time.perf_counter() - t0 < 5
    finally:
        proc.kill()


def _swallow(fn) -> None:
    with contextlib.suppress(Exception):  # the request in flight when the server stops
        fn()


def test_concurrent_requests_share_batches(server):
    """16 chat requests sent at once share one or two batches; one after another, each runs alone.
    What that is worth in time is bench/bench_serve.py's to print (6.0x on the embedded model)."""
    c = client(server.url)

    def ask(i: int) -> None:
        c.chat.completions.create(model="base", max_tokens=4, messages=[
            {"role": "user", "content": f"Write a short sentence about the number {i}."}])
    before = server.engine.stats["batches"]
    _, _, batches = sequential_then_together(server.engine, ask, 16)
    assert server.engine.stats["batches"] - before - batches == 1 + 16  # the warm-up, then one batch each
    assert 1 <= batches <= 2, f"16 requests at once ran in {batches} batches"

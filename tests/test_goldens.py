"""Decode goldens: outputs frozen before the decoder was unified (tests/goldens.py says how).

`evalkit serve` on the tiny Llama answers a fixed request set as it did, and the embedded model's
base variant decodes the demo's first extract cases as the demo run did. `EVALKIT_WRITE_GOLDENS=1`
rewrites the serve goldens instead (only when a change is meant: say why in the commit).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import goldens
import openai
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIXTURES = Path(__file__).parent / "fixtures" / "goldens"
REPO = Path(__file__).resolve().parent.parent
HI = [{"role": "user", "content": "Hi"}]
MODELS = ("base", "lora", "other", "dora")
REQUESTS = {  # name -> (endpoint, body without model)
    "chat": ("chat", {"messages": HI, "max_tokens": 16, "temperature": 0}),
    "logprobs": ("completions", {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0, "logprobs": 2}),
    "stop": ("completions", {"prompt": "def fibonacci(n):", "max_tokens": 24, "temperature": 0, "stop": ["e", " the"]}),
    "echo": ("completions", {"prompt": "Q: What is 17 * 3?\nA:", "max_tokens": 2, "temperature": 0, "echo": True,
                             "logprobs": 1}),
    "seeded": ("chat", {"messages": HI, "max_tokens": 8, "temperature": 0.8, "seed": 11}),
}


def _answer(c: openai.OpenAI, endpoint: str, body: dict) -> dict:
    if endpoint == "chat":
        r = c.chat.completions.create(**body)
        choice, text = r.choices[0], r.choices[0].message.content
        lp = None
    else:
        r = c.completions.create(**body)
        choice, text = r.choices[0], r.choices[0].text
        lp = choice.logprobs and {"tokens": choice.logprobs.tokens,
                                  "token_logprobs": [None if x is None else round(x, 4) for x in choice.logprobs.token_logprobs]}
    return {"text": text, "finish_reason": choice.finish_reason, "completion_tokens": r.usage.completion_tokens,
            "logprobs": lp}


def test_serve_answers_match_goldens(tiny_server):
    c = openai.OpenAI(base_url=tiny_server.url, api_key="unused", max_retries=0, timeout=60)
    answers = {f"{model}/{name}": _answer(c, endpoint, {"model": model, **body})
               for model in MODELS for name, (endpoint, body) in REQUESTS.items()}
    path = FIXTURES / "serve.json"
    if os.environ.get("EVALKIT_WRITE_GOLDENS"):
        path.write_text(json.dumps(answers, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    frozen = json.loads(path.read_text(encoding="utf-8"))
    for key, want in frozen.items():
        got = answers[key]
        assert {k: v for k, v in got.items() if k != "logprobs"} == {k: v for k, v in want.items() if k != "logprobs"}, key
        if want["logprobs"]:
            assert got["logprobs"]["tokens"] == want["logprobs"]["tokens"], key
            assert got["logprobs"]["token_logprobs"] == pytest.approx(want["logprobs"]["token_logprobs"], abs=2e-3), key
    # streamed, the same text in pieces
    stream = c.chat.completions.create(model="lora", stream=True, **REQUESTS["chat"][1])
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == frozen["lora/chat"]["text"]


@pytest.mark.e2e
def test_embedded_base_decodes_the_demo_goldens(embedded_base):
    """The demo's base outputs (frozen from a `make demo` run) for its first extract cases, decoded
    again at the demo's settings: text, token count and finish_reason."""
    from evalkit.backends.base import encode, render_prompt
    from evalkit.backends.hf_plan import generate
    from evalkit.config.generation import GenerationConfig
    from evalkit.models.base import load_base
    from evalkit.tasks.generation import load_cases

    frozen = goldens.load(FIXTURES / "demo.json")["extract"]["base"]
    model, tok = load_base(embedded_base)
    cases = load_cases(REPO / "suites/data/extract_test.jsonl", 6)
    outs = generate(model, tok, [encode(tok, render_prompt(tok, c)) for c in cases],
                    GenerationConfig(max_new_tokens=48, batch_size=6))
    assert {c.id: [o.text, o.n_output_tokens, o.finish_reason] for c, o in zip(cases, outs)} == {
        c.id: frozen[c.id] for c in cases}

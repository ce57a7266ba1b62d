"""Third-party clients against a real `evalkit serve` (the tiny Llama, base and a LoRA): each must
get the answers the server gives the `openai` client for the same request, and base and lora
must answer differently (the request's model picked the adapter).

- the `openai` client: what test_serve.py does not already cover (several choices, streamed);
- lm-eval's `local-chat-completions` and `local-completions` on a generate_until task (test_serve.py
  has local-completions' loglikelihood);
- promptfoo's `openai:chat` and `openai:completion` providers, from the pinned install that
  `make promptfoo` puts in .promptfoo/ (skipped, loudly, without it: conftest's terminal summary).
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

openai = pytest.importorskip("openai")

REPO = Path(__file__).resolve().parent.parent
PROMPTFOO = REPO / ".promptfoo" / "node_modules" / ".bin" / "promptfoo"
MODELS = ("base", "lora")


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)


# ---------------------------------------------------------------- the openai client

def test_openai_client_streams_several_choices_as_it_answers_them(tiny_server):
    """n=2 with a seed, chat and completions: the streamed chunks, put together by index, are the
    choices of the same request unstreamed (choice j samples with seed + j)."""
    c = client(tiny_server.url)
    kwargs = dict(max_tokens=8, n=2, temperature=1.0, seed=11)
    whole = c.chat.completions.create(model="lora", messages=[{"role": "user", "content": "Hi"}], **kwargs)
    texts = ["", ""]
    for chunk in c.chat.completions.create(model="lora", messages=[{"role": "user", "content": "Hi"}], stream=True,
                                           **kwargs):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [ch.message.content for ch in whole.choices]
    assert texts[0] != texts[1]  # two samples, not one sent twice

    whole = c.completions.create(model="base", prompt="Once upon", **kwargs)
    texts = ["", ""]
    for chunk in c.completions.create(model="base", prompt="Once upon", stream=True, **kwargs):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [ch.text for ch in whole.choices] and texts[0] != texts[1]


# ---------------------------------------------------------------- lm-eval's API models

QUESTIONS = [{"id": f"q{i}", "question": q, "answer": a} for i, (q, a) in enumerate(
    [("What is 2 + 2?", "4"), ("Name a colour.", "red"), ("Capital of France?", "Paris")])]
UNTIL = ["Question:"]  # what lm-eval's tasks often stop at; the tiny model's newlines would end its answers at once


def _docs(**_: object):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(QUESTIONS)})


def _generate_task(name: str) -> dict:
    return {"task": name, "custom_dataset": functools.partial(_docs), "test_split": "test",
            "output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": UNTIL, "do_sample": False, "max_gen_toks": 8},
            "metric_list": [{"metric": "exact_match"}], "metadata": {"version": 1.0}}


def _lm_eval_answers(lm: str, url: str, model: str, **kwargs) -> dict[str, tuple[str, str]]:
    """question id -> (the prompt lm-eval sent, its answer), from lm-eval's logged samples."""
    from evalkit.tasks import harness_lm, harness_results

    results = harness_lm.simple_evaluate(lm, [_generate_task(f"evalkit_serve_{lm.replace('-', '_')}")],
                                      model_args=f"base_url={url},model={model},num_concurrent=1,max_retries=1",
                                      **kwargs)
    return {d.doc["id"]: (d.prompt, d.output) for d in harness_results.documents(results)}


def test_lm_eval_local_chat_completions_generates_what_the_server_answers(tiny_server):
    """lm-eval's chat client on a generate_until task (its chat template applied by the server):
    each answer is the one the openai client gets for the same messages, stop and max_tokens."""
    c = client(tiny_server.url)
    before = tiny_server.counts["chat"]
    answers = {}
    for model in MODELS:
        answers[model] = _lm_eval_answers("local-chat-completions", f"{tiny_server.url}/chat/completions", model,
                                          apply_chat_template=True)
        assert set(answers[model]) == {q["id"] for q in QUESTIONS}
        for qid, (prompt, output) in answers[model].items():
            messages = [{"role": "user", "content": next(q["question"] for q in QUESTIONS if q["id"] == qid)}]
            assert json.dumps(messages) in prompt  # lm-eval logs the chat it sent as JSON
            direct = c.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, stop=UNTIL)
            assert output == direct.choices[0].message.content, (model, qid)
    assert tiny_server.counts["chat"] - before == 4 * len(QUESTIONS)  # lm-eval's 3 + ours 3, per model
    assert all(output for a in answers.values() for _, output in a.values())
    assert answers["base"] != answers["lora"]


def test_lm_eval_local_completions_generates_what_the_server_answers(tiny_server):
    """lm-eval's completions client generating (it tokenizes through the server's /tokenize and
    sends token ids): each answer is the one the openai client gets for the same prompt text."""
    c = client(tiny_server.url)
    answers = {}
    for model in MODELS:
        answers[model] = _lm_eval_answers("local-completions", f"{tiny_server.url}/completions", model)
        for qid, (prompt, output) in answers[model].items():
            direct = c.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, stop=UNTIL)
            assert output == direct.choices[0].text, (model, qid)
    assert answers["base"] != answers["lora"]


# ---------------------------------------------------------------- promptfoo

PROMPTS = ["Say hello to {{name}}.", "Write one word about {{name}}."]
NAMES = ["Ada", "Grace"]
PROVIDERS = [f"openai:{kind}:{model}" for kind in ("chat", "completion") for model in MODELS]


def _promptfoo_env(home: Path) -> dict[str, str]:
    """No telemetry, update check, sharing or remote calls (the machine has no network), its
    database and logs under the test's folder."""
    quiet = {"PROMPTFOO_DISABLE_TELEMETRY", "PROMPTFOO_DISABLE_UPDATE", "PROMPTFOO_DISABLE_SHARING",
             "PROMPTFOO_DISABLE_REMOTE_GENERATION", "PROMPTFOO_DISABLE_REDTEAM_REMOTE_GENERATION",
             "PROMPTFOO_DISABLE_RUNTIME_WARNINGS", "PROMPTFOO_DISABLE_ERROR_LOG", "PROMPTFOO_DISABLE_DEBUG_LOG"}
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "PROMPTFOO_"))}
    return keep | dict.fromkeys(quiet, "1") | {"HOME": str(home), "PROMPTFOO_CONFIG_DIR": str(home / ".promptfoo"),
                                               "PROMPTFOO_CACHE_ENABLED": "false", "NO_COLOR": "1"}


def _direct(c: openai.OpenAI, provider: str, prompt: str) -> str:
    """What the openai client gets for what promptfoo's provider sends: a chat provider's prompt is
    one user message; the completion provider stops at <|im_end|> and <|endoftext|> by default."""
    _, kind, model = provider.split(":")
    if kind == "chat":
        r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=8,
                                      temperature=0)
        return r.choices[0].message.content
    return c.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0,
                                stop=["<|im_end|>", "<|endoftext|>"]).choices[0].text


def test_promptfoo_openai_chat_and_completion_providers(tiny_server, tmp_path):
    """promptfoo's openai:chat and openai:completion providers (the completion one sends best_of: 1,
    top_p, penalties: OpenAI's defaults) against evalkit serve, base and lora: every case passes
    its assertion, which is the answer the server gives the openai client for the same request."""
    if not PROMPTFOO.exists():
        pytest.skip("promptfoo is not installed: run `make promptfoo` (a pinned copy in .promptfoo/)")
    c = client(tiny_server.url)
    rendered = [p.replace("{{name}}", name) for p in PROMPTS for name in NAMES]
    expected = {f"{provider}|{prompt}": _direct(c, provider, prompt) for provider in PROVIDERS for prompt in rendered}
    assert len({v for k, v in expected.items() if ":base|" in k} & {v for k, v in expected.items() if ":lora|" in k}) \
        < len(expected) // 2  # base and lora answer differently
    config = {
        "description": "evalkit serve, through promptfoo's OpenAI providers",
        "prompts": PROMPTS,
        "providers": [{"id": p, "config": {"apiBaseUrl": tiny_server.url, "apiKey": "unused", "max_tokens": 8,
                                           "temperature": 0}} for p in PROVIDERS],
        # the expected answers inline (JSON is JavaScript: promptfoo hands an object var to
        # assertions as a string), keyed by the provider's id (a method) and the rendered prompt
        "defaultTest": {"assert": [{"type": "javascript",
                                    "value": f"output === ({json.dumps(expected)})[`${{context.provider.id()}}|${{context.prompt}}`]"}]},
        "tests": [{"vars": {"name": name}} for name in NAMES],
    }
    (tmp_path / "promptfooconfig.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    before = dict(tiny_server.counts)
    proc = subprocess.run([str(PROMPTFOO), "eval", "-c", "promptfooconfig.yaml", "-o", "out.json", "--no-cache",
                           "--no-progress-bar", "--no-table", "--max-concurrency", "4"],
                          cwd=tmp_path, env=_promptfoo_env(tmp_path / "home"), capture_output=True, text=True, timeout=300)
    out = json.loads((tmp_path / "out.json").read_text()) if (tmp_path / "out.json").exists() else None
    assert out is not None, f"promptfoo wrote no results (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = out["results"]["results"]
    assert len(rows) == len(PROVIDERS) * len(PROMPTS) * len(NAMES)
    for row in rows:
        key = f"{row['provider']['id']}|{row['prompt']['raw']}"
        assert (row.get("response") or {}).get("output") == expected[key], (key, row.get("error"))
        assert row.get("error") is None and row["success"], (key, row.get("error"))
    stats = out["results"]["stats"]
    assert (stats["successes"], stats["failures"], stats["errors"]) == (len(rows), 0, 0)
    assert proc.returncode == 0, proc.stdout[-2000:]
    # every answer came from the server: no cache, one request per case and provider
    assert tiny_server.counts["chat"] - before["chat"] == len(rows) // 2
    assert tiny_server.counts["completions"] - before["completions"] == len(rows) // 2


def test_promptfoo_pin_is_what_the_makefile_installs():
    """The test runs the version the Makefile pins (an upgrade is a deliberate change of both)."""
    pinned = next(line.split("=", 1)[1].strip() for line in (REPO / "Makefile").read_text().splitlines()
                  if line.startswith("PROMPTFOO_VERSION"))
    installed = REPO / ".promptfoo" / "node_modules" / "promptfoo" / "package.json"
    if not installed.exists() or shutil.which("node") is None:
        pytest.skip("promptfoo is not installed: run `make promptfoo`")
    assert json.loads(installed.read_text())["version"] == pinned

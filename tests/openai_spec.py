"""The OpenAI request parameters as the `openai` package declares them, and their documented defaults.

The parameter lists come from the package's own request types (TypedDicts), so a parameter that a
new `openai` release adds shows up here; DEFAULTS must then say what its default is, or the
spec-walk test in test_serve.py fails. The fuzz test (test_serve_fuzz.py) draws keys from here too.
"""
from __future__ import annotations

from typing import Any

REQUIRED = object()  # sent with a real value in every request (model, prompt, messages)
NULL = None  # no documented default (or the default is "not given"): null


def params(endpoint: str) -> set[str]:
    """The body parameters of /v1/completions ("completions") or /v1/chat/completions ("chat"),
    streaming and not."""
    if endpoint == "completions":
        from openai.types import completion_create_params as m
    else:
        from openai.types.chat import completion_create_params as m
    out: set[str] = set()
    for t in (m.CompletionCreateParamsNonStreaming, m.CompletionCreateParamsStreaming):
        out |= set(t.__required_keys__) | set(t.__optional_keys__)
    return out


def typed_dict_keys(t: Any) -> set[str]:
    return set(t.__required_keys__) | set(t.__optional_keys__)


def message_types() -> dict[str, Any]:
    """Each chat message role's parameter type."""
    import openai.types.chat as c

    return {"developer": c.ChatCompletionDeveloperMessageParam, "system": c.ChatCompletionSystemMessageParam,
            "user": c.ChatCompletionUserMessageParam, "assistant": c.ChatCompletionAssistantMessageParam,
            "tool": c.ChatCompletionToolMessageParam, "function": c.ChatCompletionFunctionMessageParam}


# Documented defaults (the API reference's "Defaults to ..."; the package's docstrings where they
# say one); NULL where none is documented. Values for every parameter of each endpoint.
COMPLETIONS: dict[str, Any] = {
    "model": REQUIRED, "prompt": REQUIRED,
    "best_of": 1, "echo": False, "frequency_penalty": 0, "logit_bias": NULL, "logprobs": NULL, "max_tokens": 16,
    "n": 1, "presence_penalty": 0, "seed": NULL, "stop": NULL, "stream": False, "stream_options": NULL,
    "suffix": NULL, "temperature": 1, "top_p": 1, "user": NULL,
}
CHAT: dict[str, Any] = {
    "model": REQUIRED, "messages": REQUIRED,
    "audio": NULL, "frequency_penalty": 0, "function_call": "none", "functions": NULL, "logit_bias": NULL,
    "logprobs": False, "max_completion_tokens": NULL, "max_tokens": NULL, "metadata": NULL, "modalities": ["text"],
    "moderation": NULL, "n": 1, "parallel_tool_calls": True, "prediction": NULL, "presence_penalty": 0,
    "prompt_cache_key": NULL, "prompt_cache_options": {"mode": "implicit", "ttl": "30m"},
    "prompt_cache_retention": NULL, "reasoning_effort": NULL, "response_format": {"type": "text"},
    "safety_identifier": NULL, "seed": NULL, "service_tier": "auto", "stop": NULL, "store": False, "stream": False,
    "stream_options": NULL, "temperature": 1, "tool_choice": "none", "tools": NULL, "top_logprobs": NULL,
    "top_p": 1, "user": NULL, "verbosity": "medium", "web_search_options": NULL,
}
STREAM_OPTIONS: dict[str, Any] = {"include_usage": False, "include_obfuscation": True}
# per role: the message's fields besides role and content. tool and function messages answer a
# call this server never makes: refused whatever they hold (the test checks the message)
MESSAGE_FIELDS: dict[str, dict[str, Any]] = {
    "developer": {"name": NULL}, "system": {"name": NULL}, "user": {"name": NULL},
    "assistant": {"name": NULL, "audio": NULL, "function_call": NULL, "refusal": NULL, "tool_calls": []},
    "tool": {"tool_call_id": NULL}, "function": {"name": NULL},
}
TEXT_PART: dict[str, Any] = {"type": REQUIRED, "text": REQUIRED, "prompt_cache_breakpoint": NULL}
JSON_SCHEMA: dict[str, Any] = {"name": "response", "schema": REQUIRED, "description": NULL, "strict": False}

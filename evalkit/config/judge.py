"""The suite's `judge:` mapping: the judge's endpoint and how to ask it; `evalkit.judge.client` asks it."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from evalkit.config.endpoint import EndpointSettings


class JudgeConfig(EndpointSettings):
    """The suite's `judge:` mapping: an OpenAI-compatible endpoint and how to ask it."""

    base_url: str = Field(pattern=r"^https?://")
    model: str = Field(min_length=1)
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(256, ge=1)
    invalid_retries: int = Field(2, ge=0, le=10, description="re-asks after an unparseable verdict")
    response_format: Literal["none", "json_object", "json_schema"] = Field(
        "none", description="also send OpenAI's response_format (json_object / json_schema)")

    def describe(self) -> dict[str, Any]:
        """What the run record keeps about the judge (the variable's name, not its value)."""
        return self.model_dump()

    def request_params(self) -> dict[str, Any]:
        """Everything besides the messages that changes the reply: part of every cache key."""
        return {"model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens,
                "response_format": self.response_format}

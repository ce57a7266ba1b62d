"""How to reach an OpenAI-compatible endpoint (a judge's, a served backend's): transport settings only;
`evalkit.endpoint` does the reaching."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import Field, model_validator

from evalkit.shape import Shape, invalid


class EndpointSettings(Shape):
    """How to reach an endpoint: holds the NAME of the key's environment variable, never the key."""

    extra_keys: ClassVar[tuple[str, ...]] = ("api_key",)  # refused below with a message of its own

    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                    description="the environment variable holding the API key")
    timeout: float = Field(60.0, gt=0, description="seconds per request")
    concurrency: int = Field(4, ge=1, le=256, description="requests in flight at once (per endpoint)")
    retries: int = Field(5, ge=0, le=20, description="transport retries per request (429, 5xx, timeout, connection)")
    backoff: float = Field(1.0, ge=0, description="first backoff in seconds, doubled per retry (with jitter)")
    max_backoff: float = Field(30.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _no_key(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "api_key" in data:
            # checked first, and the message never echoes the value
            raise invalid("an API key must not be written in the suite", at=("api_key",),
                          hint="export it as an environment variable and name it: api_key_env: MY_API_KEY")
        return data
